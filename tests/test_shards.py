"""Sharded extraction: N independent task=extract runs fill the caches a single run would."""

from __future__ import annotations

import pytest
from conftest import ROOT, compose_config
from hydra import compose, initialize_config_dir

from patchify.pipeline import ConfigError, run
from patchify.tasks.extract import shard_of


def test_shards_are_contiguous_and_cover_everything():
    records = list(range(10))
    parts = [shard_of(records, i, 4) for i in range(4)]
    assert sum(parts, []) == records and [len(p) for p in parts] == [2, 3, 2, 3]
    with pytest.raises(ConfigError, match="extract.shard"):
        shard_of(records, 4, 4)


def test_four_shards_equal_one_run(smoke_overrides, tmp_path):
    base = smoke_overrides + ["pyramid.level=1"]
    for shard in range(4):
        summary = run(compose_config(base + ["task=extract", "extract.num_shards=4", f"extract.shard={shard}"]),
                      tmp_path / f"shard{shard}")
        assert summary["extracted"] == 1 + 4  # 1 query + 4 gallery images (L0 and L1 in one pass)
    sharded = run(compose_config(base), tmp_path / "eval")
    assert sharded["counts"]["extracted_images"] == 0
    single = run(compose_config(base + [f"paths.features={tmp_path / 'single'}"]), tmp_path / "single_eval")
    assert sharded["mAP"] == pytest.approx(single["mAP"]) and sharded["LocScore"] == pytest.approx(single["LocScore"])
    names = {p.name.split("-")[1] for p in (tmp_path / "features").glob("*/chunk-*.npz")}
    assert names == {"0000", "0001", "0002", "0003"}  # each shard wrote files of its own


def test_shards_only_for_extract(smoke_overrides, tmp_path):
    with pytest.raises(ConfigError, match="task=extract only"):
        run(compose_config(smoke_overrides + ["extract.num_shards=2"]), tmp_path / "run")


def test_slurm_launcher_config_composes():
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert "submitit" in cfg.hydra.launcher._target_ and cfg.hydra.launcher.array_parallelism == 64
