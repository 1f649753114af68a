"""Retrieval and localisation metrics (ILIAS protocol), pure numpy.

For one query: the ranked list of gallery ids (best first) is truncated at
``k`` (default 1000); ``rel_r`` = 1 when the image at rank r is a positive of
the query's instance; ``P@r`` = (positives among ranks 1..r) / r; ``G`` = the
instance's positives in the gallery (all of them, found or not).

- **AP@k** = ``sum_r P@r * rel_r / min(k, |G|)``; mAP = mean AP over queries.
  This is ILIAS's formula (sklearn's AP over the top k, times
  hits / min(k, |G|)). A query with no positive in the top k, or with
  ``|G| = 0``, gets AP = 0 and still counts in the mean (ILIAS skips nothing).
- **LocScore@tau** = ``sum_r P@r * rel_r * loc_r / min(k, |G|)``, with
  ``loc_r`` = [IoU(box_r, gt_r) >= tau], ``box_r`` the predicted box of rank
  r and IoU the max over that image's ground-truth boxes (no gt box, or a
  NaN box, means not localised). ``P@r`` counts every relevant image, so a
  right image found at the wrong place earns nothing and LocScore <= AP.
  Threshold specs: ``"default"`` = (0.4,), ``"average"`` = mean over
  tau in (0.2, 0.3, 0.4, 0.5, 0.6), a float (or its string) = that tau.
- **R@n** (n = 1, 5, 10) = 1 if a positive is among the first n (of the list
  truncated at k), else 0; **P@10** = positives among the first 10 / 10.
- **AP by object scale** (scale = positive's box area / image area), as
  ILIAS's ``_per_scale``: for each group [lo, hi) (cuts 0.0688, 0.1353,
  0.2730), positives outside the group are removed from the ranking (before
  truncating at k) and from G; AP is computed on what remains if G is not
  empty, and averaged over the queries that have positives in the group.

All reported values are percentages (0..100), averaged over queries.

Ties: the ranked list is used in the given order; ties must already be
broken by the caller. ILIAS re-sorts by score (``argsort(-scores)``) and
sklearn's ``average_precision_score`` groups tied scores into one threshold,
so the two agree exactly whenever scores are distinct.

Boxes are float arrays (n, 4) in (x, y, w, h) pixels, top-left origin.

Revisited protocol (rOxford5k, rParis6k; INSTRE uses its AP with one setup): per-query positive and junk
lists, junk taken out of the ranking, AP as trapezoids under the precision-recall curve
(:func:`interpolated_average_precision`), mP@k as revisitop computes it, queries without positives left
out of the means; :func:`evaluate_revisited` for Easy / Medium / Hard. docs/METRICS.md says how it differs
from the ILIAS AP above.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np

BOX = np.ndarray
SCALE_CUTS = (0.06880213760855043, 0.13526567164179104, 0.2729876723163842)
SCALE_GROUPS: tuple[tuple[float, float], ...] = tuple(
    zip((0.0,) + SCALE_CUTS, SCALE_CUTS + (math.inf,))
)
LOC_THRESHOLDS_AVERAGE = (0.2, 0.3, 0.4, 0.5, 0.6)
DEFAULT_IOU = 0.4
METRICS = ("map", "locscore", "topk")
TOPK = (1, 5, 10)


def box_iou(a: BOX, b: BOX) -> np.ndarray:
    """IoU matrix (n, m) of xywh boxes; 0 where the union has no area."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    ax2, ay2 = a[:, 0] + a[:, 2], a[:, 1] + a[:, 3]
    bx2, by2 = b[:, 0] + b[:, 2], b[:, 1] + b[:, 3]
    iw = np.minimum(ax2[:, None], bx2[None]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(ay2[:, None], by2[None]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = np.clip(a[:, 2], 0, None) * np.clip(a[:, 3], 0, None)
    area_b = np.clip(b[:, 2], 0, None) * np.clip(b[:, 3], 0, None)
    union = area_a[:, None] + area_b[None] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return np.nan_to_num(iou, nan=0.0)


def resolve_iou_thresholds(spec: Union[str, float, Sequence[float]]) -> tuple[float, ...]:
    """Turn "default" | "average" | float | "0.5" (or a sequence of floats) into taus."""
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s == "default":
            return (DEFAULT_IOU,)
        if s == "average":
            return LOC_THRESHOLDS_AVERAGE
        try:
            taus: tuple[float, ...] = (float(s),)
        except ValueError:
            raise ValueError(
                f"bad iou threshold {spec!r}: expected 'default', 'average' or a number in (0, 1]"
            ) from None
    elif isinstance(spec, bool):
        raise ValueError(f"bad iou threshold {spec!r}: a bool is not a threshold")
    elif isinstance(spec, (int, float, np.floating, np.integer)):
        taus = (float(spec),)
    elif isinstance(spec, Sequence) and len(spec) > 0:
        taus = tuple(t for s_ in spec for t in resolve_iou_thresholds(s_))
    else:
        raise ValueError(f"bad iou threshold {spec!r}")
    for t in taus:
        if not (0.0 < t <= 1.0):
            raise ValueError(f"bad iou threshold {t!r}: must lie in (0, 1]")
    return taus


@dataclass(frozen=True)
class QueryResult:
    """One query's ranked gallery list, predicted boxes and ground truth.

    ``ranked_boxes`` may be None when no localisation is evaluated.
    ``positive_scales`` (object area / image area per positive) enables the
    per-scale breakdown.
    """

    query_id: str
    ranked_ids: list[str]
    ranked_boxes: np.ndarray | None
    positives: dict[str, np.ndarray]
    positive_scales: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if len(set(self.ranked_ids)) != len(self.ranked_ids):
            raise ValueError(f"query {self.query_id}: duplicate ids in ranked_ids")
        if self.ranked_boxes is not None:
            boxes = np.asarray(self.ranked_boxes, dtype=np.float64)
            if boxes.shape != (len(self.ranked_ids), 4):
                raise ValueError(
                    f"query {self.query_id}: ranked_boxes has shape {boxes.shape}, "
                    f"expected ({len(self.ranked_ids)}, 4)"
                )
            object.__setattr__(self, "ranked_boxes", boxes)
        if self.positive_scales is not None:
            missing = set(self.positives) - set(self.positive_scales)
            if missing:
                raise ValueError(f"query {self.query_id}: no scale for positives {sorted(missing)[:5]}")


def _precision_sum(relevant: np.ndarray, weight: np.ndarray, num_positives: int, k: int) -> float:
    """sum_r P@r * rel_r * weight_r / min(k, |G|) over the list truncated at k."""
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    rel = np.asarray(relevant, dtype=bool)[:k]
    w = np.asarray(weight, dtype=bool)[:k]
    hits = int(rel.sum())
    if hits > num_positives:
        raise ValueError(f"{hits} relevant ranks but only {num_positives} positives")
    if num_positives <= 0 or hits == 0:
        return 0.0
    prec = np.cumsum(rel) / np.arange(1, rel.size + 1)
    return float(prec[rel & w].sum() / min(k, num_positives))


def average_precision(relevant: np.ndarray, num_positives: int, k: int) -> float:
    """ILIAS AP@k in [0, 1]; 0.0 when |G| = 0 or nothing relevant in the top k."""
    rel = np.asarray(relevant, dtype=bool)
    return _precision_sum(rel, np.ones_like(rel), num_positives, k)


def loc_score(relevant: np.ndarray, localized: np.ndarray, num_positives: int, k: int) -> float:
    """LocScore@k in [0, 1]: AP where only localised relevant ranks add their P@r."""
    rel = np.asarray(relevant, dtype=bool)
    loc = np.asarray(localized, dtype=bool)
    if loc.shape != rel.shape:
        raise ValueError(f"localized shape {loc.shape} != relevant shape {rel.shape}")
    return _precision_sum(rel, loc, num_positives, k)


def _best_ious(r: QueryResult, k: int) -> np.ndarray:
    """Max IoU with the gt boxes for each of the top-k ranks (0 for negatives)."""
    if r.ranked_boxes is None:
        raise ValueError(f"query {r.query_id}: LocScore needs ranked_boxes")
    out = np.zeros(min(k, len(r.ranked_ids)))
    for i, db_id in enumerate(r.ranked_ids[:k]):
        gt = r.positives.get(db_id)
        if gt is not None and np.size(gt):
            out[i] = box_iou(r.ranked_boxes[i], gt).max()
    return out


def _scale_key(lo: float, hi: float) -> str:
    return f"{lo:.3f}-{hi:.3f}"


def evaluate(
    results: Sequence[QueryResult],
    k: int = 1000,
    iou_thresholds: Union[str, float, Sequence[float]] = (DEFAULT_IOU,),
    metrics: Sequence[str] = METRICS,
) -> dict:
    """Mean metrics in percent over ``results`` plus a per-query list (JSON-ready)."""
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRICS}")
    if not isinstance(k, (int, np.integer)) or k <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if not results:
        raise ValueError("no query results to evaluate")
    taus = resolve_iou_thresholds(iou_thresholds)
    tau_keys = [f"LocScore@{t:g}" for t in taus]
    per_query: list[dict] = []
    scale_aps: dict[str, list[float]] = {_scale_key(lo, hi): [] for lo, hi in SCALE_GROUPS}
    any_scales = False
    for r in results:
        rel = np.array([i in r.positives for i in r.ranked_ids[:k]], dtype=bool)
        n_pos = len(r.positives)
        q: dict = {"query_id": r.query_id, "num_positives": n_pos}
        if "map" in metrics:
            q["AP"] = 100.0 * average_precision(rel, n_pos, k)
            if r.positive_scales is not None:
                any_scales = True
                for lo, hi in SCALE_GROUPS:
                    keep = {p for p in r.positives if lo <= r.positive_scales[p] < hi}
                    if keep:
                        ids = [i for i in r.ranked_ids if i in keep or i not in r.positives]
                        srel = np.array([i in keep for i in ids[:k]], dtype=bool)
                        ap = 100.0 * average_precision(srel, len(keep), k)
                        scale_aps[_scale_key(lo, hi)].append(ap)
        if "locscore" in metrics:
            ious = _best_ious(r, k)
            vals = [100.0 * loc_score(rel, ious >= t, n_pos, k) for t in taus]
            q.update(zip(tau_keys, vals))
            q["LocScore"] = float(np.mean(vals))
        if "topk" in metrics:
            for n in TOPK:
                q[f"R@{n}"] = 100.0 * float(rel[:n].any())
            q["P@10"] = 100.0 * float(rel[:10].sum()) / 10.0
        per_query.append(q)

    out: dict = {"num_queries": len(results), "k": int(k)}
    mean_keys = [key for key in per_query[0] if key not in ("query_id", "num_positives")]
    for key in mean_keys:
        out["mAP" if key == "AP" else key] = float(np.mean([q[key] for q in per_query]))
    if "locscore" in metrics:
        out["iou_thresholds"] = list(taus)
    if "map" in metrics and any_scales:
        out["mAP_scale"] = {g: (float(np.mean(v)) if v else None) for g, v in scale_aps.items()}
    out["per_query"] = per_query
    return out


# ----------------------------------------------------------------------------- revisited protocol (rOxford, INSTRE)

KAPPAS = (1, 5, 10)
# setup -> (ground-truth lists that are positives, lists that are junk), as revisitop's example_evaluate.py builds them
REVISITED_SETUPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


def positive_ranks(ranked_ids: Sequence[str], positives: set[str] | frozenset[str],
                   junk: set[str] | frozenset[str] = frozenset()) -> np.ndarray:
    """0-based ranks of the positives in ``ranked_ids`` once junk is taken out of the list (an id listed as both
    positive and junk is a positive, as in revisitop, whose rank shift only counts junk that is not positive)."""
    kept = [i for i in ranked_ids if i in positives or i not in junk]
    return np.flatnonzero(np.fromiter((i in positives for i in kept), dtype=bool, count=len(kept)))


def interpolated_average_precision(ranks: np.ndarray, num_positives: int) -> float:
    """The revisited protocol's AP in [0, 1] (revisitop ``compute_ap``; Iscen et al.'s ``score_ap_from_ranks1``).

    Trapezoids under the precision-recall curve: the j-th retrieved positive (0-based, at 0-based rank r_j)
    adds ``(p0 + p1) / 2 / |G|``, with ``p0 = j / r_j`` (1 when r_j = 0) the precision just before it and
    ``p1 = (j + 1) / (r_j + 1)`` the precision at it. Positives missing from ``ranks`` add nothing.
    """
    if num_positives <= 0:
        raise ValueError(f"num_positives must be positive, got {num_positives}")
    r = np.asarray(ranks, dtype=np.float64)
    if r.size > num_positives:
        raise ValueError(f"{r.size} positive ranks but only {num_positives} positives")
    j = np.arange(r.size, dtype=np.float64)
    before = np.where(r > 0, j / np.where(r > 0, r, 1.0), 1.0)
    after = (j + 1.0) / (r + 1.0)
    return float(((before + after) / 2.0).sum() / num_positives)


def revisited_precision_at(ranks: np.ndarray, kappa: int) -> float:
    """revisitop's precision at ``kappa``: positives among the first ``min(kappa, last positive's rank)`` ranks
    (1-based) over that cut; so a query whose positives all lie above rank kappa scores 1. 0 with no positive."""
    r = np.asarray(ranks) + 1
    if r.size == 0:
        return 0.0
    cut = min(int(r.max()), int(kappa))
    return float((r <= cut).sum() / cut)


def evaluate_setup(rankings: Sequence[Sequence[str]], positives: Sequence[set[str] | frozenset[str]],
                   junk: Sequence[set[str] | frozenset[str]], kappas: Sequence[int] = KAPPAS) -> dict:
    """mAP and mP@kappa (percent) of one setup over the queries that have a positive.

    A query without positives is left out of the means, as revisitop leaves it out (its per-query values are
    None; ``queries_without_positives`` counts them). ``per_query``: ``{"AP": ..., "P@kappa": ...}`` per query.
    """
    if not (len(rankings) == len(positives) == len(junk)):
        raise ValueError(f"{len(rankings)} rankings, {len(positives)} positive sets and {len(junk)} junk sets")
    per_query: list[dict] = []
    for ranked, pos, jnk in zip(rankings, positives, junk):
        if not pos:
            per_query.append({"AP": None, **{f"P@{k}": None for k in kappas}})
            continue
        ranks = positive_ranks(ranked, pos, jnk)
        per_query.append({"AP": 100.0 * interpolated_average_precision(ranks, len(pos)),
                          **{f"P@{k}": 100.0 * revisited_precision_at(ranks, k) for k in kappas}})
    scored = [q for q in per_query if q["AP"] is not None]
    out: dict = {"num_queries": len(scored), "queries_without_positives": len(per_query) - len(scored)}
    out["mAP"] = float(np.mean([q["AP"] for q in scored])) if scored else None
    for k in kappas:
        out[f"mP@{k}"] = float(np.mean([q[f"P@{k}"] for q in scored])) if scored else None
    out["per_query"] = per_query
    return out


def evaluate_revisited(rankings: Sequence[Sequence[str]], truths: Sequence[dict[str, set[str] | frozenset[str]]],
                       kappas: Sequence[int] = KAPPAS) -> dict:
    """The revisited Oxford/Paris protocol (Radenovic et al., CVPR 2018): Easy, Medium and Hard setups.

    ``truths[i]``: query i's gallery ids under ``"easy"``, ``"hard"`` and ``"junk"``. Each setup (REVISITED_SETUPS)
    takes some lists as positives and the others as junk, which is removed from the ranking before scoring.
    Returns ``{setup: evaluate_setup(...)}``.
    """
    out = {}
    for setup, (positive_lists, junk_lists) in REVISITED_SETUPS.items():
        positives = [frozenset().union(*(t.get(name, ()) for name in positive_lists)) for t in truths]
        junk = [frozenset().union(*(t.get(name, ()) for name in junk_lists)) for t in truths]
        out[setup] = evaluate_setup(rankings, positives, junk, kappas)
    return out
