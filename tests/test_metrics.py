"""Tests for src/patchify/metrics.py: hand-computed cases plus a property check vs ILIAS's formula."""
import json
import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from patchify.metrics import (
    LOC_THRESHOLDS_AVERAGE,
    SCALE_GROUPS,
    QueryResult,
    average_precision,
    box_iou,
    evaluate,
    loc_score,
    resolve_iou_thresholds,
)

FAR = np.array([[1000.0, 1000.0, 1.0, 1.0]])  # a gt box no prediction overlaps


def qr(ids, positives, boxes=None, scales=None, qid="q"):
    """QueryResult with zero boxes unless given; positives: list of ids or dict id -> gt boxes."""
    if not isinstance(positives, dict):
        positives = {p: FAR for p in positives}
    if boxes is None:
        boxes = np.zeros((len(ids), 4))
    return QueryResult(qid, list(ids), np.asarray(boxes, float), positives, scales)


# (a) simple ranking
def test_simple_ranking():
    # ranks: a b c d e ; positives b, d, x (x never retrieved) -> |G| = 3
    # rel = 0 1 0 1 0 ; P@2 = 1/2, P@4 = 2/4 ; AP = (1/2 + 1/2) / min(1000, 3) = 1/3
    r = qr("abcde", ["b", "d", "x"])
    out = evaluate([r])
    assert out["num_queries"] == 1 and out["k"] == 1000
    assert out["mAP"] == pytest.approx(100 / 3)
    assert out["R@1"] == 0.0 and out["R@5"] == 100.0 and out["R@10"] == 100.0
    assert out["P@10"] == pytest.approx(20.0)  # 2 positives in first 10 / 10
    assert average_precision(np.array([0, 1, 0, 1, 0], bool), 3, 1000) == pytest.approx(1 / 3)
    json.dumps(out)  # JSON-ready


def test_perfect_and_mean_over_queries():
    # q1: p first, |G| = 1 -> AP = 1 ; q2: AP = 1/3 (as above) ; mAP = (100 + 33.33) / 2
    out = evaluate([qr("pab", ["p"], qid="q1"), qr("abcde", ["b", "d", "x"], qid="q2")])
    assert [q["AP"] for q in out["per_query"]] == pytest.approx([100.0, 100 / 3])
    assert out["mAP"] == pytest.approx((100 + 100 / 3) / 2)
    assert out["R@1"] == pytest.approx(50.0)


# (b) nothing retrieved -> 0 ; |G| = 0 -> 0 and still counted
def test_no_positive_retrieved():
    out = evaluate([qr("abc", ["x", "y"])])
    assert out["mAP"] == 0.0 and out["LocScore"] == 0.0
    assert out["R@1"] == out["R@5"] == out["R@10"] == out["P@10"] == 0.0
    assert average_precision(np.zeros(5, bool), 0, 10) == 0.0
    out = evaluate([qr("pa", ["p"], qid="q1"), qr("abc", [], qid="q2")])
    assert out["mAP"] == pytest.approx(50.0)  # (100 + 0) / 2


# (c) k < |G|: denominator is min(k, |G|)
def test_k_smaller_than_num_positives():
    # ranks p1 n1 p2 p3 p4 ; |G| = 5 ; k = 3 -> rel = 1 0 1
    # AP = (1/1 + 2/3) / min(3, 5) = (5/3) / 3 = 5/9
    r = qr(["p1", "n1", "p2", "p3", "p4"], ["p1", "p2", "p3", "p4", "p5"])
    assert evaluate([r], k=3)["mAP"] == pytest.approx(100 * 5 / 9)
    # all of top k relevant -> AP = 1 even though |G| > k
    r = qr(["p1", "p2", "n1"], ["p1", "p2", "p3", "p4"])
    assert evaluate([r], k=2)["mAP"] == pytest.approx(100.0)


# (d) ranking longer than k is truncated
def test_truncation_at_k():
    r = qr(["n1", "p1", "p2", "p3"], ["p1", "p2", "p3"])
    # k = 2: rel = 0 1 -> AP = (1/2) / min(2, 3) = 1/4
    assert evaluate([r], k=2)["mAP"] == pytest.approx(25.0)
    # k = 4: rel = 0 1 1 1 -> AP = (1/2 + 2/3 + 3/4) / 3 = 23/36
    assert evaluate([r], k=4)["mAP"] == pytest.approx(100 * 23 / 36)
    # k = 1: rel = 0 -> AP = 0 and R@5 only looks at the truncated list
    out = evaluate([r], k=1)
    assert out["mAP"] == 0.0 and out["R@5"] == 0.0


