"""Tests for configs/: every experiment, model and index config composes into settings the code accepts."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import pytest
import timm
import torch
from conftest import ROOT
from conftest import compose_config as _compose_config
from omegaconf import OmegaConf

from patchify.index import IndexSpec, check_training_size
from patchify.model import POOLS, Encoder
from patchify.index import index_spec
from patchify.indexing import training_levels
from patchify.pyramid import MAX_LEVEL, levels_for
from patchify.weights import PACKAGED

CONFIGS = ROOT / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONFIGS / "model").glob("*.yaml"))
INDICES = sorted(p.stem for p in (CONFIGS / "index").glob("*.yaml"))
DATASETS = sorted(p.stem for p in (CONFIGS / "dataset").glob("*.yaml"))

#: Descriptor width of each model config (pool included): SigLIP SO400M 1152, DINOv2 ViT-L 1024,
#: CLIP ViT-L image projection 768, DINOv2 ViT-S 384, EfficientNet-Lite0 1280, timm test_vit 64.
DIMS = {"siglip": 1152, "dinov2": 1024, "clip": 768, "dinov2_s_packaged": 384, "efficientnet_lite0": 1280,
        "test_vit": 64}


@lru_cache(maxsize=None)
def _compose(*overrides: str):
    """Composed once per override set (read-only here): Hydra's initialisation dominates the run time."""
    return _compose_config(list(overrides))


MODEL_KEYS = {"name", "timm_name", "tag", "pretrained", "checkpoint", "packaged", "image_size", "layer", "pool",
              "norm_intermediate"}


def test_config_groups_are_not_empty():
    assert len(EXPERIMENTS) >= 10 and "smoke" in EXPERIMENTS
    assert {"siglip", "dinov2", "clip", "test_vit"} <= set(MODELS)
    assert set(INDICES) == {"flat", "pq", "ivfpq"}
    assert set(DIMS) == set(MODELS), "add the new model's descriptor width to DIMS"


def test_default_config_composes_and_resolves():
    cfg = _compose()
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["run_name"] == f"{cfg.dataset.name}.{cfg.model.name}.L{cfg.pyramid.level}-" \
                                   f"{cfg.pyramid.multi_scale}.{cfg.index.kind}"
    assert cfg.task == "eval" and cfg.index.kind == "flat"


# ----------------------------------------------------------------------------- experiments


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_to_a_valid_run(name):
    cfg = _compose(f"experiment={name}")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["run_name"].endswith(f".{cfg.index.kind}")
    assert cfg.model.name in DIMS
    dim = DIMS[cfg.model.name]

    spec = index_spec(cfg.index)
    assert isinstance(spec, IndexSpec) and spec.kind == cfg.index.kind
    factory = spec.factory_string(dim)
    assert spec.slug(dim).endswith(f".d{dim}.{spec.metric}")

    levels = levels_for(cfg.pyramid.level, cfg.pyramid.multi_scale)
    assert levels and all(0 <= level <= MAX_LEVEL for level in levels)
    assert cfg.pyramid.mode == "crop"  # the only mode the pipeline runs
    train = training_levels(int(cfg.index.train_level), levels)
    assert train and all(0 <= level <= MAX_LEVEL for level in train)
    if spec.needs_training():
        check_training_size(spec, int(cfg.index.max_train_vectors))  # the sample cap is large enough

    if name == "smoke":
        assert cfg.model.name == "test_vit" and factory == "Flat"
        assert cfg.extract.num_workers == 0
    else:
        assert cfg.dataset.kind == "ilias" and cfg.dataset.name == "ilias" and cfg.dataset.generate is None
        assert name.split("_")[0] == cfg.model.name  # e.g. siglip_l3 runs model=siglip
        level = int(name.split("_")[1].lstrip("l"))
        assert cfg.pyramid.level == level and levels == list(range(level + 1))
        assert cfg.model.pretrained is True and not cfg.model.checkpoint and not cfg.model.packaged


@pytest.mark.parametrize("name,factory,train", [
    ("siglip_l3_ivfpq_train1", "IVF8192,PQ64x8", [1]),
    ("siglip_l3_ivfpq_self", "IVF8192,PQ64x8", [0, 1, 2, 3]),
    ("siglip_l3", "Flat", [0, 1, 2, 3]),
    ("clip_l0", "Flat", [0]),
])
def test_paper_rows(name, factory, train):
    cfg = _compose(f"experiment={name}")
    spec = index_spec(cfg.index)
    assert spec.factory_string(DIMS[cfg.model.name]) == factory
    levels = levels_for(cfg.pyramid.level, cfg.pyramid.multi_scale)
    assert training_levels(int(cfg.index.train_level), levels) == train
    if spec.kind == "ivfpq":
        assert (spec.nprobe, spec.metric, cfg.index.max_train_vectors) == (8192, "IP", 2_000_000)


