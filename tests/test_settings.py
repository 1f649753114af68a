"""Every setting is checked before any work, in one line naming key, value and what is allowed (src/patchify/settings.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import get_type_hints

import pytest
import torch
from conftest import ROOT, compose_config
from omegaconf import DictConfig

import patchify.extraction
import patchify.features
import patchify.pipeline
import patchify.tasks.search
from patchify import settings
from patchify.cli import FlagError, check_overrides, hydra_quoted, translate_argv
from patchify.console import is_user_error
from patchify.model import ModelConfigError, check_layer
from patchify.index import IndexConfigError
from patchify.pipeline import ConfigError, run
from patchify.settings import Settings, expand_paths, path_keys, validate

CONFIGS = ROOT / "configs"
GROUPS = sorted(p.name for p in CONFIGS.iterdir() if p.is_dir() and p.name not in ("hydra", "experiment"))
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))

# (command-line words as a user types them, error class, the start of the one-line message)
INVALID = [
    (["pyramid.level=7"], ConfigError, "pyramid.level=7: must be an integer in 0..3"),
    (["pyramid.level=-1"], ConfigError, "pyramid.level=-1: must be an integer in 0..3"),
    (["pyramid.level=abc"], ConfigError, "pyramid.level=abc: must be an integer in 0..3"),
    (["--tile_size_res", "abc"], ConfigError, "pyramid.level=abc: must be an integer in 0..3"),
    (["--tile_size_res", "3)"], ConfigError, "pyramid.level=3): must be an integer in 0..3"),
    (["model.layer=99"], ModelConfigError, "model.layer=99: must be -1 (the final features) or a block index in 0..5"),
    (["model.layer=-2"], ConfigError, "model.layer=-2: must be -1 (the final features) or a block index >= 0"),
    (["index=pq", "index.m=7"], ConfigError, "index.m=7: must divide the descriptor width 64"),
    (["index=ivfpq", "index.m=8", "index.nbits=4", "index.nlist=100000"], IndexConfigError,
     "index.nlist=100000: needs at least 100,000 training vectors"),
    (["pyramid.mode=pool", "pyramid.pool_image_size=100"], ConfigError,
     "pyramid.pool_image_size=100: input size 100 is not a multiple of the patch size 16"),
    (["extract.precision=fp16", "extract.device=cpu"], ModelConfigError, "extract.precision=fp16 runs on CUDA only"),
    (["model.image_size=100"], ModelConfigError, "model.image_size=100: input size 100 is not a multiple of the patch"),
    (["pyramid.mode=pool", "pyramid.pool_split_block=9"], ModelConfigError, "pyramid.pool_split_block=9: must be in 0..6"),
    (["extract.batch_size=0"], ConfigError, "extract.batch_size=0: must be an integer >= 1"),
    (["extract.batch_size=-1"], ConfigError, "extract.batch_size=-1: must be an integer >= 1"),
    (["--batch_size", "0"], ConfigError, "extract.batch_size=0: must be an integer >= 1"),
    (["extract.num_workers=-1"], ConfigError, "extract.num_workers=-1: must be an integer >= 0"),
    (["extract.chunk_size=0"], ConfigError, "extract.chunk_size=0: must be an integer >= 1"),
    (["extract.device=gpu"], ConfigError, "extract.device=gpu: must be auto, cpu, cuda or cuda:N"),
    (["extract.precision=fp8"], ConfigError, "extract.precision=fp8: must be one of auto, fp32, fp16"),
    (["query.top_k=0"], ConfigError, "query.top_k=0: must be an integer >= 1"),
    (["eval.k=-1"], ConfigError, "eval.k=-1: must be an integer >= 1, or 0 for the whole gallery"),
    (["--iou_threshold", "banana"], ConfigError, "eval.iou_threshold=banana: must be default, average or a number in (0, 1]"),
    (["eval.iou_threshold=0"], ConfigError, "eval.iou_threshold=0: must be default, average or a number in (0, 1]"),
    (["--compute_metrics", "mAP, bogus"], ConfigError,
     "eval.metrics=[map, bogus]: unknown metric 'bogus' (choose from map, locscore, topk)"),
    (["eval.metrics=map"], ConfigError, "eval.metrics=map: must be a list of metrics from map, locscore, topk"),
    (["eval.visualize=maybe"], ConfigError, "eval.visualize=maybe: must be true or false"),
    (["pyramid.mode=grid"], ConfigError, "pyramid.mode=grid: must be one of crop, pool"),
    (["--multi-scale", "both"], ConfigError, "pyramid.multi_scale=both: must be one of pyramid, single"),
    (["--pq_nbits", "17"], ConfigError, "index.nbits=17: must be an integer in 1..16"),
    (["--pq_dist_type", "cosine"], ConfigError, "index.metric=cosine: must be one of IP, L2"),
    (["--pq_train_res", "5"], ConfigError, "index.train_level=5: must be -1 (the indexed levels), -2 (all levels) or 0..3"),
    (["index.use_gpu=yes"], ConfigError, "index.use_gpu=yes: must be one of auto, true, false"),
    (["index.refine=SQ8"], ConfigError, "index.refine=SQ8: needs a quantised index"),
    (["rerank=verify", "rerank.top_n=0"], ConfigError, "rerank.top_n=0: must be an integer >= 1"),
    (["rerank.verify.ransac_px=0"], ConfigError, "rerank.verify.ransac_px=0: must be a number > 0"),
    (["rerank.refine.rounds=[{scales:[0],offsets:[0]}]"], ConfigError,
     "rerank.refine.rounds[0].scales=[0]: must be a list of numbers > 0"),
    (["seed=-1"], ConfigError, "seed=-1: must be an integer in 0..2147483647"),
    (["task=bogus"], ConfigError, "task=bogus: must be one of eval, extract, index, search"),
    (["task=search"], ConfigError, "query.path=null: task=search needs a query image"),
    (["extract.num_shards=2"], ConfigError, "extract.num_shards=2: applies to task=extract only"),
    (["task=extract", "extract.num_shards=2", "extract.shard=2"], ConfigError,
     "extract.shard=2: must be in 0..1 (extract.num_shards=2)"),
    (["dataset.name=2024"], ConfigError, "dataset.name=2024: must be text (Hydra reads this one as a number"),
    (["dataset.generate={instances: 0}"], ConfigError, "dataset.generate.instances=0: must be an integer >= 1"),
]


@pytest.fixture
def no_extraction(monkeypatch):
    """Any extraction fails the test: the settings must be refused before it."""
    def extraction_ran(*args, **kwargs):
        raise AssertionError("extraction ran before the bad setting was refused")

    for module in (patchify.extraction, patchify.features):
        for name in ("extract_missing", "extract_pooled"):
            monkeypatch.setattr(module, name, extraction_ran)
    monkeypatch.setattr(patchify.tasks.search, "describe_images", extraction_ran)


@pytest.mark.parametrize("words,error,message", INVALID, ids=[" ".join(w) for w, _, _ in INVALID])
def test_invalid_setting_fails_before_any_extraction_in_one_line(words, error, message, smoke_overrides, tmp_path,
                                                                 no_extraction):
    with pytest.raises(error) as raised:
        run(compose_config(smoke_overrides + translate_argv(words)), tmp_path / "run")
    text = str(raised.value)
    assert text.startswith(message), text
    assert "\n" not in text and is_user_error(raised.value)


def test_schema_errors_come_before_the_dataset_is_read(tmp_path, no_extraction):
    """A bad setting is named even when the dataset folder does not exist: nothing is read first."""
    with pytest.raises(ConfigError, match=r"^pyramid\.level=7: "):
        run(compose_config(["experiment=smoke", f"dataset.root={tmp_path / 'missing'}", "dataset.generate=null",
                            f"paths.features={tmp_path / 'f'}", "pyramid.level=7"]), tmp_path / "run")
    assert not (tmp_path / "f").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("words,message", [
    (["--tile_size_res", "abc"], "pyramid.level=abc: must be an integer in 0..3"),
    (["model.layer=99"], "model.layer=99: must be -1"),
    (["--compute_metrics", "mAP, bogus"], "eval.metrics=[map, bogus]: unknown metric 'bogus'"),
])
def test_cli_answers_a_bad_setting_with_one_line_and_exit_2(words, message, tmp_path, ilias_fixture):
    """Through main.py, with paths.logs=~/logs (HOME in tmp): the run folder's ``~`` is expanded too."""
    home = tmp_path / "home"
    home.mkdir()
    done = subprocess.run(
        [sys.executable, "main.py", "experiment=smoke", f"dataset.root={ilias_fixture}", "dataset.generate=null",
         f"paths.features={tmp_path / 'features'}", f"paths.indices={tmp_path / 'indices'}", "paths.logs=~/logs",
         *words], cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "HOME": str(home)})
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and message in errors[0], done.stderr[-2000:]
    assert list((home / "logs").glob("*/run.log")), "the run folder is under the expanded ~/logs"
    assert not (ROOT / "~").exists()


