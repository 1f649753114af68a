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
from ..feature_files import export_run_features
from ..features import FeatureSource, at_input_size, make_feature_source
from ..index import index_spec
from ..indexing import build_index, check_index_fits, index_ids
from ..metrics import QueryResult, evaluate, evaluate_revisited, evaluate_setup, resolve_iou_thresholds
from ..model import LoadedModel, load_model
from ..pyramid import levels_for
from ..report import RunReport
from ..rerank import rerank
from ..search import ImageHits, rows_of_ids, search_images

def query_region(cfg: DictConfig) -> str:
    return "bbox" if cfg.query.crop_to_bbox else "full"


def query_results(dataset: Dataset, hits: ImageHits, patches: PatchFeatures) -> list[QueryResult]:
    """Search hits -> metric inputs (ranked gallery ids, predicted boxes, positives: a benchmark's Medium ones)."""
    results = []
    gallery = dataset.gallery
    scale_of = {r.id: r.object_scale for r in gallery if r.instance is not None}
    for row, query in enumerate(dataset.queries):
        valid = hits.images[row] >= 0
        images, winners = hits.images[row][valid], hits.patches[row][valid]
        boxes = patches.boxes[winners] if hits.boxes is None else hits.boxes[row][valid]
        positives = dataset.positives_for(query)
        results.append(QueryResult(
            query_id=query.id,
            ranked_ids=[gallery[i].id for i in images],
            ranked_boxes=boxes.astype(np.float64).reshape(-1, 4),
            positives=positives,
            positive_scales={pid: scale_of[pid] for pid in positives} if dataset.protocol is None else None,
        ))
    return results


def without_junk(dataset: Dataset, results: list[QueryResult]) -> list[QueryResult]:
    """``results`` with each query's junk (a benchmark's; ILIAS has none) taken out of its ranking, as the
    benchmark's protocol ignores junk: what ``evaluate`` scores. The run folder keeps the full lists."""
    if dataset.protocol is None:
        return results
    kept = []
    for query, r in zip(dataset.queries, results):
        junk = dataset.junk_for(query)
        keep = np.fromiter((i not in junk for i in r.ranked_ids), dtype=bool, count=len(r.ranked_ids))
        kept.append(QueryResult(query_id=r.query_id, ranked_ids=[i for i, k in zip(r.ranked_ids, keep) if k],
                                ranked_boxes=None if r.ranked_boxes is None else r.ranked_boxes[keep],
                                positives=r.positives, positive_scales=r.positive_scales))
    return kept


def protocol_metrics(dataset: Dataset, results: list[QueryResult], metrics: dict) -> dict:
    """A benchmark's own protocol on top of ``evaluate``'s metrics, in place: ``revisited`` (Easy / Medium / Hard
    mAP and mP@1,5,10) or ``instre`` (mAP, mP@k); the headline ``mAP`` becomes the protocol's (revisited:
    Medium), ILIAS's AP@k of the same lists stays as ``mAP_ilias``. Per query: ``AP`` (protocol), ``AP_ilias``."""
    rankings = [r.ranked_ids for r in results]  # junk included: the protocol takes it out itself
    truths = [dataset.truth[q.id] for q in dataset.queries]
    if dataset.protocol == "revisited":
        setups = evaluate_revisited(rankings, [t.lists() for t in truths])
        headline = setups["medium"]
        metrics["revisited"] = {name: {k: v for k, v in setup.items() if k != "per_query"}
                                for name, setup in setups.items()}
    else:
        headline = evaluate_setup(rankings, [t.positives for t in truths], [t.junk for t in truths])
        metrics[dataset.protocol] = {k: v for k, v in headline.items() if k != "per_query"}
    if "mAP" in metrics:
        metrics["mAP_ilias"] = metrics["mAP"]
    metrics["mAP"] = headline["mAP"]
    metrics["protocol"] = dataset.protocol
    for row, q in enumerate(metrics.get("per_query", [])):
        if "AP" in q:
            q["AP_ilias"] = q.pop("AP")
        q["AP"] = headline["per_query"][row]["AP"]
        if dataset.protocol == "revisited":
            q["AP_easy"], q["AP_hard"] = setups["easy"]["per_query"][row]["AP"], setups["hard"]["per_query"][row]["AP"]
    return metrics


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
    imported = bool(cfg.extract.get("import_features"))  # a feature file's vectors (src/patchify/feature_files.py)
    if not imported:  # imported patches are no pyramid: FAISS's own training-size check applies
        check_index_fits(cfg, len(dataset.gallery), levels)
    source = make_feature_source(cfg)
    if imported:
        levels = source.levels  # what the file holds; pyramid.* does not select
    queries = source.queries(dataset.queries, region=query_region(cfg))
    if len(np.unique(queries.image)) != len(dataset.queries):
        readable = set(queries.image.tolist())
        dropped = [q.id for i, q in enumerate(dataset.queries) if i not in readable]
        raise DataError(f"{dropped[0]}: query image unreadable ({len(dropped)} unreadable queries); fix or remove it")
    gallery = source.features(dataset.gallery, levels, desc="gallery")
    if cfg.extract.get("export_features"):
        export_run_features(Path(str(cfg.extract.export_features)), dataset.queries, dataset.gallery, queries, gallery)
    started = time.perf_counter()
    index = build_index(cfg, source, dataset.gallery, gallery, levels)
    faiss_index.set_search_params(index, index_spec(cfg.index))
    k = int(cfg.eval.k) or len(dataset.gallery)  # eval.k=0: the whole gallery (a benchmark's full ranking)
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
    wanted = tuple(m.lower() for m in cfg.eval.metrics)
    no_boxes = imported and not source.has_boxes  # LocScore needs predicted boxes: never faked
    no_boxes_why = f"{cfg.extract.import_features} has no patch_boxes" if no_boxes else dataset.no_boxes
    metrics = evaluate(without_junk(dataset, results), k=k,
                       iou_thresholds=resolve_iou_thresholds(cfg.eval.iou_threshold),
                       metrics=tuple(m for m in wanted if not (no_boxes_why and m == "locscore")))
    if no_boxes_why and "locscore" in wanted:  # nor ground truth without boxes (revisited Oxford/Paris)
        metrics["LocScore"] = None
        metrics["not_available"] = {"LocScore": no_boxes_why}
    if dataset.protocol is not None:  # revisited Oxford/Paris, INSTRE: their own mAP beside ILIAS's
        protocol_metrics(dataset, results, metrics)
    if imported:
        metrics["features"] = source.describe()
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