# ----------------------------------------------------------------------------- models


@pytest.mark.parametrize("name", MODELS)
def test_model_config_has_the_keys_the_code_reads(name):
    model = _compose(f"model={name}").model
    assert set(model) >= MODEL_KEYS, MODEL_KEYS - set(model)
    assert model.name == name
    assert model.pool in POOLS
    if model.pool in ("head", "projection"):
        assert model.layer == -1
    assert isinstance(model.layer, int) and model.layer >= -1
    assert isinstance(model.image_size, int) and model.image_size >= 0
    assert isinstance(model.pretrained, bool) and isinstance(model.norm_intermediate, bool)
    if model.packaged:
        assert model.packaged in PACKAGED
        assert PACKAGED[model.packaged].timm_name == model.timm_name


@pytest.mark.parametrize("name", MODELS)
def test_model_architecture_and_tag_exist_in_timm(name):
    model = _compose(f"model={name}").model
    assert timm.list_models(model.timm_name) == [model.timm_name]
    if model.tag:
        assert timm.list_pretrained(f"{model.timm_name}.{model.tag}"), f"{model.timm_name}.{model.tag}"


@pytest.mark.parametrize("name", MODELS)
def test_model_descriptor_width_and_pool_fit_the_architecture(name):
    """Build the architecture on the meta device (no weights, no memory) and check the width and the pool."""
    model = _compose(f"model={name}").model
    timm_name = f"{model.timm_name}.{model.tag}" if model.tag else model.timm_name
    kwargs = {} if model.pool == "projection" else {"num_classes": 0}
    with torch.device("meta"):
        backbone = timm.create_model(timm_name, pretrained=False, **kwargs)
    if model.pool == "projection":
        width = backbone.num_classes
    elif model.pool == "head":
        width = getattr(backbone, "head_hidden_size", backbone.num_features)
    else:
        width = backbone.num_features
    assert width == DIMS[name]
    Encoder(backbone, layer=int(model.layer), pool=model.pool, norm_intermediate=bool(model.norm_intermediate))


# ----------------------------------------------------------------------------- indices and datasets


@pytest.mark.parametrize("name", INDICES)
def test_index_config_composes(name):
    cfg = _compose(f"index={name}")
    assert cfg.index.kind == name
    assert cfg.index.metric in ("IP", "L2") and cfg.index.use_gpu in ("auto", True, False)
    spec = index_spec(cfg.index)
    for model, dim in DIMS.items():
        assert spec.factory_string(dim), model  # every index fits every model's width
    assert training_levels(int(cfg.index.train_level), [0, 1, 2, 3])
    if spec.needs_training():
        assert cfg.index.max_train_vectors > 0
        check_training_size(spec, int(cfg.index.max_train_vectors))


@pytest.mark.parametrize("name", INDICES)
def test_index_config_with_each_model(name):
    for model in ("siglip", "dinov2", "clip"):
        cfg = _compose(f"index={name}", f"model={model}")
        assert index_spec(cfg.index).factory_string(DIMS[model])


@pytest.mark.parametrize("name", DATASETS)
def test_dataset_config_composes(name):
    cfg = _compose(f"dataset={name}")
    assert cfg.dataset.kind in ("ilias", "folder", "revisited", "instre")
    if cfg.dataset.kind in ("revisited", "instre"):  # a benchmark's ground-truth file pins queries and gallery
        assert cfg.dataset.gnd_file and cfg.eval.k == 0 and cfg.query.crop_to_bbox is True
        return
    assert cfg.dataset.split == "test" and cfg.dataset.pin_manifest is False
    if cfg.dataset.kind == "ilias":
        assert cfg.dataset.core_dir == "ilias_core"


def test_experiment_files_are_global_packages():
    for name in EXPERIMENTS:
        first = (CONFIGS / "experiment" / f"{name}.yaml").read_text().splitlines()[0]
        assert first.strip() == "# @package _global_", name


def test_configs_dir_is_the_repository_one():
    assert Path(CONFIGS / "config.yaml").is_file()
