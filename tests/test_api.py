"""The Python API (docs/API.md): load_encoder, PatchIndex, evaluate, and ``patchify evaluate``.

The API must give the command line's own numbers: an index built by the API returns the ids, scores
and boxes of ``task=eval`` / ``task=index`` + ``task=search`` for the same settings (smoke model), and
``patchify evaluate`` on a run folder reproduces its metrics.json.
"""

from __future__ import annotations

import doctest
import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, compose_config
from PIL import Image

import patchify
from patchify.api import evaluation
from patchify.bundle import read_bundle
from patchify.data import DataError
from patchify.index import IndexConfigError
from patchify.pipeline import run
from patchify.settings import ConfigError

METRIC_KEYS = ("mAP", "LocScore", "LocScore@0.2", "LocScore@0.4", "LocScore@0.6", "R@1", "R@5", "R@10", "P@10")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, ilias_fixture):
    """One ``task=eval`` run (smoke model, L3, exact) on the ILIAS fixture: its overrides and run folder."""
    home = tmp_path_factory.mktemp("api")
    overrides = ["experiment=smoke", f"dataset.root={ilias_fixture}", "dataset.generate=null", "dataset.name=fixture",
                 f"paths.features={home / 'features'}", f"paths.indices={home / 'indices'}", f"paths.logs={home / 'logs'}"]
    run(compose_config(overrides), home / "run")
    return {"overrides": overrides, "run": home / "run", "home": home}


@pytest.fixture(scope="module")
def encoder():
    """The smoke experiment's encoder (timm's tiny random test ViT, fp32), with its own temporary cache."""
    return patchify.load_encoder("test_vit", config=["experiment=smoke"])


def _manifest(run_dir: Path, name: str) -> list[dict]:
    return json.loads((run_dir / f"{name}.json").read_text())["images"]


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = evaluation.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ----------------------------------------------------------------------------- evaluate: the pipeline's own numbers

@pytest.mark.parametrize("args", [["{run}", "--dataset", "{data}"], ["{run}"],
                                  ["{run}/similarity.json", "--boxes", "{run}/results.jsonl", "--dataset", "{data}",
                                   "--k", "100"]],
                         ids=["run-folder", "run-folder-own-ground-truth", "ilias-similarity-file-plus-boxes"])
def test_evaluate_cli_reproduces_the_runs_metrics(smoke, ilias_fixture, capsys, args):
    argv = [a.format(run=smoke["run"], data=ilias_fixture) for a in args] + ["--json"]
    code, out, _ = _cli(argv, capsys)
    assert code == 0
    got, expected = json.loads(out), json.loads((smoke["run"] / "metrics.json").read_text())
    assert got["num_queries"] == 4 and got["k"] == expected["k"] == 100
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(expected[key], abs=1e-9), key
    for group, value in expected["mAP_scale"].items():
        assert got["mAP_scale"][group] == pytest.approx(value, abs=1e-9) if value is not None else got["mAP_scale"][group] is None


def test_evaluate_cli_prints_the_pipelines_table(smoke, capsys):
    code, out, _ = _cli([str(smoke["run"])], capsys)
    metrics = json.loads((smoke["run"] / "metrics.json").read_text())
    assert code == 0
    assert out.splitlines()[0].split() == ["run", "mAP", "LocScore@0.4", "LocScore", "R@1"]
    row = out.splitlines()[2].split()
    assert row[0] == "fixture.test_vit.L3-pyramid.flat"
    assert [float(v) for v in row[1:]] == [round(metrics[k], 2) for k in ("mAP", "LocScore@0.4", "LocScore", "R@1")]


# ----------------------------------------------------------------------------- evaluate: hand-computed LocScore

GROUND_TRUTH = {"q1": {"a": [[0, 0, 10, 10]], "b": [[0, 0, 10, 10]]}, "q2": {"d": [[10, 10, 20, 20]]}}
# q1: a (rank 1, IoU 1), x (negative), b (rank 3, IoU 50/150 = 1/3); q2: y (negative), d (rank 2, IoU 1).
RESULTS = [{"query_id": "q1", "ids": ["a", "x", "b"], "boxes": [[0, 0, 10, 10], [0, 0, 5, 5], [5, 0, 10, 10]]},
           {"query_id": "q2", "ids": ["y", "d"], "boxes": [[0, 0, 1, 1], [10, 10, 20, 20]]}]
