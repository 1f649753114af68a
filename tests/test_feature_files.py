"""Features computed elsewhere (src/patchify/feature_files.py, docs/FORMATS.md): exported by a pipeline run to
.npz and .h5, imported again with the same metrics; every bad file is one line naming the file and the field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, compose_config

from patchify.console import is_user_error
from patchify.feature_files import FeatureFileError, read_arrays, read_features, write_features
from patchify.pipeline import run
from patchify.settings import ConfigError

SCORES = ("mAP", "LocScore", "LocScore@0.4", "R@1", "R@5", "R@10", "P@10", "mAP_scale")


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature_files")


def overrides(home: Path, ilias: Path, *extra: str) -> list[str]:
    return ["experiment=smoke", f"dataset.root={ilias}", "dataset.generate=null", "dataset.name=fixture",
            f"paths.features={home / 'features'}", f"paths.indices={home / 'indices'}", f"paths.logs={home / 'logs'}",
            "eval.iou_threshold=average", *extra]


def evaluate_run(home: Path, ilias: Path, name: str, *extra: str) -> Path:
    run(compose_config(overrides(home, ilias, *extra)), home / name)
    return home / name


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def rankings_of(run_dir: Path) -> list[tuple[str, list[str]]]:
    return [(row["query_id"], row["ids"]) for row in map(json.loads, (run_dir / "results.jsonl").read_text().splitlines())]


@pytest.fixture(scope="module")
def exported(home, ilias_fixture) -> dict[str, Path]:
    """One L0-L1 pipeline run exporting its features to .npz, a second (from the cache) to .h5."""
    pytest.importorskip("h5py")
    level = ("pyramid.level=1", "dataset.distractors=distractors")
    first = evaluate_run(home, ilias_fixture, "pipeline", *level, f"extract.export_features={home / 'run.npz'}")
    evaluate_run(home, ilias_fixture, "pipeline_h5", *level, f"extract.export_features={home / 'run.h5'}")
    return {"run": first, "npz": home / "run.npz", "h5": home / "run.h5"}


def test_exported_file_holds_the_runs_features(exported):
    arrays = read_arrays(exported["npz"])
    assert arrays["query_ids"].dtype.kind == "U" and len(arrays["query_ids"]) == 4
    assert len(arrays["gallery_ids"]) == 4 * 3 + 4  # positives and distractors
    assert set(arrays["patch_level"].tolist()) == {0, 1}
    assert len(arrays["patch_vectors"]) == 16 * (1 + 4)  # L0 + L1 cells per image
    assert metrics_of(exported["run"])["counts"]["gallery_patches"] == len(arrays["patch_vectors"])
    h5 = read_arrays(exported["h5"])
    assert sorted(h5) == sorted(arrays)
    for name, value in arrays.items():
        assert np.array_equal(h5[name], value), name


@pytest.mark.parametrize("container", ["npz", "h5"])
def test_imported_features_score_as_the_pipeline(exported, home, ilias_fixture, container):
    pipeline = metrics_of(exported["run"])
    imported_dir = evaluate_run(home, ilias_fixture, f"imported_{container}", "dataset.distractors=distractors",
                                f"extract.import_features={exported[container]}")
    imported = metrics_of(imported_dir)
    assert pipeline["mAP"] > 0 and pipeline["LocScore"] > 0
    for key in SCORES:
        assert imported[key] == pipeline[key], key
    assert rankings_of(imported_dir) == rankings_of(exported["run"])
    assert imported["features"]["boxes"] is True and imported["features"]["levels"] == [0, 1]
    assert imported["counts"]["levels"] == [0, 1] and imported["counts"]["extracted_images"] == 0


def test_global_features_evaluate_without_locscore(exported, home, ilias_fixture):
    arrays = read_arrays(exported["npz"])
    whole = arrays["patch_level"] == 0
    path = write_features(home / "global.npz", query_ids=arrays["query_ids"], query_vectors=arrays["query_vectors"],
                          gallery_ids=arrays["gallery_ids"], patch_vectors=arrays["patch_vectors"][whole],
                          patch_ids=arrays["gallery_ids"][arrays["patch_image"][whole]])  # no boxes, no levels
    imported = metrics_of(evaluate_run(home, ilias_fixture, "global", "dataset.distractors=distractors",
                                       f"extract.import_features={path}"))
    l0 = metrics_of(evaluate_run(home, ilias_fixture, "pipeline_l0", "dataset.distractors=distractors",
                                 "pyramid.level=0"))
    assert imported["mAP"] == l0["mAP"] and imported["R@1"] == l0["R@1"]
    assert imported["LocScore"] is None and "LocScore@0.4" not in imported
    assert "patch_boxes" in imported["not_available"]["LocScore"]
    assert isinstance(l0["LocScore"], float)  # the pipeline has boxes (whole images at L0); the file has none


def test_vectors_are_normalised_as_the_encoders(home):
    rng = np.random.default_rng(0)
    path = write_features(home / "scaled.npz", query_ids=["q"], query_vectors=rng.normal(size=(1, 8)) * 7,
                          gallery_ids=["a", "b"], patch_vectors=rng.normal(size=(3, 8)).astype(np.float16),
                          patch_image=np.array([0, 1, 1]))
    features = read_features(path)
    assert features.query_vectors.dtype == np.float32 and features.patch_vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(features.patch_vectors, axis=1), 1, atol=1e-6)
    assert np.allclose(np.linalg.norm(features.query_vectors, axis=1), 1, atol=1e-6)


# ----------------------------------------------------------------------------- one-line errors

def fixture_arrays(exported) -> dict[str, np.ndarray]:
    return {name: value.copy() for name, value in read_arrays(exported["npz"]).items()}


def broken(arrays: dict, case: str) -> dict:
    """``arrays`` with one thing wrong."""
    if case == "missing field":
        del arrays["query_vectors"]
    elif case == "wrong dtype":
        arrays["patch_vectors"] = (arrays["patch_vectors"] * 100).astype(np.int32)
    elif case == "wrong shape":
        arrays["query_vectors"] = arrays["query_vectors"][:-1]
    elif case == "nan":
        arrays["patch_vectors"][5, 2] = np.nan
    elif case == "inf":
        arrays["query_vectors"][1, 0] = np.inf
    elif case == "zero vector":
        arrays["patch_vectors"][3] = 0
    elif case == "dimension mismatch":
        arrays["query_vectors"] = np.concatenate([arrays["query_vectors"], arrays["query_vectors"]], axis=1)
    elif case == "duplicate ids":
        arrays["gallery_ids"][2] = arrays["gallery_ids"][1]
    elif case == "patch image out of range":
        arrays["patch_image"][0] = len(arrays["gallery_ids"])
    elif case == "bad box":
        arrays["patch_boxes"][4, 2] = -1
    elif case == "both patch_image and patch_ids":
        arrays["patch_ids"] = arrays["gallery_ids"][arrays["patch_image"]]
    elif case == "object ids":
        arrays["query_ids"] = arrays["query_ids"].astype(object)
    else:
        raise AssertionError(case)
    return arrays


FILE_CASES = {  # case -> (field named, words of the problem)
    "missing field": ("'query_vectors'", "missing field"),
    "wrong dtype": ("'patch_vectors'", "expected floats"),
    "wrong shape": ("'query_vectors'", "rows, but query_ids has"),
    "nan": ("'patch_vectors'", "row 5 holds NaN or inf"),
    "inf": ("'query_vectors'", "row 1 holds NaN or inf"),
    "zero vector": ("'patch_vectors'", "row 3 is all zeros"),
    "dimension mismatch": ("'patch_vectors'", "differs from query_vectors'"),
    "duplicate ids": ("'gallery_ids'", "appears 2 times"),
    "patch image out of range": ("'patch_image'", "row 0 is 16, outside 0..15"),
    "bad box": ("'patch_boxes'", "row 4 is"),
    "both patch_image and patch_ids": ("patch_image and patch_ids", "exactly one"),
    "object ids": ("'query_ids'", "object array"),
}


def save_npz(path: Path, arrays: dict) -> Path:
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def one_line_error(run_dir_error: BaseException, path: Path, *words: str) -> None:
    message = str(run_dir_error)
    assert is_user_error(run_dir_error) and "\n" not in message, message
    assert message.startswith(str(path)) or str(path) in message, message
    for word in words:
        assert word in message, (word, message)


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_a_bad_file_is_one_line_naming_file_and_field(exported, home, ilias_fixture, case):
    path = save_npz(home / f"bad_{case.replace(' ', '_')}.npz", broken(fixture_arrays(exported), case))
    with pytest.raises(FeatureFileError) as caught:
        run(compose_config(overrides(home, ilias_fixture, "dataset.distractors=distractors",
                                     f"extract.import_features={path}")), home / f"bad_{case}")
    one_line_error(caught.value, path, *FILE_CASES[case])


def test_ids_that_are_not_in_the_dataset_are_named(exported, home, ilias_fixture):
    arrays = fixture_arrays(exported)
    arrays["gallery_ids"][3] = "thing_009/pos/X.jpg"
    path = save_npz(home / "unknown_gallery.npz", arrays)
    with pytest.raises(FeatureFileError) as caught:
        run(compose_config(overrides(home, ilias_fixture, "dataset.distractors=distractors",
                                     f"extract.import_features={path}")), home / "unknown")
    one_line_error(caught.value, path, "'gallery_ids'", "'thing_009/pos/X.jpg' is not a gallery image")


def test_a_dataset_query_without_a_vector_is_named(exported, home, ilias_fixture):
    arrays = fixture_arrays(exported)
    first = str(arrays["query_ids"][0])
    arrays["query_ids"], arrays["query_vectors"] = arrays["query_ids"][1:], arrays["query_vectors"][1:]
    path = save_npz(home / "query_missing.npz", arrays)
    with pytest.raises(FeatureFileError) as caught:
        run(compose_config(overrides(home, ilias_fixture, "dataset.distractors=distractors", "extract.missing_features=skip",
                                     f"extract.import_features={path}")), home / "query_missing")
    one_line_error(caught.value, path, f"dataset query {first!r} has no vector", "1 queries missing")


def test_gallery_images_without_features_are_an_error_unless_skipped(exported, home, ilias_fixture):
    arrays = fixture_arrays(exported)
    lacking = str(arrays["gallery_ids"][-1])  # a distractor
    keep = arrays["patch_image"] != len(arrays["gallery_ids"]) - 1
    for name in ("patch_vectors", "patch_image", "patch_boxes", "patch_level"):
        arrays[name] = arrays[name][keep]
    path = save_npz(home / "gallery_missing.npz", arrays)
    settings = overrides(home, ilias_fixture, "dataset.distractors=distractors", f"extract.import_features={path}")
    with pytest.raises(FeatureFileError) as caught:
        run(compose_config(settings), home / "gallery_missing")
    one_line_error(caught.value, path, f"gallery image {lacking!r} has no patch", "extract.missing_features=skip")
    run(compose_config([*settings, "extract.missing_features=skip"]), home / "gallery_skipped")
    metrics = metrics_of(home / "gallery_skipped")
    assert metrics["counts"]["skipped_images"] == [f"{lacking}: no features in {path.name}"]
    assert all(lacking not in ids for _, ids in rankings_of(home / "gallery_skipped"))


def test_missing_h5py_names_the_extra(home, monkeypatch):
    path = home / "any.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n")
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py raises ImportError
    with pytest.raises(FeatureFileError) as caught:
        read_arrays(path)
    one_line_error(caught.value, path, 'pip install "patchify[hdf5]"')


def test_settings_refuse_what_imported_features_cannot_do(home, ilias_fixture):
    cases = {("task=extract", "extract.import_features=f.npz"): "applies to task=eval only",
             ("extract.import_features=f.txt",): "a path ending in .npz, .h5 or .hdf5",
             ("rerank=refine", "extract.import_features=f.npz"): "refine encodes windows with the encoder",
             ("index=ivfpq", "index.shards=2", "extract.import_features=f.npz"): "index.shards=2"}
    for extra, words in cases.items():
        with pytest.raises(ConfigError) as caught:
            run(compose_config(overrides(home, ilias_fixture, *extra)), home / "refused")
        assert words in str(caught.value) and "\n" not in str(caught.value), str(caught.value)


def test_settings_repeat_the_modules_choices():
    from patchify import feature_files, settings

    assert settings.MISSING_FEATURES == feature_files.MISSING_CHOICES
    assert settings.FEATURE_FILE_SUFFIXES == tuple(feature_files.SUFFIXES)


def test_cli_answers_a_bad_feature_file_with_one_line_and_exit_2(exported, home, ilias_fixture):
    path = save_npz(home / "cli_nan.npz", broken(fixture_arrays(exported), "nan"))
    done = subprocess.run([sys.executable, "main.py", *overrides(home, ilias_fixture, "dataset.distractors=distractors",
                                                                  f"extract.import_features={path}")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and str(path) in errors[0] and "'patch_vectors': row 5 holds NaN" in errors[0], errors
