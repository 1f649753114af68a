"""Bad input answers with one line naming the file and the problem, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, compose_config

from patchify.cache import CacheError
from patchify.data import ImageRecord
from patchify.extraction import FeatureStore
from patchify.pipeline import run


def test_cli_prints_one_line_and_exits_2_for_a_missing_dataset(tmp_path):
    missing = tmp_path / "no_such_dataset"
    done = subprocess.run(
        [sys.executable, "main.py", "experiment=smoke", f"dataset.root={missing}", "dataset.generate=null",
         f"paths.logs={tmp_path / 'logs'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and str(missing) in errors[0] and "dataset folder not found" in errors[0]


def test_cli_rejects_an_unknown_reference_flag(tmp_path):
    done = subprocess.run([sys.executable, "main.py", "--tile_size", "3"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "--tile_size" in done.stderr


def test_cached_features_of_another_dimension_are_refused(tmp_path, ilias_fixture):
    record = ImageRecord(id="a.jpg", path=next((ilias_fixture / "distractors").glob("*.jpg")))
    store = FeatureStore(tmp_path, "m", {"weights": "x"}, level=0, mode="crop", region="full")
    store.open()
    store.write_chunk([record], counts=[1],
                      vectors=np.ones((1, 8), np.float32), boxes=np.zeros((1, 4), np.float32), errors=[""], dim=8)
    with pytest.raises(CacheError, match=r"chunk-0000-[^:]*\.npz: feature dimension 8 does not match the model's 16"):
        store.gather([record], expected_dim=16)


def test_search_index_of_another_model_is_refused(tmp_path, ilias_fixture):
    folder = ilias_fixture / "distractors"
    base = ["experiment=smoke", "dataset=folder", f"dataset.root={folder}", f"paths.features={tmp_path / 'f'}",
            f"paths.indices={tmp_path / 'i'}", "pyramid.level=0"]
    run(compose_config(base + ["task=index"]), tmp_path / "a")
    # Another layer is another model fingerprint: its index is looked up under another key.
    with pytest.raises(Exception, match="run task=index first"):
        run(compose_config(base + ["task=search", f"query.path={next(folder.glob('*.jpg'))}", "model.layer=0"]),
            tmp_path / "b")


def test_unreachable_hub_is_one_line_error(monkeypatch):
    import timm

    from patchify.model import ModelConfigError, load_model

    def offline(*args, **kwargs):
        raise FileNotFoundError("An error happened while trying to locate the file on the Hub")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ModelConfigError, match="model.checkpoint=FILE.*HF_HUB_OFFLINE"):
        load_model(compose_config(["model=siglip"]).model, device="cpu")
