"""Revisited Oxford/Paris and INSTRE: their ground-truth files, their protocol's mAP, and runs end to end
(src/patchify/datasets/benchmarks.py, src/patchify/metrics.py, src/patchify/tasks/evaluate.py)."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, compose_config
from fixtures import _background, _object

from patchify.data import DataError
from patchify.datasets.benchmarks import instre_positive_boxes, read_instre, read_revisited
from patchify.metrics import evaluate_revisited, evaluate_setup, interpolated_average_precision
from patchify.pipeline import run
from patchify.settings import ConfigError, validate

KAPPAS = (1, 5, 10)


# ----------------------------------------------------------------------------- the reference formula, written here

def reference_map(ranks: np.ndarray, gnd: list[dict], kappas=KAPPAS):
    """revisitop's compute_map, transcribed from its formula: ``ranks`` (db_size, nq) of 0-based database
    indices; positions of positives shifted down by the junk ranked before them; trapezoid AP; mP@k over
    min(k, last positive's position); queries without positives skipped. A query with no positive in a
    truncated list scores mP@k = 0 (the reference's max() of nothing is undefined)."""
    aps, prs = [], []
    for i, g in enumerate(gnd):
        ok, junk = list(g["ok"]), list(g.get("junk", []))
        if not ok:
            continue
        column = list(ranks[:, i])
        pos = sorted(p for p, image in enumerate(column) if image in ok)
        junk_pos = sorted(p for p, image in enumerate(column) if image in junk)
        shifted, k, ij = [], 0, 0
        for p in pos:
            while ij < len(junk_pos) and p > junk_pos[ij]:
                k += 1
                ij += 1
            shifted.append(p - k)
        ap = 0.0
        for j, rank in enumerate(shifted):
            precision_0 = 1.0 if rank == 0 else j / rank
            precision_1 = (j + 1) / (rank + 1)
            ap += (precision_0 + precision_1) / (2 * len(ok))
        aps.append(ap)
        one_based = [p + 1 for p in shifted]
        row = []
        for kappa in kappas:
            if not one_based:
                row.append(0.0)
                continue
            cut = min(max(one_based), kappa)
            row.append(sum(p <= cut for p in one_based) / cut)
        prs.append(row)
    return float(np.mean(aps)), np.mean(prs, axis=0)


def setups_of(gnd: list[dict]) -> dict[str, list[dict]]:
    """Easy / Medium / Hard as revisitop's example_evaluate.py builds them."""
    return {"easy": [{"ok": g["easy"], "junk": g["junk"] + g["hard"]} for g in gnd],
            "medium": [{"ok": g["easy"] + g["hard"], "junk": g["junk"]} for g in gnd],
            "hard": [{"ok": g["hard"], "junk": g["junk"] + g["easy"]} for g in gnd]}


def random_gnd(rng: np.random.Generator, n_db: int, n_q: int) -> list[dict]:
    gnd = []
    for q in range(n_q):
        labels = rng.choice(4, size=n_db, p=[0.6, 0.15, 0.15, 0.1])  # negative, easy, hard, junk
        if q % 7 == 3:
            labels[labels == 2] = 0  # some queries have no hard positive (left out of Hard)
        gnd.append({what: [int(i) for i in np.flatnonzero(labels == code)]
                    for code, what in ((1, "easy"), (2, "hard"), (3, "junk"))})
    return gnd


# ----------------------------------------------------------------------------- the metric

def test_interpolated_ap_by_hand():
    # positives at 0-based ranks 0 and 2 of 2: ((1 + 1) / 2 + (1/2 + 2/3) / 2) / 2
    assert interpolated_average_precision(np.array([0, 2]), 2) == pytest.approx((1 + (0.5 + 2 / 3) / 2) / 2, abs=1e-12)
    assert interpolated_average_precision(np.array([], dtype=int), 3) == 0.0
    # sklearn-style AP would give (1 + 2/3) / 2 here: the revisited AP is not ILIAS's
    assert interpolated_average_precision(np.array([0, 2]), 2) != pytest.approx((1 + 2 / 3) / 2)


@pytest.mark.parametrize("seed", range(4))
def test_revisited_easy_medium_hard_equal_the_reference_formula(seed):
    rng = np.random.default_rng(seed)
    n_db, n_q = int(rng.integers(20, 80)), 15
    gnd = random_gnd(rng, n_db, n_q)
    ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)], axis=1)  # full rankings, ties impossible
    ids = [f"img{i:04d}.jpg" for i in range(n_db)]
    rankings = [[ids[i] for i in ranks[:, q]] for q in range(n_q)]
    truths = [{what: {ids[i] for i in g[what]} for what in ("easy", "hard", "junk")} for g in gnd]
    ours = evaluate_revisited(rankings, truths)
    for setup, reference_gnd in setups_of(gnd).items():
        want_map, want_pr = reference_map(ranks, reference_gnd)
        assert ours[setup]["mAP"] == pytest.approx(100 * want_map, abs=1e-9)
        for kappa, want in zip(KAPPAS, want_pr):
            assert ours[setup][f"mP@{kappa}"] == pytest.approx(100 * want, abs=1e-9)
    assert ours["hard"]["queries_without_positives"] == sum(not g["hard"] for g in gnd) > 0


