"""Query expansion: alpha-QE (Radenović, Tolias and Chum, TPAMI 2018), as ILIAS's kNN search offers it.

The query descriptor is replaced by the weighted mean of itself and the descriptors of its top results,
each weighted by its similarity to the query raised to the power ``alpha``, then re-normalised, and the
gallery is searched again with it. For Patchify a result's descriptor is that of its best-matching patch
(what matched the query), not of the whole image. ``alpha = 0`` is plain average QE (AQE, Chum et al.
2007); larger ``alpha`` lets the closest results dominate, so a wrong result at a lower similarity drifts
the query less; ``alpha = 1`` with the top results' raw similarities is what ILIAS's kNN search does.

:func:`alpha_query_expansion` is the expansion itself (arrays in, arrays out);
:func:`expand_and_search` runs it between the re-ranking of the first results and a second search,
for task=eval (src/patchify/tasks/evaluate.py) and task=search (src/patchify/tasks/search.py) alike.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np
from loguru import logger
from omegaconf import DictConfig

from .search import ImageHits


def alpha_query_expansion(queries: np.ndarray, neighbours: np.ndarray, use: np.ndarray, alpha: float) -> np.ndarray:
    """Expanded queries (nq, d): ``normalise(q + sum_i use_i * max(q . n_i, 0) ** alpha * n_i)``.

    ``queries`` (nq, d) unit vectors; ``neighbours`` (nq, m, d) the descriptors of each query's top ``m``
    results; ``use`` (nq, m) bool, which of them feed the expansion (unverified or missing results do not).
    Negative similarities weigh 0 (an odd power would push the query away from them, an even one towards
    them; neither is what a top result means). A query with no neighbour to use comes back unchanged.
    """
    queries = np.asarray(queries, np.float64)
    neighbours = np.asarray(neighbours, np.float64).reshape(len(queries), -1, queries.shape[1])
    use = np.asarray(use, bool).reshape(neighbours.shape[:2])
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    similarity = np.einsum("qd,qmd->qm", queries, neighbours)
    weights = np.where(use, np.maximum(similarity, 0.0) ** alpha, 0.0)
    expanded = queries + np.einsum("qm,qmd->qd", weights, neighbours)
    norms = np.linalg.norm(expanded, axis=1, keepdims=True)
    out = np.where(norms > 0, expanded / np.where(norms > 0, norms, 1.0), queries)
    return np.where(use.any(1, keepdims=True), out, queries).astype(np.float32)


def feeding(hits: ImageHits, inliers: np.ndarray | None, top: int, min_inliers: int | None) -> np.ndarray:
    """(nq, top) bool: which of each query's first ``top`` results feed the expansion: every result that
    exists, or (``min_inliers`` given, i.e. verified_only with a verify stage) only those verified."""
    use = hits.images[:, :top] >= 0
    if min_inliers is not None:
        checked = np.full(use.shape, -1) if inliers is None else inliers[:, :top]
        use &= checked >= min_inliers
    return use


def expand_and_search(cfg: DictConfig, query_vectors: np.ndarray, first,
                      winner_vectors: Callable[[ImageHits], np.ndarray],
                      search_and_rerank: Callable[[np.ndarray, np.ndarray], object]):
    """Alpha-QE after the first search and re-ranking ``first`` (a RerankResult), when ``cfg.qe.top`` > 0.

    ``cfg``: the ``rerank`` group. ``winner_vectors(hits)`` gives the descriptors (nq, top, d) of the winning
    patches of ``hits[:, :top]``; ``search_and_rerank(rows, vectors)`` searches again with ``vectors`` for the
    queries ``rows`` and re-ranks (same stage). Queries with nothing to expand with keep their first
    results. Returns the RerankResult of every query, its timing extended with the expansion's, and which
    queries were expanded (nq,) bool.
    """
    top = int(cfg.qe.top)
    if top <= 0 or len(query_vectors) == 0:
        return first, np.zeros(len(query_vectors), bool)
    started = time.perf_counter()
    verifies = str(cfg.stage) in ("verify", "both")
    min_inliers = int(cfg.verify.min_inliers) if verifies and bool(cfg.qe.verified_only) else None
    top = min(top, first.hits.images.shape[1])
    use = feeding(first.hits, first.inliers, top, min_inliers)
    rows = np.flatnonzero(use.any(1))
    timing = dict(first.timing)
    timing.update(qe_queries_expanded=int(len(rows)), qe_results_used=int(use.sum()))
    hits, inliers = first.hits, first.inliers
    if len(rows):
        neighbours = winner_vectors(ImageHits(hits.images[rows, :top], hits.scores[rows, :top], hits.patches[rows, :top]))
        expanded = alpha_query_expansion(query_vectors[rows], neighbours, use[rows], float(cfg.qe.alpha))
        second = search_and_rerank(rows, expanded)
        hits = ImageHits(*(None if a is None else a.copy() for a in (hits.images, hits.scores, hits.patches, hits.boxes)))
        for name in ("images", "scores", "patches", "boxes"):
            if getattr(hits, name) is not None:
                getattr(hits, name)[rows] = getattr(second.hits, name)
        if inliers is not None:
            inliers = inliers.copy()
            inliers[rows] = second.inliers
        for name in ("refine_windows_encoded", "verify_images_described"):
            if name in second.timing:
                timing[name] = timing.get(name, 0) + second.timing[name]
    seconds = time.perf_counter() - started
    timing["qe_ms_per_query"] = round(1000 * seconds / len(query_vectors), 1)
    logger.info(f"query expansion (alpha-QE, top {top}, alpha {float(cfg.qe.alpha):g}"
                f"{', verified only' if min_inliers is not None else ''}): {len(rows):,} of {len(query_vectors):,} "
                f"queries expanded with {int(use.sum()):,} results, searched again and re-ranked in {seconds:.1f} s")
    return type(first)(hits, timing, inliers), use.any(1)
