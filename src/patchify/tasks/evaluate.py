"""task=eval: extract, index, search and score one configuration on a labelled dataset; write the run folder."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from loguru import logger
from omegaconf import DictConfig

from .. import index as faiss_index
from ..data import Dataset, DataError, annotation_gaps, load_dataset
from ..expansion import expand_and_search
from ..extraction import PatchFeatures
from ..features import FeatureSource, at_input_size, make_feature_source
from ..index import index_spec
from ..indexing import build_index, check_index_fits, index_ids
from ..metrics import QueryResult, evaluate, resolve_iou_thresholds
from ..model import LoadedModel, load_model
from ..pyramid import levels_for
from ..report import RunReport
from ..rerank import rerank
from ..search import ImageHits, rows_of_ids, search_images

def query_region(cfg: DictConfig) -> str:
    return "bbox" if cfg.query.crop_to_bbox else "full"


def query_results(dataset: Dataset, hits: ImageHits, patches: PatchFeatures) -> list[QueryResult]:
    """Search hits -> metric inputs (ranked gallery ids, predicted boxes, positives)."""
    results = []
    gallery = dataset.gallery
    scale_of = {r.id: r.object_scale for r in gallery if r.instance is not None}
    for row, query in enumerate(dataset.queries):
        valid = hits.images[row] >= 0
        images, winners = hits.images[row][valid], hits.patches[row][valid]
        boxes = patches.boxes[winners] if hits.boxes is None else hits.boxes[row][valid]
        positives = dataset.positives_of(query.instance)
        results.append(QueryResult(
            query_id=query.id,
            ranked_ids=[gallery[i].id for i in images],
            ranked_boxes=boxes.astype(np.float64).reshape(-1, 4),
            positives=positives,
            positive_scales={pid: scale_of[pid] for pid in positives},
        ))
    return results


def refine_model_of(cfg: DictConfig, source: FeatureSource) -> Callable[[], LoadedModel]:
    """Loads the encoder at ``rerank.refine.image_size`` when refine runs (the run's own model at its size)."""
    size = int(cfg.rerank.refine.image_size)

    def refine_model() -> LoadedModel:
        if size in (0, source.model.input_size):
            return source.model
        return load_model(at_input_size(cfg.model, size), device=cfg.extract.device, precision=cfg.extract.precision)

    return refine_model


def rerank_hits(cfg: DictConfig, source: FeatureSource, dataset: Dataset, hits: ImageHits, patches: PatchFeatures,
                queries: PatchFeatures, rows: np.ndarray | None = None):
    """The ``rerank`` stage (src/patchify/rerank.py) on search's hits: tighter boxes and/or verified re-ranking.
    ``rows``: the queries ``hits`` belong to (all when None)."""
    records = dataset.queries if rows is None else [dataset.queries[r] for r in rows]
    return rerank(cfg.rerank, queries=records, gallery=dataset.gallery, hits=hits, patch_boxes=patches.boxes,
                  patch_vectors=patches.vectors, patch_image=patches.image, patch_level=patches.level,
                  query_vectors=queries.vectors if rows is None else queries.vectors[rows],
                  refine_model=refine_model_of(cfg, source), features_root=Path(cfg.paths.features) / "rerank",
                  batch_size=int(cfg.extract.batch_size))


def run_eval(cfg: DictConfig, report: RunReport) -> dict:
    """Extract, index, search and score one configuration; write the run folder."""
    dataset = load_dataset(cfg.dataset, manifests=report.dir)
    levels = levels_for(int(cfg.pyramid.level), cfg.pyramid.multi_scale)
    check_index_fits(cfg, len(dataset.gallery), levels)
    source = make_feature_source(cfg)
    queries = source.queries(dataset.queries, region=query_region(cfg))
    if len(np.unique(queries.image)) != len(dataset.queries):
        readable = set(queries.image.tolist())
        dropped = [q.id for i, q in enumerate(dataset.queries) if i not in readable]
        raise DataError(f"{dropped[0]}: query image unreadable ({len(dropped)} unreadable queries); fix or remove it")
    gallery = source.features(dataset.gallery, levels, desc="gallery")
    started = time.perf_counter()
    index = build_index(cfg, source, dataset.gallery, gallery, levels)
    faiss_index.set_search_params(index, index_spec(cfg.index))
    k = int(cfg.eval.k)
    ids = index_ids(cfg.index, gallery, levels)
    row_of_id = None if ids is None else rows_of_ids(ids)
    hits = search_images(index, queries.vectors, gallery.image, k, metric=str(cfg.index.metric), row_of_id=row_of_id)
    search_seconds = time.perf_counter() - started
    logger.info(f"search: {len(queries.vectors):,} queries over {len(gallery.vectors):,} patches of "
                f"{len(dataset.gallery):,} images (index + search) in {search_seconds:.2f} s")
    reranked = rerank_hits(cfg, source, dataset, hits, gallery, queries)

    def search_and_rerank(rows: np.ndarray, vectors: np.ndarray):  # query expansion's second search
        again = search_images(index, vectors, gallery.image, k, metric=str(cfg.index.metric), row_of_id=row_of_id)
        return rerank_hits(cfg, source, dataset, again, gallery, queries, rows)

    reranked, _ = expand_and_search(cfg.rerank, queries.vectors, reranked, lambda top: gallery.vectors[top.patches],
                                    search_and_rerank)
    hits = reranked.hits
    results = query_results(dataset, hits, gallery)
    metrics = evaluate(results, k=k, iou_thresholds=resolve_iou_thresholds(cfg.eval.iou_threshold),
                       metrics=tuple(m.lower() for m in cfg.eval.metrics))
    totals = source.totals()
    metrics["timing"] = {"extract_s": totals["seconds"],
                         "extract_s_by_stage": {s.desc: round(s.seconds, 2) for s in source.stats if s.extracted},
                         "index_and_search_s": round(search_seconds, 2), **reranked.timing}
    metrics["counts"] = {"queries": len(dataset.queries), "gallery_images": len(dataset.gallery),
                         "gallery_patches": int(len(gallery.vectors)), "levels": levels,
                         "extracted_images": totals["extracted"], "reused_images": totals["reused"],
                         "skipped_images": sorted(set(totals["failed"]) | set(dataset.skipped))}
    gaps = annotation_gaps(dataset)
    metrics["counts"].update({kind: len(ids) for kind, ids in gaps.items()})
    metrics["annotation_gaps"] = gaps  # the ids, listed
    report.write_results(results, hits, metrics)
    if cfg.eval.visualize:
        report.write_visuals(dataset, results, hits, metrics, top=int(cfg.eval.visualize_top),
                             max_queries=int(cfg.eval.visualize_max_queries))
        logger.info(f"pictures: {report.dir / 'pictures'}, report: {report.dir / 'report.html'}")
    return metrics