def test_top_k_list_counts_missing_positives_as_not_retrieved():
    rng = np.random.default_rng(7)
    n_db, n_q, k = 60, 10, 25
    gnd = random_gnd(rng, n_db, n_q)
    ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)], axis=1)
    ids = [f"{i}" for i in range(n_db)]
    positives = [{ids[i] for i in g["easy"] + g["hard"]} for g in gnd]
    junk = [{ids[i] for i in g["junk"]} for g in gnd]
    full = evaluate_setup([[ids[i] for i in ranks[:, q]] for q in range(n_q)], positives, junk)
    top = evaluate_setup([[ids[i] for i in ranks[:k, q]] for q in range(n_q)], positives, junk)
    want, _ = reference_map(ranks[:k], setups_of(gnd)["medium"])
    assert top["mAP"] == pytest.approx(100 * want, abs=1e-9) and top["mAP"] < full["mAP"]


# ----------------------------------------------------------------------------- synthetic files in the published formats

def _photo(rng, instance: int | None, path: Path, size=(160, 120)) -> tuple[int, int, int, int]:
    """A background with (when ``instance`` is given) the instance's object pasted; returns its x, y, w, h."""
    image = _background(rng, *size)
    box = (0, 0, 0, 0)
    if instance is not None:
        side = int(rng.integers(40, 70))
        x, y = int(rng.integers(0, size[0] - side)), int(rng.integers(0, size[1] - side))
        image.paste(_object(rng, instance, side), (x, y))
        box = (x, y, side, side)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=95)
    return box


def make_revisited(root: Path, name: str = "roxford5k") -> dict:
    """gnd_<name>.pkl + jpg/: 2 queries, 8 database images (easy, hard, junk and negatives)."""
    rng = np.random.default_rng(0)
    imlist = [f"db_{i:02d}" for i in range(8)]
    for i, image in enumerate(imlist):
        _photo(rng, i % 2 if i < 6 else None, root / "jpg" / f"{image}.jpg")
    qimlist = ["query_a", "query_b"]
    gnd = []
    for q, query in enumerate(qimlist):
        x, y, w, h = _photo(rng, q, root / "jpg" / f"{query}.jpg")
        gnd.append({"bbx": [float(x), float(y), float(x + w), float(y + h)],
                    "easy": [q, q + 2], "hard": [q + 4], "junk": [6 + q]})
    content = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}
    (root / f"gnd_{name}.pkl").write_bytes(pickle.dumps(content))
    return content


def make_instre(root: Path) -> None:
    """gnd_instre.mat (MATLAB struct array: ok 1-based, bbx x1 y1 x2 y2) + INSTRE-S1 / INSTRE-M images with
    their box files: 2 queries, 8 database images."""
    sio = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(1)
    imlist, boxes = [], {}
    for i in range(4):
        image = f"INSTRE-S1/01a_book/{i:03d}.jpg"
        x, y, w, h = _photo(rng, 0, root / image)
        (root / image).with_suffix(".txt").write_text(f"{x} {y} {w} {h}\n")
        imlist.append(image)
    for i in range(2):  # INSTRE-M: two objects a (line 1) and b (line 2)
        image = f"INSTRE-M/01/{i:03d}.jpg"
        _photo(rng, None, root / image, size=(200, 150))
        (root / image).with_suffix(".txt").write_text("10 10 60 60\n110 70 70 60\n")
        imlist.append(image)
    for i in range(2):
        image = f"INSTRE-S2/02_cup/{i:03d}.jpg"
        x, y, w, h = _photo(rng, 1, root / image)
        (root / image).with_suffix(".txt").write_text(f"{x} {y} {w} {h}\n")
        imlist.append(image)
    qimlist = ["INSTRE-S1/01a_book/query.jpg", "INSTRE-S2/02_cup/query.jpg"]
    entries = np.zeros((1, 2), dtype=[("ok", "O"), ("bbx", "O")])
    for q, (query, ok) in enumerate(zip(qimlist, ([1, 2, 3, 4, 5, 6], [7, 8]))):
        x, y, w, h = _photo(rng, q, root / query)
        entries[0, q]["ok"] = np.array([ok], dtype=np.float64)
        entries[0, q]["bbx"] = np.array([[x, y, x + w, y + h]], dtype=np.float64)
    cells = {name: np.array([values], dtype=object) for name, values in (("imlist", imlist), ("qimlist", qimlist))}
    sio.savemat(str(root / "gnd_instre.mat"), {"gnd": entries, **cells})