# ----------------------------------------------------------------------------- the schema matches the yamls


def _undeclared(node: DictConfig, schema: type, prefix: str = "") -> list[str]:
    """Keys of ``node`` (recursively) that ``schema`` does not declare."""
    hints = get_type_hints(schema)
    declared = {f.name for f in fields(schema)}
    missing = [prefix + k for k in node if k not in declared]
    for f in fields(schema):
        inner = settings._unwrap_optional(hints[f.name])[0]
        value = node.get(f.name) if f.name in node else None
        if is_dataclass(inner) and isinstance(value, DictConfig):
            missing += _undeclared(value, inner, f"{prefix}{f.name}.")
        elif getattr(inner, "__origin__", None) is list and is_dataclass(inner.__args__[0]) and value is not None:
            for i, item in enumerate(value):
                missing += _undeclared(item, inner.__args__[0], f"{prefix}{f.name}[{i}].")
    return missing


def _group_overrides() -> list[list[str]]:
    runs = []
    for group in GROUPS:
        for option in sorted(p.stem for p in (CONFIGS / group).glob("*.yaml")):
            words = [f"{group}={option}"]
            if (group, option) == ("dataset", "folder"):
                words += ["dataset.root=photos", "task=index"]  # a folder is indexed, not evaluated
            runs.append(words)
    return runs + [[f"experiment={name}"] for name in EXPERIMENTS]


