"""The crop path's shortcuts change no number: batched preprocessing equals timm's
transform crop by crop, and one pass over all levels equals one pass per level."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import compose_config
from PIL import Image

from patchify.data import ImageRecord
from patchify.extraction import FeatureStore, PatchTransform, extract_missing
from patchify.model import load_model
from patchify.pyramid import level_boxes


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return load_model(compose_config(["model=test_vit"]).model, device="cpu")


@pytest.mark.parametrize("size", [(97, 61), (640, 480)])
def test_patch_transform_equals_timm_transform_per_crop(model, size):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    boxes = np.concatenate([level_boxes(*size, level) for level in range(4)])
    batched = PatchTransform(model.data_config)(image, boxes)
    one_by_one = torch.stack([model.transform(image.crop((x, y, x + w, y + h))) for x, y, w, h in boxes.tolist()])
    assert batched.shape == one_by_one.shape and torch.equal(batched, one_by_one)


def test_all_levels_in_one_pass_equal_one_pass_per_level(model, ilias_fixture, tmp_path):
    records = [ImageRecord(id=p.name, path=p) for p in sorted(ilias_fixture.glob("ilias_core/*/pos/*.jpg"))[:3]]

    def stores(root, levels):
        made = [FeatureStore(root, "m", model.fingerprint, level, "crop", "full") for level in levels]
        for store in made:
            store.open()
        return made

    together = stores(tmp_path / "together", [0, 1, 2, 3])
    extract_missing(together, records, [model] * 4, batch_size=7, num_workers=0, chunk_size=2)
    for level in range(4):
        alone = stores(tmp_path / f"alone{level}", [level])
        extract_missing(alone, records, [model], batch_size=5, num_workers=0, chunk_size=2)
        a, b = together[level].gather(records)[0], alone[0].gather(records)[0]
        assert np.array_equal(a.image, b.image) and np.array_equal(a.boxes, b.boxes)
        assert np.allclose(a.vectors, b.vectors, atol=1e-5)
