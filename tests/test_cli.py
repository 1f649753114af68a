"""Tests for src/patchify/cli.py: the paper's reference flags (SPEC section 6) as Hydra overrides."""

from __future__ import annotations

import pytest
from conftest import compose_config
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from patchify.cli import FlagError, translate_argv
from patchify.metrics import METRICS

# (flag, value, expected override) for every value-taking reference flag of SPEC section 6.
VALUE_FLAGS = [
    ("model_name", "siglip", "model=siglip"),
    ("tile_size_res", "2", "pyramid.level=2"),
    ("multi-scale", "single", "pyramid.multi_scale=single"),
    ("multi_scale", "pyramid", "pyramid.multi_scale=pyramid"),
    ("image_size", "224", "model.image_size=224"),
    ("split", "val", "dataset.split=val"),
    ("iou_threshold", "average", "eval.iou_threshold=average"),
    ("iou_threshold", "0.4", "eval.iou_threshold=0.4"),
    ("batch_size", "8", "extract.batch_size=8"),
    ("pq_m", "64", "index.m=64"),
    ("pq_nlist", "8192", "index.nlist=8192"),
    ("pq_nprobe", "128", "index.nprobe=128"),
    ("pq_nbits", "8", "index.nbits=8"),
    ("pq_dist_type", "L2", "index.metric=L2"),
    ("pq_train_res", "-1", "index.train_level=-1"),
    ("pq_train_res", "-2", "index.train_level=-2"),
    ("pq_train_res", "1", "index.train_level=1"),
    ("pq", "False", "index=flat"),
    ("pq", "pq", "index=pq"),
    ("pq", "ivfpq", "index=ivfpq"),
    ("pq", "IVFPQ", "index=ivfpq"),
    ("crop", "True", "pyramid.mode=crop"),
    ("crop", "False", "pyramid.mode=pool"),
    ("visualize", "True", "eval.visualize=true"),
    ("visualize", "False", "eval.visualize=false"),
    ("compute_metrics", "mAP, locscore", "eval.metrics=[map,locscore]"),
]

PAPER_FLAGS = ["--model_name", "siglip", "--tile_size_res", "3", "--pq", "ivfpq", "--pq_m", "64",
               "--pq_nlist", "8192", "--pq_nprobe", "8192", "--pq_nbits", "8", "--pq_dist_type", "IP",
               "--pq_train_res", "1"]


@pytest.mark.parametrize("flag,value,expected", VALUE_FLAGS)
def test_flag_with_separate_value(flag, value, expected):
    assert translate_argv([f"--{flag}", value]) == [expected]


@pytest.mark.parametrize("flag,value,expected", VALUE_FLAGS)
def test_flag_with_equals_value(flag, value, expected):
    assert translate_argv([f"--{flag}={value}"]) == [expected]


@pytest.mark.parametrize("value", ["False", "false", "0", "no", "None"])
def test_pq_false_spellings_mean_flat(value):
    assert translate_argv(["--pq", value]) == ["index=flat"]


@pytest.mark.parametrize("value", ["false", "0", "no"])
def test_crop_false_spellings_mean_pool(value):
    assert translate_argv(["--crop", value]) == ["pyramid.mode=pool"]


@pytest.mark.parametrize("argv,expected", [
    (["--visualize"], ["eval.visualize=true"]),
    (["--visualize", "--pq", "pq"], ["eval.visualize=true", "index=pq"]),
    (["--visualize", "model=siglip"], ["eval.visualize=true", "model=siglip"]),
    (["--visualize", "-m", "pyramid.level=0,3"], ["eval.visualize=true", "-m", "pyramid.level=0,3"]),
    (["--crop"], ["pyramid.mode=crop"]),
    (["--crop", "--visualize"], ["pyramid.mode=crop", "eval.visualize=true"]),
])
def test_bare_boolean_switches(argv, expected):
    assert translate_argv(argv) == expected


def test_compute_metrics_list_is_lowercased_and_trimmed():
    assert translate_argv(["--compute_metrics", " mAP ,LocScore, , topk"]) == ["eval.metrics=[map,locscore,topk]"]


def test_compute_metrics_composes_to_a_list():
    cfg = compose_config(translate_argv(["--compute_metrics", "mAP, locscore"]))
    assert list(cfg.eval.metrics) == ["map", "locscore"]


def test_compute_metrics_spec_spelling_top_k_is_a_known_metric():
    override = translate_argv(["--compute_metrics", "mAP, top-k, locscore"])[0]
    names = override.split("=", 1)[1].strip("[]").split(",")
    assert set(names) <= set(METRICS), names


def test_hydra_overrides_and_options_pass_through():
    argv = ["--multirun", "pyramid.level=0,1,2,3", "-m", "+foo=1", "~eval.k", "hydra.verbose=true",
            "--cfg", "job", "--config-name=config", "--help", "query.crop_to_bbox=true", "model=dinov2"]
    assert translate_argv(argv) == argv


def test_mixed_styles_keep_order():
    argv = ["model=clip", "--tile_size_res", "0", "--multirun", "index.nprobe=1,8", "--pq=ivfpq", "seed=3"]
    assert translate_argv(argv) == ["model=clip", "pyramid.level=0", "--multirun", "index.nprobe=1,8",
                                    "index=ivfpq", "seed=3"]