# AP: q1 (1/1 + 2/3) / 2 = 5/6, q2 (1/2) / 1 = 1/2 -> mAP 2/3.
# LocScore@tau: q1 counts b only for tau <= 1/3: 5/6 at 0.2, 0.3; 1/2 at 0.4, 0.5, 0.6. q2: 1/2 at every tau.
# LocScore@0.4 = (1/2 + 1/2) / 2 = 1/2; averaged over 0.2..0.6: q1 (2 * 5/6 + 3 * 1/2) / 5 = 19/30 -> (19/30 + 1/2) / 2.
HAND = {"mAP": 100 * 2 / 3, "LocScore@0.4": 50.0, "LocScore@0.2": 100 * (5 / 6 + 1 / 2) / 2,
        "LocScore": 100 * (19 / 30 + 1 / 2) / 2, "R@1": 50.0, "P@10": 15.0}


def _write(path: Path, content) -> Path:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_hand_made_results_file_with_boxes(tmp_path, capsys):
    results = _write(tmp_path / "results.jsonl", "\n".join(json.dumps(r) for r in RESULTS) + "\n")
    truth = _write(tmp_path / "truth.json", GROUND_TRUTH)
    code, out, _ = _cli([str(results), "--ground-truth", str(truth), "--json"], capsys)
    assert code == 0
    got = json.loads(out)
    for key, value in HAND.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


def test_every_results_form_gives_the_same_numbers(tmp_path):
    similarity = {r["query_id"]: {i: 1.0 - 0.1 * n for n, i in enumerate(r["ids"])} for r in RESULTS}
    boxes = {r["query_id"]: [{"id": i, "box": b} for i, b in zip(r["ids"], r["boxes"])] for r in RESULTS}
    forms = {
        "rows": patchify.evaluate(RESULTS, GROUND_TRUTH),
        "objects": patchify.evaluate(boxes, GROUND_TRUTH),
        "similarity-plus-boxes": patchify.evaluate(similarity, GROUND_TRUTH, boxes=boxes),
        "files": patchify.evaluate(_write(tmp_path / "s.json", similarity), _write(tmp_path / "t.json", GROUND_TRUTH),
                                   boxes=_write(tmp_path / "b.json", boxes)),
    }
    for name, got in forms.items():
        for key, value in HAND.items():
            assert got[key] == pytest.approx(value, abs=1e-9), (name, key)


def test_similarity_form_is_ranked_by_score(tmp_path):
    reversed_scores = {"q1": {"b": 0.1, "x": 0.5, "a": 0.9}, "q2": {"d": 0.2, "y": 0.3}}
    got = patchify.evaluate(reversed_scores, GROUND_TRUTH)
    assert got["mAP"] == pytest.approx(HAND["mAP"], abs=1e-9)
    assert "LocScore" not in got  # no boxes: mAP and top-k only


def test_missing_query_scores_zero_and_is_listed():
    got = patchify.evaluate(RESULTS[:1], GROUND_TRUTH, iou=0.4)
    assert got["missing_queries"] == ["q2"]
    assert got["mAP"] == pytest.approx(100 * (5 / 6) / 2, abs=1e-9)
    assert got["LocScore@0.4"] == pytest.approx(100 * (1 / 2) / 2, abs=1e-9)


BAD_RESULTS = {
    "not-json.jsonl": ('{"query_id": "q1", "ids": ["a"]}\n{"query_id": q2}\n', "not-json.jsonl:2: not JSON"),
    "twice.jsonl": ('{"query_id": "q1", "ids": ["a", "b", "a"]}\n', "id 'a' is ranked twice"),
    "short-box.jsonl": ('{"query_id": "q1", "ids": ["a"], "boxes": [[1, 2, 3]]}\n', "a box must be [x, y, w, h]"),
    "box-count.jsonl": ('{"query_id": "q1", "ids": ["a", "b"], "boxes": [[1, 2, 3, 4]]}\n', "one box per id (2)"),
    "unknown-query.json": ('{"nobody": ["a"]}', "query 'nobody' is not a query of"),
    "bad-score.json": ('{"q1": {"a": "high"}}', "scores must be finite numbers"),
    "empty.jsonl": ("\n", "empty results file"),
}


@pytest.mark.parametrize("name", sorted(BAD_RESULTS))
def test_bad_results_file_is_one_line_naming_it(tmp_path, capsys, name):
    content, problem = BAD_RESULTS[name]
    path = _write(tmp_path / name, content)
    truth = _write(tmp_path / "truth.json", GROUND_TRUTH)
    code, out, err = _cli([str(path), "--ground-truth", str(truth)], capsys)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert err.startswith(f"error: {path}") and problem in err


