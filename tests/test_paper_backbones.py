"""The paper's backbones (configs/model/{siglip,dinov2,clip}.yaml) run through the real pipeline.

Random weights (``model.pretrained=false``: no hub here), at the project's default precision
(``extract.precision=auto``: bf16 on a CPU with native bf16). Per backbone: its preprocessing is
timm's pretrained config; task=eval at its native input size, L0; at 112 px (8x8 tokens, so a
2-core CI box can afford it), the L0-L3 pyramid in crop mode and, for DINOv2 (the one whose
``model.pool`` pool mode accepts), pool mode. One gallery image and one query each.
Measured: docs/BENCHMARKS.md, "The paper's backbones".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import compose_config
from fixtures import make_ilias_fixture
from omegaconf import OmegaConf
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

import patchify.features as features
from patchify.model import load_model, resolve_precision
from patchify.pipeline import run

pytestmark = pytest.mark.slow

# name: (descriptor width, model.pool, native input size, mean, std)
PAPER = {
    "siglip": (1152, "head", 384, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "dinov2": (1024, "cls", 518, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    "clip": (768, "projection", 336, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
}
SMALL = 112  # 8 x 8 patches of 14 px


@pytest.fixture(scope="module")
def loaded():
    """Every model the pipeline loads in this module, built once per distinct setting (the builds
    of these random 300-400 M parameter encoders are most of the module's time)."""
    models: dict[tuple, object] = {}

    def load_once(cfg, device="auto", precision="fp32"):
        key = (OmegaConf.to_yaml(cfg), device, precision)
        if key not in models:
            models[key] = load_model(cfg, device=device, precision=precision)
        return models[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(features, "load_model", load_once)
        yield models


@pytest.fixture(scope="module")
def one_pair(tmp_path_factory) -> Path:
    """One instance: one query and its one positive (the whole gallery)."""
    return make_ilias_fixture(tmp_path_factory.mktemp("pair"), instances=1, positives=1, distractors=0)


def _eval(name: str, root: Path, folder: Path, *overrides: str) -> dict:
    cfg = compose_config(["experiment=smoke", f"model={name}", "model.pretrained=false", "extract.precision=auto",
                          f"dataset.root={root}", "dataset.generate=null", "dataset.name=pair",
                          f"paths.features={folder / 'features'}", f"paths.indices={folder / 'indices'}",
                          f"paths.logs={folder / 'logs'}", *overrides])
    return run(cfg, folder / "run")


def _stored_vectors(folder: Path, pattern: str) -> np.ndarray:
    chunks = sorted((folder / "features").glob(f"{pattern}/chunk-*.npz"))
    assert chunks, pattern
    return np.concatenate([np.load(chunk)["vectors"] for chunk in chunks])


def _model_at(models: dict, size: int):
    (model,) = [m for m in models.values() if m.input_size == size]
    return model


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_backbone_runs_the_pipeline(name, loaded, one_pair, tmp_path):
    width, pool, native, mean, std = PAPER[name]
    loaded.clear()

    # Native input size, L0 (the global descriptor ILIAS's leaderboard compares).
    metrics = _eval(name, one_pair, tmp_path / "native", "pyramid.level=0")
    assert metrics["counts"]["gallery_patches"] == 1 and metrics["mAP"] == 100.0  # its only gallery image
    model = _model_at(loaded, native)
    assert model.precision == resolve_precision("auto", "cpu") and model.dim == width
    config = model.data_config
    assert tuple(config["input_size"]) == (3, native, native) and config["interpolation"] == "bicubic"
    assert np.allclose(config["mean"], mean) and np.allclose(config["std"], std)
    cfg = compose_config([f"model={name}"]).model
    pretrained = timm.models.get_pretrained_cfg(f"{cfg.timm_name}.{cfg.tag}")
    assert (tuple(pretrained.input_size), pretrained.mean, pretrained.std, pretrained.interpolation) == \
        (tuple(config["input_size"]), tuple(config["mean"]), tuple(config["std"]), config["interpolation"])
    vectors = _stored_vectors(tmp_path / "native", f"{name}.crop.L0-*")  # the query and the gallery image
    assert vectors.shape == (2, width) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    assert model.encoder.pool == pool

    # The L0-L3 pyramid in crop mode at 8x8 tokens.
    loaded.clear()
    metrics = _eval(name, one_pair, tmp_path / "small", "pyramid.level=3", f"model.image_size={SMALL}")
    assert metrics["counts"]["gallery_patches"] == 30
    for level in range(4):
        assert _stored_vectors(tmp_path / "small", f"{name}.crop.L{level}-*").shape == ((level + 1) ** 2 + (level == 0),
                                                                                        width)  # + the query at L0

    # The pooling the config names, computed here from timm's own parts (on the 112 px build: the same modules).
    model = _model_at(loaded, SMALL)
    net, probe = model.encoder.backbone, torch.randn(2, 3, SMALL, SMALL, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        tokens = net.forward_features(probe.to(model.encoder.dtype))
        expected = {"siglip": lambda: net.attn_pool(tokens),        # MAP head (attention pool), pre-logits
                    "dinov2": lambda: tokens[:, 0],                # class token after the final norm
                    "clip": lambda: net.head(tokens[:, 0])}[name]()  # class token through the image projection
        described = model.encoder(probe)[0]
    assert torch.allclose(described, F.normalize(expected.float(), dim=-1), atol=1e-3)
    if name == "siglip":
        assert net.global_pool == "map" and net.num_prefix_tokens == 0
    if name == "clip":
        assert (net.head.in_features, net.head.out_features) == (1024, 768)
    if name != "dinov2":
        return

    # Pool mode: every level's cells from one pass (the same 112 px model: one build).
    metrics = _eval(name, one_pair, tmp_path / "small", "pyramid.level=3", f"model.image_size={SMALL}",
                    "pyramid.mode=pool", f"pyramid.pool_image_size={SMALL}", f"pyramid.pool_query_size={SMALL}",
                    "pyramid.pool_l0=pooled")
    assert metrics["counts"]["gallery_patches"] == 30 and len(loaded) == 1
    for level in range(4):
        assert _stored_vectors(tmp_path / "small", f"{name}.pool-*.L{level}-*").shape == ((level + 1) ** 2, width)