# (e) LocScore
def test_locscore_max_over_gt_boxes_and_thresholds():
    # b has two gt boxes: A far away, B = (100,100,10,10); predicted (100,100,10,4.5)
    # IoU with B = 45 / 100 = 0.45 (max over A=0, B=0.45) -> localised at 0.4, not at 0.5
    # d: predicted box disjoint from its gt -> never localised
    gt_b = np.array([[0, 0, 10, 10], [100, 100, 10, 10]], float)
    gt_d = np.array([[0, 0, 10, 10]], float)
    boxes = [[100, 100, 10, 4.5], [0, 0, 5, 5], [50, 50, 5, 5]]
    r = qr(["b", "n", "d"], {"b": gt_b, "d": gt_d}, boxes=boxes)
    # AP = (1/1 + 2/3) / 2 = 5/6
    # LocScore@0.4 = (1/1 * 1) / 2 = 1/2 ; LocScore@0.5 = 0
    out = evaluate([r], iou_thresholds=(0.4, 0.5))
    assert out["mAP"] == pytest.approx(100 * 5 / 6)
    assert out["LocScore@0.4"] == pytest.approx(50.0)
    assert out["LocScore@0.5"] == 0.0
    assert out["LocScore"] == pytest.approx(25.0)  # mean over the two taus
    # "average": 0.45 >= 0.2, 0.3, 0.4 -> 1/2 each, 0 for 0.5, 0.6 -> (3 * 0.5) / 5 = 0.3
    out = evaluate([r], iou_thresholds="average")
    assert out["LocScore"] == pytest.approx(30.0)
    assert set(out) >= {f"LocScore@{t:g}" for t in LOC_THRESHOLDS_AVERAGE}
    assert out["per_query"][0]["LocScore"] == pytest.approx(30.0)


def test_locscore_precision_counts_unlocalised_hits():
    # ranks n b d ; b relevant but not localised, d relevant and localised (IoU 1), |G| = 2
    # LocScore = P@3 * 1 / 2 = (2/3) / 2 = 1/3 (P@3 counts b too)
    gt = np.array([[0, 0, 10, 10]], float)
    boxes = [[0, 0, 10, 10], [50, 50, 10, 10], [0, 0, 10, 10]]
    r = qr(["n", "b", "d"], {"b": gt, "d": gt}, boxes=boxes)
    assert evaluate([r])["LocScore"] == pytest.approx(100 / 3)
    rel = np.array([0, 1, 1], bool)
    assert loc_score(rel, np.array([0, 0, 1], bool), 2, 1000) == pytest.approx(1 / 3)
    # an image with no gt box is never localised
    r = qr(["b"], {"b": np.zeros((0, 4))}, boxes=[[0, 0, 10, 10]])
    assert evaluate([r])["LocScore"] == 0.0 and evaluate([r])["mAP"] == 100.0


def test_locscore_never_exceeds_ap():
    rng = np.random.default_rng(1)
    for _ in range(100):
        n = rng.integers(1, 30)
        rel = rng.random(n) < 0.4
        loc = rng.random(n) < 0.5
        g = int(rel.sum()) + int(rng.integers(0, 4))
        k = int(rng.integers(1, n + 3))
        assert loc_score(rel, loc, g, k) <= average_precision(rel, g, k) + 1e-12


def test_locscore_needs_boxes():
    r = QueryResult("q", ["a"], None, {"a": FAR})
    assert evaluate([r], metrics=("map",))["mAP"] == 100.0
    with pytest.raises(ValueError, match="ranked_boxes"):
        evaluate([r])


# (f) threshold spec parsing
def test_resolve_iou_thresholds():
    assert resolve_iou_thresholds("default") == (0.4,)
    assert resolve_iou_thresholds(" Average ") == LOC_THRESHOLDS_AVERAGE
    assert resolve_iou_thresholds(0.5) == (0.5,)
    assert resolve_iou_thresholds("0.7") == (0.7,)
    assert resolve_iou_thresholds(1) == (1.0,)
    assert resolve_iou_thresholds((0.3, "0.5")) == (0.3, 0.5)
    for bad in ("foo", "", 0.0, -0.1, 1.5, "nan", "inf", True, None, ()):
        with pytest.raises(ValueError):
            resolve_iou_thresholds(bad)


# (g) box IoU
def test_box_iou_hand_values():
    a = np.array([[0, 0, 10, 10]], float)
    b = np.array(
        [
            [0, 0, 10, 10],  # identical -> 1
            [20, 20, 5, 5],  # disjoint -> 0
            [2, 2, 5, 5],  # contained: 25 / 100 = 0.25
            [5, 0, 10, 10],  # half overlap: 50 / (100 + 100 - 50) = 1/3
            [10, 0, 10, 10],  # touching edge -> 0
            [0, 0, 0, 0],  # zero area -> 0
        ],
        float,
    )
    iou = box_iou(a, b)
    assert iou.shape == (1, 6)
    np.testing.assert_allclose(iou[0], [1, 0, 0.25, 1 / 3, 0, 0], atol=1e-12)
    assert box_iou(np.zeros((1, 4)), np.zeros((1, 4)))[0, 0] == 0.0  # 0 / 0 -> 0
    assert box_iou(np.zeros((0, 4)), b).shape == (0, 6)
    np.testing.assert_allclose(box_iou(b, a), iou.T)  # symmetric
    assert box_iou(np.array([[np.nan] * 4]), a)[0, 0] == 0.0


# (h) property check against ILIAS's formula (sklearn AP * hits / min(k, |G|))
def ilias_ap(ids, scores, gt, k):
    order = np.argsort(-scores)
    top = np.asarray(ids)[order][:k]
    y_true = np.isin(top, list(gt))
    if not y_true.any():
        return 0.0
    ap = average_precision_score(y_true, scores[order][:k])
    return ap * y_true.sum() / min(k, len(gt))


