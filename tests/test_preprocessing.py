"""model.resize: squash (default, unchanged) and long_side (ILIAS's own preprocessing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import compose_config
from PIL import Image

from patchify import model as model_module
from patchify import settings
from patchify.cache import content_key
from patchify.extraction import CropBatches, FeatureStore, PatchTransform, describe_images
from patchify.model import encode, load_model, long_side_size, pad_to_multiple
from patchify.pipeline import run
from patchify.pyramid import level_boxes
from patchify.settings import ConfigError, validate

# content_key of test_vit's fingerprint at the squash resize, computed before model.resize existed:
# squash caches, indices and bundles keep their names.
SQUASH_KEY_BEFORE_RESIZE = "fa001dcd985f"


def _load(*overrides: str):
    return load_model(compose_config(["experiment=smoke", *overrides]).model, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def squash():
    return _load()


@pytest.fixture(scope="module")
def long_side():
    return _load("model.resize=long_side")


def test_resize_choices_agree_with_the_model():
    assert settings.RESIZES == model_module.RESIZES


def test_squash_fingerprint_is_the_one_before_the_setting(squash):
    assert content_key(squash.fingerprint) == SQUASH_KEY_BEFORE_RESIZE
    assert squash.resize == "squash" and "pad_multiple" not in squash.fingerprint["preprocess"]


def test_long_side_enters_the_cache_key(squash, long_side, tmp_path):
    assert long_side.fingerprint["preprocess"]["crop_mode"] == "long_side"
    assert long_side.fingerprint["preprocess"]["pad_multiple"] == 16  # test_vit's patch size
    stores = [FeatureStore(tmp_path, "test_vit", m.fingerprint, 0, "crop", "full") for m in (squash, long_side)]
    assert stores[0].folder != stores[1].folder


def test_long_side_size_is_ilias_arithmetic():
    # ILIAS's LargeSideResize: long side to the target, short side int()-truncated, at least 1 pixel.
    assert long_side_size(300, 100, 160) == (160, 53)
    assert long_side_size(100, 300, 160) == (53, 160)
    assert long_side_size(640, 480, 224) == (224, 168)
    assert long_side_size(200, 200, 160) == (160, 160)
    assert long_side_size(5000, 10, 160) == (160, 1)


def test_a_3_to_1_image_is_padded_where_ilias_pads_and_gives_a_4_by_10_token_grid(long_side):
    image = Image.new("RGB", (300, 100), (200, 30, 90))
    tensor = long_side.transform(image)
    # 300x100 -> 160x53 -> padded to 160x64: 11 rows, 5 on top and 6 (the odd one) at the bottom; no columns.
    assert tensor.shape == (3, 64, 160)
    blank_rows = [r for r in range(64) if not tensor[:, r].abs().sum()]
    assert blank_rows == [0, 1, 2, 3, 4, 58, 59, 60, 61, 62, 63]
    inside = tensor[:, 5:58]
    expected = (torch.tensor([200, 30, 90]) / 255 - 0.5) / 0.5  # test_vit's mean and std are 0.5
    assert torch.allclose(inside, expected.view(3, 1, 1).expand_as(inside), atol=1e-6)
    prefix, tokens = long_side.encoder.block_outputs(tensor[None], [-1])[0]
    assert tokens.shape == (1, 4 * 10, 64) and prefix.shape == (1, 1, 64)
    assert long_side.encoder(tensor[None])[0].shape == (1, long_side.dim)


def test_padding_splits_like_multiplier_padding():
    x = torch.ones(1, 3, 53, 37)
    padded = pad_to_multiple(x, 14)  # 53 -> 56 (1 top, 2 bottom), 37 -> 42 (2 left, 3 right)
    assert padded.shape == (1, 3, 56, 42)
    rows, cols = padded[0, 0].sum(1).nonzero().flatten(), padded[0, 0].sum(0).nonzero().flatten()
    assert (int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])) == (1, 53, 2, 38)
    assert pad_to_multiple(x, 1) is x


def test_long_side_crops_are_each_resized_on_their_own(long_side):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (90, 270, 3), dtype=np.uint8))
    boxes = np.concatenate([level_boxes(270, 90, level) for level in (0, 3)])
    groups = PatchTransform(long_side.data_config)(image, boxes)
    positions = sorted(int(p) for group, _ in groups for p in group)
    assert positions == list(range(len(boxes)))
    for group, crops in groups:
        for position, crop in zip(group.tolist(), crops):
            x, y, w, h = boxes[position].tolist()
            assert torch.equal(crop, long_side.transform(image.crop((x, y, x + w, y + h))))


def test_crop_batches_keep_order_across_shapes(long_side):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (120, 200, 3), dtype=np.uint8))
    boxes = np.concatenate([level_boxes(200, 120, level) for level in (0, 1, 2)])
    crops = [long_side.transform(image.crop((x, y, x + w, y + h))) for x, y, w, h in boxes.tolist()]
    batches = CropBatches(long_side, None, batch_size=3)
    batches.add(PatchTransform(long_side.data_config)(image, boxes))
    batches.add(PatchTransform(long_side.data_config)(image, boxes[:2]))
    (vectors,) = batches.finish()
    alone = torch.cat([encode(long_side, crop[None])[0] for crop in crops + crops[:2]])
    assert vectors.shape == (len(boxes) + 2, long_side.dim)
    assert torch.allclose(vectors, alone, atol=1e-5)
    assert batches.finish() is None  # emptied


def test_squash_batches_are_the_previous_code_path(squash):
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 256, (90, 270, 3), dtype=np.uint8))
    boxes = np.concatenate([level_boxes(270, 90, level) for level in (0, 1, 2, 3)])
    stacked = PatchTransform(squash.data_config)(image, boxes)
    batches = CropBatches(squash, [-1], batch_size=8)
    batches.add(stacked[:13])
    batches.add(stacked[13:])
    (vectors,) = batches.finish()
    # before: crops concatenated and encoded in consecutive batches of batch_size
    before = torch.cat([encode(squash, stacked[i:i + 8], [-1])[0] for i in range(0, len(stacked), 8)])
    assert torch.equal(vectors, before)


def test_queries_use_long_side_too(long_side, ilias_fixture):
    from patchify.data import load_dataset
    cfg = compose_config(["experiment=smoke", f"dataset.root={ilias_fixture}", "dataset.generate=null"])
    queries = load_dataset(cfg.dataset).queries[:2]
    vectors, errors = describe_images(queries, long_side, region="bbox")
    assert not errors and vectors.shape == (2, long_side.dim)
    for record, vector in zip(queries, vectors):
        crop = Image.open(record.path).convert("RGB")
        x, y, w, h = (int(round(v)) for v in record.boxes[0])
        alone = encode(long_side, long_side.transform(crop.crop((x, y, x + w, y + h)))[None])[0][0]
        assert torch.allclose(torch.from_numpy(vector), alone, atol=1e-5)


def test_long_side_runs_the_pipeline_into_its_own_caches(smoke_overrides, squash, tmp_path):
    metrics = run(compose_config([*smoke_overrides, "model.resize=long_side", "pyramid.level=1"]), tmp_path / "run")
    assert metrics["counts"]["gallery_patches"] == 16 * 5 and 0 <= metrics["mAP"] <= 100
    folders = {p.name for p in (tmp_path / "features").iterdir() if p.name.startswith("test_vit")}
    squash_folders = {FeatureStore(tmp_path, "test_vit", squash.fingerprint, level, "crop", region).folder.name
                      for level in (0, 1) for region in ("full", "bbox")}
    assert len(folders) >= 2 and not folders & squash_folders


@pytest.mark.parametrize("overrides, message", [
    (["pyramid.mode=pool"], "pyramid.mode=pool: cuts cells from one square token grid; model.resize=long_side needs "
                            "pyramid.mode=crop"),
    (["extract.crops=tensor"], "extract.crops=tensor: cuts squashed crops only; model.resize=long_side needs "
                               "extract.crops=pil"),
    (["rerank=refine"], "rerank.stage=refine: refine encodes squashed windows; model.resize=long_side needs"),
    (["model.resize=pad"], "model.resize=pad: must be one of"),
])
def test_long_side_refuses_what_needs_a_square_grid_in_one_line(overrides, message, smoke_overrides):
    base = [o for o in smoke_overrides] + (["model.resize=long_side"] if "model.resize=pad" not in overrides else [])
    with pytest.raises(ConfigError) as err:
        validate(compose_config(base + overrides))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_cnn_takes_long_side_without_padding():
    cnn = _load("model.timm_name=test_efficientnet", "model.pool=gem", "model.resize=long_side")
    assert cnn.data_config["pad_multiple"] == 1
    tensor = cnn.transform(Image.new("RGB", (300, 100), (10, 20, 30)))
    assert tensor.shape == (3, 53, 160)
    assert cnn.encoder(tensor[None])[0].shape == (1, cnn.dim)