def _overrides(tmp_path: Path, dataset: str, root: Path) -> list[str]:
    return ["experiment=smoke", f"dataset={dataset}", f"dataset.root={root}", "pyramid.level=1",
            f"paths.features={tmp_path / 'features'}", f"paths.indices={tmp_path / 'indices'}",
            f"paths.logs={tmp_path / 'logs'}"]


def test_revisited_reader(tmp_path):
    content = make_revisited(tmp_path)
    dataset = read_revisited(tmp_path, "gnd_roxford5k.pkl")
    assert [q.id for q in dataset.queries] == ["query_a.jpg", "query_b.jpg"] and len(dataset.gallery) == 8
    x1, y1, x2, y2 = content["gnd"][0]["bbx"]
    assert dataset.queries[0].boxes == ((x1, y1, x2 - x1, y2 - y1),)
    truth = dataset.truth["query_a.jpg"]
    assert truth.easy == {"db_00.jpg", "db_02.jpg"} and truth.hard == {"db_04.jpg"} and truth.junk == {"db_06.jpg"}
    assert dataset.no_boxes and dataset.positives_for(dataset.queries[0])["db_04.jpg"].shape == (0, 4)
    # the same file with NumPy arrays, as old and new pickle protocols write them
    arrays = {**content, "gnd": [{k: np.asarray(v) for k, v in g.items()} for g in content["gnd"]]}
    for protocol in (2, 5):
        (tmp_path / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(arrays, protocol=protocol))
        assert read_revisited(tmp_path, "gnd_roxford5k.pkl").truth == dataset.truth