@pytest.mark.parametrize("arg,expected", [
    ("query=/data/photo.jpg", "query.path=/data/photo.jpg"),
    ("query=rel/dir/a=b.png", "query.path=rel/dir/a=b.png"),
    ("query.path=/x.jpg", "query.path=/x.jpg"),
    ("query.crop_to_bbox=true", "query.crop_to_bbox=true"),
])
def test_query_path_shorthand(arg, expected):
    assert translate_argv(["task=search", arg]) == ["task=search", expected]


def test_unknown_flag_lists_known_flags():
    with pytest.raises(FlagError) as err:
        translate_argv(["--model", "siglip"])
    message = str(err.value)
    assert "--model" in message
    for known in ("model_name", "tile_size_res", "multi-scale", "crop", "image_size", "split", "compute_metrics",
                  "iou_threshold", "visualize", "batch_size", "pq", "pq_m", "pq_nlist", "pq_nprobe", "pq_nbits",
                  "pq_dist_type", "pq_train_res"):
        assert known in message, known


@pytest.mark.parametrize("argv,match", [
    (["--pq", "opq"], "--pq expects"),
    (["--pq", "True"], "--pq expects"),
    (["--crop", "maybe"], "--crop expects True or False"),
    (["--visualize=perhaps"], "--visualize expects True or False"),
    (["--tile_size_res"], "needs a value"),
])
def test_malformed_flags(argv, match):
    with pytest.raises(FlagError, match=match):
        translate_argv(argv)


def test_every_reference_flag_composes_together():
    argv = ["--model_name", "dinov2", "--tile_size_res", "2", "--multi-scale", "single", "--crop", "True",
            "--image_size", "224", "--split", "test", "--compute_metrics", "mAP, locscore", "--iou_threshold",
            "default", "--visualize", "--batch_size", "8", "--pq", "ivfpq", "--pq_m", "32", "--pq_nlist", "64",
            "--pq_nprobe", "16", "--pq_nbits", "6", "--pq_dist_type", "L2", "--pq_train_res", "-2"]
    cfg = compose_config(translate_argv(argv))
    assert cfg.model.name == "dinov2" and cfg.model.image_size == 224
    assert (cfg.pyramid.level, cfg.pyramid.multi_scale, cfg.pyramid.mode) == (2, "single", "crop")
    assert cfg.dataset.split == "test" and cfg.extract.batch_size == 8
    assert list(cfg.eval.metrics) == ["map", "locscore"]
    assert cfg.eval.iou_threshold == "default" and cfg.eval.visualize is True
    assert (cfg.index.kind, cfg.index.m, cfg.index.nlist, cfg.index.nprobe, cfg.index.nbits) == ("ivfpq", 32, 64, 16, 6)
    assert cfg.index.metric == "L2" and cfg.index.train_level == -2


def test_crop_false_composes_to_pool_mode():
    assert compose_config(translate_argv(["--crop", "False"])).pyramid.mode == "pool"


def test_pq_settings_before_pq_kind_still_apply():
    cfg = compose_config(translate_argv(["--pq_m", "64", "--pq", "ivfpq"]))
    assert cfg.index.kind == "ivfpq" and cfg.index.m == 64


@pytest.mark.parametrize("kind", ["False", "pq"])
def test_reference_defaults_compose_for_every_index_kind(kind):
    argv = ["--pq", kind, "--pq_m", "16", "--pq_nlist", "256", "--pq_nprobe", "256", "--pq_nbits", "8",
            "--pq_dist_type", "IP", "--pq_train_res", "-1"]
    cfg = compose_config(translate_argv(argv))
    assert cfg.index.kind == ("flat" if kind == "False" else "pq")


def test_paper_command_translation():
    assert translate_argv(PAPER_FLAGS) == [
        "model=siglip", "pyramid.level=3", "index=ivfpq", "index.m=64", "index.nlist=8192", "index.nprobe=8192",
        "index.nbits=8", "index.metric=IP", "index.train_level=1"]


def test_paper_command_matches_its_experiment_config():
    flags = compose_config(translate_argv(PAPER_FLAGS))
    experiment = compose_config(["experiment=siglip_l3_ivfpq_train1"])
    assert flags.model.timm_name == experiment.model.timm_name == "vit_so400m_patch14_siglip_384"
    assert OmegaConf.to_container(flags.model) == OmegaConf.to_container(experiment.model)
    assert OmegaConf.to_container(flags.pyramid) == OmegaConf.to_container(experiment.pyramid)
    index_flags = OmegaConf.to_container(flags.index)
    index_experiment = OmegaConf.to_container(experiment.index)
    assert set(index_flags) == set(index_experiment)
    for key in index_flags:
        if key != "max_train_vectors":
            assert index_flags[key] == index_experiment[key], key
    assert (index_flags["kind"], index_flags["m"], index_flags["nlist"], index_flags["nprobe"], index_flags["nbits"],
            index_flags["metric"], index_flags["train_level"]) == ("ivfpq", 64, 8192, 8192, 8, "IP", 1)