def test_map_matches_ilias_formula_on_random_rankings():
    rng = np.random.default_rng(0)
    results, expected = [], []
    for i in range(200):
        n = int(rng.integers(1, 80))
        ids = [f"img{j}" for j in range(n)]
        scores = rng.permutation(rng.random(n) + np.arange(n))  # distinct floats
        in_list = [x for x in ids if rng.random() < 0.2]
        missing = [f"lost{j}" for j in range(int(rng.integers(0, 4)))]  # positives never retrieved
        gt = in_list + missing or ["lost_only"]
        k = int(rng.integers(1, n + 5)) if i % 2 else 1000  # often k < list length
        order = np.argsort(-scores)
        ranked = [ids[j] for j in order]
        r = qr(ranked, gt, qid=f"q{i}")
        got = evaluate([r], k=k, metrics=("map",))["mAP"] / 100
        want = ilias_ap(ids, scores, gt, k)
        assert got == pytest.approx(want, abs=1e-9), (i, n, k)
        results.append(r)
        expected.append(want if k == 1000 else None)
    # mean over queries (all at k = 1000)
    sub = [r for r, e in zip(results, expected) if e is not None]
    want = np.mean([e for e in expected if e is not None])
    assert evaluate(sub, metrics=("map",))["mAP"] / 100 == pytest.approx(want, abs=1e-9)


# (i) AP per object scale (ILIAS _per_scale)
def test_scale_groups_hand_case():
    assert SCALE_GROUPS[0] == (0.0, 0.06880213760855043)
    assert SCALE_GROUPS[3] == (0.2729876723163842, math.inf)
    # q1: p1 in group 0 (0.01), p2 in group 1 (0.1), p3 in group 3 (0.5); ranks p2 n1 p1 n2 p3
    #  group 0: drop p2, p3 -> n1 p1 n2 -> AP = (1/2) / 1 = 0.5
    #  group 1: drop p1, p3 -> p2 n1 n2 -> AP = 1
    #  group 2: no positive -> skipped
    #  group 3: drop p1, p2 -> n1 n2 p3 -> AP = 1/3
    # q2: p in group 0, ranked first -> AP = 1
    q1 = qr(["p2", "n1", "p1", "n2", "p3"], ["p1", "p2", "p3"],
            scales={"p1": 0.01, "p2": 0.1, "p3": 0.5}, qid="q1")
    q2 = qr(["p", "n"], ["p"], scales={"p": 0.05}, qid="q2")
    s = evaluate([q1, q2])["mAP_scale"]
    assert list(s) == ["0.000-0.069", "0.069-0.135", "0.135-0.273", "0.273-inf"]
    assert s["0.000-0.069"] == pytest.approx(75.0)  # (50 + 100) / 2
    assert s["0.069-0.135"] == pytest.approx(100.0)  # q1 only
    assert s["0.135-0.273"] is None
    assert s["0.273-inf"] == pytest.approx(100 / 3)
    # removal happens before truncation: k = 2, group 0 of q1 -> n1 p1 -> AP = (1/2)/1 = 0.5
    # (truncating first would give p2 n1 -> 0); group 3 -> n1 n2 -> 0
    s = evaluate([q1], k=2)["mAP_scale"]
    assert s["0.000-0.069"] == pytest.approx(50.0)
    assert s["0.273-inf"] == 0.0
    # a scale equal to a cut falls in the upper group [lo, hi)
    q3 = qr(["p"], ["p"], scales={"p": SCALE_GROUPS[1][0]})
    s = evaluate([q3])["mAP_scale"]
    assert s["0.069-0.135"] == 100.0 and s["0.000-0.069"] is None
    # no scales -> no breakdown
    assert "mAP_scale" not in evaluate([qr("ab", ["a"])])


# (j) validation
def test_duplicate_ids_raise():
    with pytest.raises(ValueError, match="duplicate"):
        qr(["a", "b", "a"], ["a"])


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="shape"):
        QueryResult("q", ["a", "b"], np.zeros((3, 4)), {"a": FAR})
    with pytest.raises(ValueError, match="scale"):
        qr(["a"], ["a", "b"], scales={"a": 0.1})
    with pytest.raises(ValueError):
        evaluate([])
    with pytest.raises(ValueError):
        evaluate([qr("a", ["a"])], k=0)
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate([qr("a", ["a"])], metrics=("ndcg",))
    with pytest.raises(ValueError):
        average_precision(np.ones(3, bool), 2, 10)  # more hits than positives


def test_metric_selection_and_keys():
    out = evaluate([qr("ab", ["a"])], metrics=("topk",))
    assert "mAP" not in out and "LocScore" not in out
    assert {"R@1", "R@5", "R@10", "P@10", "per_query"} <= set(out)
    out = evaluate([qr("ab", ["a"])])
    assert set(out["per_query"][0]) >= {"query_id", "AP", "LocScore", "LocScore@0.4", "R@1", "P@10"}