def test_revisited_runs_end_to_end_and_scores_the_protocol(tmp_path):
    make_revisited(tmp_path / "roxford5k")
    cfg = compose_config(_overrides(tmp_path, "roxford5k", tmp_path / "roxford5k") + ["eval.k=0"])
    assert cfg.query.crop_to_bbox is True  # the dataset implies the protocol's cropped queries
    metrics = run(cfg, tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["protocol"] == "revisited" and set(saved["revisited"]) == {"easy", "medium", "hard"}
    assert saved["mAP"] == saved["revisited"]["medium"]["mAP"] and 0 < saved["mAP"] <= 100
    assert saved["LocScore"] is None and "no boxes" in saved["not_available"]["LocScore"]
    # the similarity file holds the full ranking (junk included); the protocol recomputed from it agrees
    similarity = json.loads((tmp_path / "run" / "similarity.json").read_text())
    assert all(len(ranked) == 8 for ranked in similarity.values())
    content = pickle.loads((tmp_path / "roxford5k" / "gnd_roxford5k.pkl").read_bytes())
    index = {f"{name}.jpg": i for i, name in enumerate(content["imlist"])}
    ranks = np.array([[index[i] for i in similarity[f"{q}.jpg"]] for q in content["qimlist"]]).T
    for setup, reference_gnd in setups_of(content["gnd"]).items():
        want, _ = reference_map(ranks, reference_gnd)
        assert saved["revisited"][setup]["mAP"] == pytest.approx(100 * want, abs=1e-9)
    assert {"AP", "AP_easy", "AP_hard", "AP_ilias"} <= set(metrics["per_query"][0])


def test_revisited_refuses_uncropped_queries(tmp_path):
    with pytest.raises(ConfigError, match=r"^query.crop_to_bbox=false: dataset=roxford5k follows the revisited"):
        validate(compose_config(_overrides(tmp_path, "roxford5k", tmp_path) + ["query.crop_to_bbox=false"]))


def test_missing_gnd_file_exits_2_with_one_line(tmp_path):
    (tmp_path / "rparis6k").mkdir()
    done = subprocess.run([sys.executable, "main.py", *_overrides(tmp_path, "rparis6k", tmp_path / "rparis6k")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
    gnd_file = tmp_path / "rparis6k" / "gnd_rparis6k.pkl"
    assert len(errors) == 1 and str(gnd_file) in errors[0] and "not found" in errors[0]


def test_bad_ground_truth_is_one_line_naming_the_file(tmp_path):
    content = make_revisited(tmp_path)
    content["gnd"][1]["easy"] = [99]
    (tmp_path / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(content))
    with pytest.raises(DataError, match=r"gnd_roxford5k.pkl: query 1: 'easy' holds indices outside 0..7"):
        read_revisited(tmp_path, "gnd_roxford5k.pkl")
    (tmp_path / "gnd_roxford5k.pkl").write_bytes(pickle.dumps({"imlist": [Path("x")], "qimlist": [], "gnd": []}))
    with pytest.raises(DataError, match=r"not a revisited ground-truth pickle \(UnpicklingError: refers to"):
        read_revisited(tmp_path, "gnd_roxford5k.pkl")
    content["gnd"][1]["easy"] = [1]
    content["qimlist"][1] = content["qimlist"][0]
    (tmp_path / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(content))
    with pytest.raises(DataError, match=r"gnd_roxford5k.pkl: qimlist lists query_a twice \(again at position 1\)"):
        read_revisited(tmp_path, "gnd_roxford5k.pkl")
    content["qimlist"][1] = "query_b"
    content["imlist"][3] = "no_such_image"
    (tmp_path / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(content))
    with pytest.raises(DataError, match=r"jpg/no_such_image.jpg: image listed in gnd_roxford5k.pkl not found"):
        read_revisited(tmp_path, "gnd_roxford5k.pkl")


def test_instre_reader_reads_the_mat_file_and_the_query_object_boxes(tmp_path):
    make_instre(tmp_path)
    dataset = read_instre(tmp_path)
    assert [q.id for q in dataset.queries] == ["INSTRE-S1/01a_book/query.jpg", "INSTRE-S2/02_cup/query.jpg"]
    truth = dataset.truth["INSTRE-S1/01a_book/query.jpg"]  # ok = 1-based 1..6
    assert truth.easy == {r.id for r in dataset.gallery[:6]} and not truth.hard and not truth.junk
    assert truth.boxes["INSTRE-M/01/000.jpg"] == ((10.0, 10.0, 60.0, 60.0),)  # class a: the first line
    assert instre_positive_boxes("INSTRE-S1/01b_pen/q.jpg", "INSTRE-M/01/000.jpg", ((1, 1, 2, 2), (5, 5, 2, 2))) \
        == ((5, 5, 2, 2),)
    assert instre_positive_boxes("INSTRE-M/01/q.jpg", "INSTRE-M/01/000.jpg", ((1, 1, 2, 2), (5, 5, 2, 2))) \
        == ((1.0, 1.0, 6.0, 6.0),)
    assert dataset.no_boxes is None


def test_instre_evaluates_end_to_end_with_locscore(tmp_path):
    make_instre(tmp_path / "instre")
    metrics = run(compose_config(_overrides(tmp_path, "instre", tmp_path / "instre") + ["eval.k=0"]), tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["protocol"] == "instre" and saved["mAP"] == saved["instre"]["mAP"] and 0 < saved["mAP"] <= 100
    assert saved["k"] == 8 and isinstance(saved["LocScore"], float) and "not_available" not in saved
    assert saved["instre"]["num_queries"] == 2 and {"mP@1", "mP@5", "mP@10"} <= set(saved["instre"])
    assert all(q["AP"] is not None and "AP_ilias" in q for q in metrics["per_query"])


def test_revisited_distractors_join_the_gallery_unlabelled(tmp_path):
    make_revisited(tmp_path)
    rng = np.random.default_rng(3)
    for i in range(3):
        _photo(rng, None, tmp_path / "revisitop1m" / "jpg" / f"d{i}.jpg")
    (tmp_path / "revisitop1m" / "jpg" / "broken.jpg").write_bytes(b"not a jpeg")
    dataset = read_revisited(tmp_path, "gnd_roxford5k.pkl", distractors="revisitop1m")
    assert [r.id for r in dataset.gallery[8:]] == [f"revisitop1m/jpg/d{i}.jpg" for i in range(3)]
    assert len(dataset.skipped) == 1 and "broken.jpg" in dataset.skipped[0]
    assert all(dataset.truth[q.id].positives <= {r.id for r in dataset.gallery[:8]} for q in dataset.queries)


def test_mat_ground_truth_without_scipy_is_one_line(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "scipy" else real(name, *a))
    with pytest.raises(ConfigError,
                       match=r'^dataset.gnd_file=gnd_instre.mat: .* needs scipy.*"patchify\[benchmarks\]"$'):
        validate(compose_config(_overrides(tmp_path, "instre", tmp_path)))