@pytest.mark.parametrize("args, problem", [
    (["{results}", "--dataset", "{tmp}/nowhere"], "dataset folder not found"),
    (["{results}", "--dataset", "{tmp}"], "not a dataset in ILIAS layout"),
    (["{results}", "--ground-truth", "{tmp}/results.jsonl"], "not a JSON ground-truth file"),
    (["{results}"], "no ground truth given"),
    (["{tmp}/missing.jsonl", "--ground-truth", "{tmp}/truth.json"], "results file not found"),
])
def test_bad_ground_truth_or_paths_are_one_line(tmp_path, capsys, args, problem):
    _write(tmp_path / "results.jsonl", "\n".join(json.dumps(r) for r in RESULTS))
    _write(tmp_path / "truth.json", GROUND_TRUTH)
    code, _, err = _cli([a.format(tmp=tmp_path, results=tmp_path / "results.jsonl") for a in args], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and problem in err, err


def test_console_script_dispatches_evaluate(tmp_path):
    """``python main.py evaluate`` (= ``patchify evaluate``): argparse, not Hydra; a mistake is one line, exit 2."""
    bad = _write(tmp_path / "bad.jsonl", '{"query_id": "q1", "ids": "a"}\n')
    truth = _write(tmp_path / "truth.json", GROUND_TRUTH)
    done = subprocess.run([sys.executable, str(ROOT / "main.py"), "evaluate", str(bad), "--ground-truth", str(truth)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip() == f"error: {bad}: row 1 (query q1): 'ids' must be a list of gallery ids (strings)"


# ----------------------------------------------------------------------------- PatchIndex from arrays

def test_from_vectors_scores_each_image_by_its_best_patch():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(40, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    owners = [f"img{i // 5}" for i in range(40)]  # 8 images x 5 patches
    boxes = rng.uniform(0, 100, size=(40, 4)).astype(np.float32)
    index = patchify.PatchIndex.from_vectors(vectors, owners, boxes)
    queries = rng.normal(size=(3, 16)).astype(np.float32)
    for query, hits in zip(queries, index.search(queries, k=4)):
        sims = vectors @ query
        best = {f"img{i}": int(np.argmax(sims[i * 5:(i + 1) * 5])) + i * 5 for i in range(8)}
        order = sorted(best, key=lambda image: -sims[best[image]])[:4]
        assert hits.ids == order
        np.testing.assert_allclose(hits.scores, [sims[best[i]] for i in order], rtol=1e-5)
        np.testing.assert_array_equal(hits.boxes, boxes[[best[i] for i in order]])
    single = index.search(queries[0], k=2)  # a vector gives one Hits, a matrix a list
    assert single.ids == index.search(queries[:1], k=2)[0].ids and len(index) == 8 and index.ntotal == 40


@pytest.mark.parametrize("kind, settings", [("pq", {"m": 4, "nbits": 4}), ("ivfpq", {"m": 4, "nbits": 4, "nlist": 4}),
                                            ("IVF4,Flat", {"nprobe": 4}), ("HNSW8", {}),
                                            ("pq", {"m": 4, "nbits": 4, "refine": "Flat"})])
def test_from_vectors_builds_every_index_kind(kind, settings, faiss_single_thread):
    rng = np.random.default_rng(1)
    vectors = np.repeat(rng.normal(size=(100, 16)), 4, axis=0) + rng.normal(scale=0.05, size=(400, 16))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)  # 100 images x 4 patches
    index = patchify.PatchIndex.from_vectors(vectors, [i // 4 for i in range(400)], index=kind, **settings)
    hits = index.search(vectors[[0, 40, 200]], k=3)
    assert [h.ids[0] for h in hits] == ["0", "10", "50"]  # each query's own image first
    assert np.isnan(hits[0].boxes).all()  # built without boxes


@pytest.mark.parametrize("call, problem", [
    (lambda v: patchify.PatchIndex.from_vectors(v, ["a"] * 3), "10 vectors but 3 image ids"),
    (lambda v: patchify.PatchIndex.from_vectors(v, ["a"] * 10, np.zeros((10, 3))), "boxes must be (n, 4)"),
    (lambda v: patchify.PatchIndex.from_vectors(v, ["a"] * 10, index="pq", m=3), "does not divide"),
    (lambda v: patchify.PatchIndex.from_vectors(v, ["a"] * 10, index="flat", nlists=3), "unknown setting nlists=3"),
    (lambda v: patchify.PatchIndex.from_vectors(v, ["a"] * 10, index="NoSuchIndex"), "FAISS cannot build"),
    (lambda v: patchify.PatchIndex.from_vectors(v, ["a"] * 10).search(np.zeros(5), 1), "do not match the index"),
    (lambda v: patchify.PatchIndex.from_vectors(v, ["a"] * 10).search("query.jpg", 1), "needs an encoder"),
])
def test_index_mistakes_are_one_line(call, problem):
    with pytest.raises(IndexConfigError, match=None) as caught:
        call(np.eye(10, 8, dtype=np.float32))
    assert problem in str(caught.value) and "\n" not in str(caught.value)


# ----------------------------------------------------------------------------- PatchIndex from images = the CLI

def test_index_from_images_equals_task_eval(smoke, encoder, ilias_fixture):
    """Same gallery, smoke settings: ids and scores of similarity.json and boxes of results.jsonl, exactly."""
    gallery, queries = _manifest(smoke["run"], "gallery"), _manifest(smoke["run"], "query")
    index = patchify.PatchIndex.from_images([ilias_fixture / g["path"] for g in gallery], encoder,
                                            ids=[g["id"] for g in gallery])
    assert index.ntotal == 16 * 30
    hits = index.search([ilias_fixture / q["path"] for q in queries], k=100)
    similarity = json.loads((smoke["run"] / "similarity.json").read_text())
    rows = {row["query_id"]: row for row in map(json.loads, (smoke["run"] / "results.jsonl").read_text().splitlines())}
    for query, found in zip(queries, hits):
        expected = similarity[query["id"]]
        assert found.ids == list(expected) == rows[query["id"]]["ids"]
        np.testing.assert_array_equal(found.scores, np.asarray(list(expected.values()), np.float32))
        np.testing.assert_array_equal(found.boxes, rows[query["id"]]["boxes"])
    # and its results score as the run did
    api_results = [{"query_id": q["id"], "ids": h.ids, "boxes": h.boxes.tolist()} for q, h in zip(queries, hits)]
    metrics = json.loads((smoke["run"] / "metrics.json").read_text())
    got = patchify.evaluate(api_results, ilias_fixture, k=100)
    assert got["mAP"] == pytest.approx(metrics["mAP"], abs=1e-9)
    assert got["LocScore"] == pytest.approx(metrics["LocScore"], abs=1e-9)


def test_pq_index_from_images_equals_task_eval(smoke, encoder, ilias_fixture, faiss_single_thread):
    """index=pq: the same seeded training sample and k-means seed as the CLI, so the same codes and scores."""
    run_dir = smoke["home"] / "run-pq"
    run(compose_config(smoke["overrides"] + ["index=pq", "index.m=8"]), run_dir)
    gallery, queries = _manifest(run_dir, "gallery"), _manifest(run_dir, "query")
    index = patchify.PatchIndex.from_images([ilias_fixture / g["path"] for g in gallery], encoder, index="pq", m=8,
                                            ids=[g["id"] for g in gallery])
    similarity = json.loads((run_dir / "similarity.json").read_text())
    for query, found in zip(queries, index.search([ilias_fixture / q["path"] for q in queries], k=100)):
        assert found.ids == list(similarity[query["id"]])
        np.testing.assert_allclose(found.scores, list(similarity[query["id"]].values()), rtol=0, atol=1e-6)


def test_index_from_folder_equals_task_index_and_search(smoke, encoder, ilias_fixture, tmp_path):
    folder = ilias_fixture / "ilias_core" / "thing_001"
    query = folder / "query" / "Q001_00.jpg"
    overrides = [o for o in smoke["overrides"] if not o.startswith("dataset.")] + [
        "dataset=folder", f"dataset.root={folder}", f"paths.logs={tmp_path}"]
    run(compose_config(overrides + ["task=index"]), tmp_path / "index")
    run(compose_config(overrides + ["task=search", f"query.path={query}", "query.top_k=4"]), tmp_path / "search")
    cli = json.loads((tmp_path / "search" / "search.json").read_text())["queries"][0]["results"]
    bundle_folder = Path(json.loads((tmp_path / "index" / "index.json").read_text())["bundle"])
    bundle = read_bundle(bundle_folder, dim=encoder.dim)

    index = patchify.PatchIndex.from_images(folder, encoder)
    np.testing.assert_array_equal(index.ids, bundle.gallery["ids"])
    np.testing.assert_array_equal(index.patch_image, bundle.gallery["patch_image"])
    np.testing.assert_array_equal(index.boxes, bundle.gallery["boxes"])
    np.testing.assert_array_equal(index.index.reconstruct_n(0, index.ntotal), bundle.index.reconstruct_n(0, bundle.index.ntotal))
    hits = index.search(query, k=4)
    assert hits.ids == [h["id"] for h in cli] and hits.paths == [h["path"] for h in cli]
    np.testing.assert_allclose(hits.scores, [h["score"] for h in cli], atol=5e-5)  # search.json rounds to 4 places
    np.testing.assert_allclose(hits.boxes, [h["box"] for h in cli], atol=0.05)


def test_save_and_load_round_trip(encoder, ilias_fixture, tmp_path):
    folder = ilias_fixture / "ilias_core" / "thing_002"
    query = folder / "query" / "Q002_00.jpg"
    index = patchify.PatchIndex.from_images(folder, encoder, level=1)
    before = index.search(query, k=3)
    index.save(tmp_path / "saved")
    loaded = patchify.PatchIndex.load(tmp_path / "saved")  # no encoder given: the saved settings load one
    after = loaded.search(query, k=3)
    assert after.ids == before.ids and after.paths == before.paths
    np.testing.assert_array_equal(after.scores, before.scores)
    np.testing.assert_array_equal(after.boxes, before.boxes)
    assert loaded.settings == index.settings and list(loaded.levels) == [0, 1] and loaded.ntotal == 4 * 5
    # an index from arrays saves without an encoder and keeps its boxes
    vectors = encoder.describe([query, folder / "pos" / "P002_00.jpg"])
    arrays = patchify.PatchIndex.from_vectors(vectors, ["q", "p"], [[0, 0, 1, 1], [2, 2, 3, 3]])
    arrays.save(tmp_path / "arrays")
    back = patchify.PatchIndex.load(tmp_path / "arrays").search(vectors[1], k=2)
    assert back.ids == ["p", "q"] and back.boxes[0].tolist() == [2, 2, 3, 3] and back.paths is None


def test_load_refuses_what_is_not_a_saved_index(tmp_path):
    with pytest.raises(DataError, match=r"no saved PatchIndex here"):
        patchify.PatchIndex.load(tmp_path)


# ----------------------------------------------------------------------------- encoder

def test_encoder_describes_paths_and_pil_images_alike(encoder, ilias_fixture):
    path = ilias_fixture / "ilias_core" / "thing_000" / "query" / "Q000_00.jpg"
    with Image.open(path) as image:
        from_pil = encoder.describe(image.convert("RGB"))
    from_path = encoder.describe(path)
    assert from_path.shape == (1, encoder.dim)
    np.testing.assert_array_equal(from_pil, from_path)
    np.testing.assert_allclose(np.linalg.norm(from_path, axis=1), 1.0, rtol=1e-5)
    patches = encoder.patches(path, level=2, multi_scale="single")
    assert patches.vectors.shape == (9, encoder.dim) and patches.boxes[0].tolist() == [0, 0, 67, 53]


def test_encoder_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"model.colour=red: unknown model setting"):
        patchify.load_encoder("test_vit", colour="red")
    bad = _write(tmp_path / "bad.jpg", "not an image")
    encoder = patchify.load_encoder("test_vit", config=["experiment=smoke"], cache=tmp_path / "cache")
    with pytest.raises(DataError, match=rf"{bad}: unreadable image"):
        encoder.describe(bad)


def test_version_and_lazy_names():
    assert patchify.__version__ == metadata.version("patchify")
    assert {"load_encoder", "PatchIndex", "evaluate"} <= set(dir(patchify))
    done = subprocess.run([sys.executable, "-c", "import sys, patchify; print('torch' in sys.modules)"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.stdout.strip() == "False"  # import patchify stays light; the API loads on first use


# ----------------------------------------------------------------------------- docs/API.md runs as written

def test_api_docs_examples_run(tmp_path, monkeypatch):
    """Every ```pycon block of docs/API.md, in order, as one doctest (``# doctest: +SKIP`` marks the slow one)."""
    monkeypatch.chdir(tmp_path)
    page = ROOT / "docs" / "API.md"
    blocks = re.findall(r"^```pycon\n(.*?)^```", page.read_text(), flags=re.S | re.M)
    test = doctest.DocTestParser().get_doctest("\n".join(blocks), {}, page.name, str(page), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.attempted > 20 and result.failed == 0