@pytest.mark.parametrize("words", _group_overrides(), ids=lambda w: w[0])
def test_every_config_group_and_experiment_passes_validate(words):
    cfg = compose_config(words)
    validate(cfg)
    assert _undeclared(cfg, Settings) == [], "declare the new key in src/patchify/settings.py"


def test_defaults_of_every_task_pass_validate():
    for task in ("eval", "extract", "index"):
        validate(compose_config([f"task={task}"]))
    validate(compose_config(["task=search", "query.path=photo.jpg"]))


def test_repeated_choices_agree_with_the_modules_that_own_them():
    from patchify import index, model, pool_cells, rerank, weights

    assert settings.TASKS == tuple(patchify.pipeline.TASKS)
    assert (settings.POOLS, settings.POOL_METHODS, settings.CELL_POSITIONS) == \
        (model.POOLS, pool_cells.POOL_METHODS, pool_cells.CELL_POSITIONS)
    assert settings.PACKAGED == tuple(weights.PACKAGED)
    assert (settings.INDEX_KINDS, settings.REFINES, settings.INDEX_METRICS) == \
        (index.KINDS, index.REFINES, tuple(index.METRICS))
    assert settings.RERANK_STAGES == rerank.STAGES


def test_messages_name_key_value_and_allowed_values():
    with pytest.raises(ConfigError) as raised:
        validate(compose_config(["pyramid.level=7"]))
    assert str(raised.value) == "pyramid.level=7: must be an integer in 0..3"
    with pytest.raises(ConfigError) as raised:
        validate(compose_config(translate_argv(["--compute_metrics", "mAP, bogus"])))
    assert str(raised.value) == "eval.metrics=[map, bogus]: unknown metric 'bogus' (choose from map, locscore, topk)"
    with pytest.raises(ConfigError, match=r"^dataset\.root=\?\?\?: required; must be a path$"):
        validate(compose_config(["dataset=folder", "task=index"]))
    with pytest.raises(ConfigError, match=r"^dataset\.generate\.colour=1: unknown setting \(known: distractors, "):
        validate(compose_config(["+dataset.generate.colour=1"]))
    with pytest.raises(ConfigError, match=r"^dataset\.root: Interpolation key 'nowhere' not found$"):
        validate(compose_config(["dataset.root=${nowhere}"]))


@pytest.mark.parametrize("value", ["default", "average", "AVERAGE", "0.5", "1", "[0.3,0.5]"])
def test_iou_threshold_accepts_what_metrics_resolves(value):
    from patchify.metrics import resolve_iou_thresholds

    cfg = compose_config([f"eval.iou_threshold={value}"])
    validate(cfg)
    assert resolve_iou_thresholds(cfg.eval.iou_threshold)


@pytest.mark.parametrize("words", [["extract.device=cuda:1"], ["index.kind=IVFPQ"], ["index.refine=null"],
                                   ["index=ivfpq", "index.refine=sq8"], ["index.shard=train"], ["--pq", "pq"],
                                   ["eval.metrics=[MAP,topk]"], ["--crop", "False"]])
def test_spellings_the_code_accepts_pass(words):
    validate(compose_config(translate_argv(words)))


# ----------------------------------------------------------------------------- model.layer against the backbone


@pytest.mark.parametrize("timm_name,layer,message", [
    ("test_vit", 6, r"block index in 0\.\.5 \(test_vit has 6 blocks\)"),
    ("tf_efficientnet_lite0", 5, r"block index in 0\.\.4 \(tf_efficientnet_lite0 has 5 stages\)"),
    ("test_vit", -3, r"model\.layer=-3: must be -1"),
])
def test_layer_outside_the_backbone_is_refused(timm_name, layer, message):
    import timm

    with torch.device("meta"):
        backbone = timm.create_model(timm_name, pretrained=False, num_classes=0)
    with pytest.raises(ModelConfigError, match=message):
        check_layer(backbone, layer)
    check_layer(backbone, -1)
    check_layer(backbone, layer - 1 if layer > 0 else 0)


# ----------------------------------------------------------------------------- ~ in path settings


def test_hydra_quoting_round_trips():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for text in ["~/Pictures", "it's", "a\\b", "ends\\", "q\\'x", 'd"q', "My Photos (2024), raw", "a=b", " x "]:
        assert parser.parse_override("k=" + hydra_quoted(text)).value() == text, text


def test_cli_quotes_a_home_path_for_hydra():
    assert translate_argv(["dataset.root=~/Pictures", "query=~/mug.jpg", "paths.logs=/abs", "~eval.k"]) == \
        ["dataset.root='~/Pictures'", "query.path='~/mug.jpg'", "paths.logs=/abs", "~eval.k"]


def test_path_settings_are_the_ones_users_pass():
    assert sorted(path_keys()) == sorted(["paths.home", "paths.features", "paths.indices", "paths.logs", "dataset.root",
                                          "dataset.distractors", "model.checkpoint", "query.path",
                                          "extract.import_features", "extract.export_features"])


def test_tilde_is_expanded_in_every_path_setting(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    words = [f"{key}=~/{key}" for key in path_keys()] + ["dataset.split=~keep"]
    cfg = compose_config(translate_argv(words))
    expand_paths(cfg)
    for key in path_keys():
        group, name = key.split(".")
        assert cfg[group][name] == f"{tmp_path}/{key}"
    assert cfg.dataset.split == "~keep"  # only path settings
    absolute = compose_config(translate_argv(["dataset.root=/data/x~1"]))
    expand_paths(absolute)
    assert absolute.dataset.root == "/data/x~1"  # only a leading ~


def test_index_and_search_a_folder_under_home(monkeypatch, tmp_path, ilias_fixture):
    """README's ``dataset.root=~/Pictures``: caches and bundle land under the expanded home, never in ./~."""
    home = tmp_path / "home"
    (home / "Pictures").mkdir(parents=True)
    images = sorted((ilias_fixture / "distractors").glob("*.jpg"))[:2]
    for image in images:
        shutil.copy(image, home / "Pictures" / image.name)
    monkeypatch.setenv("HOME", str(home))
    words = ["experiment=smoke", "dataset=folder", "dataset.root=~/Pictures", "paths.features=~/features",
             "paths.indices=~/indices", "pyramid.level=0"]
    summary = run(compose_config(translate_argv(words + ["task=index"])), tmp_path / "index")
    assert summary["images"] == 2
    assert any((home / "features").iterdir()) and any((home / "indices").iterdir())
    found = run(compose_config(translate_argv(words + ["task=search", f"query=~/Pictures/{images[0].name}"])),
                tmp_path / "search")
    assert found["queries"] == 1
    assert not Path("~").exists() and not (ROOT / "~").exists()


def test_an_override_hydra_cannot_parse_is_one_line_naming_it_before_hydra_starts(tmp_path):
    with pytest.raises(FlagError, match=r"^dataset.root=/x/my photos \(2024\), best: Hydra cannot parse this value .*"
                                        r"quote it inside the argument, e.g. 'dataset.root=\"/x/my photos \(2024\), best\"'$"):
        check_overrides(["task=index", "dataset.root=/x/my photos (2024), best", f"paths.logs={tmp_path}"])
    check_overrides(["-m", "pyramid.level=0,1,2", "extract.shard=range(4)", f"paths.logs={tmp_path}"])  # sweeps parse


def test_a_run_folder_that_cannot_be_made_is_one_line_before_hydra_starts(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(FlagError, match=r"a_file/logs: run folder is not writable .*paths.logs=DIR"):
        check_overrides([f"paths.logs={blocker / 'logs'}"])
