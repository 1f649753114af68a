"""task=index: index a gallery (any folder with dataset=folder) into a search bundle, or one step of a sharded build."""

from __future__ import annotations

import numpy as np
from loguru import logger
from omegaconf import DictConfig

from ..bundle import write_bundle
from ..data import Dataset, ImageRecord, load_dataset
from ..extraction import PatchFeatures
from ..features import FeatureSource, make_feature_source
from ..indexing import (build_index, bundle_folder, check_index_fits, index_files, index_ids, index_on_gpu,
                        populate_index_shard, shard_bounds, trained_index)
from ..pyramid import levels_for
from ..report import RunReport
from ..settings import ConfigError

def run_index_step(cfg: DictConfig, report: RunReport, gallery: list[ImageRecord], source: FeatureSource,
                   levels: list[int]) -> dict:
    """One step of a sharded build: ``index.shard=train`` trains the quantizers, ``index.shard=i`` fills shard i.

    Shard i holds the i-th of ``index.shards`` slices of the gallery (the slicing of extract.shard); its
    features are read from the cache (extracted first if missing).
    """
    files = index_files(cfg, source.model.fingerprint, gallery, levels, source.model.dim, source.keys)
    if cfg.index.shard == "train":
        trained_index(cfg, source, gallery, levels, files)
        summary = {"trained": str(files.trained)}
    else:
        shard = int(cfg.index.shard)
        if not files.trained.exists():
            raise ConfigError(f"{files.trained}: no trained index yet; run task=index index.shard=train "
                              "with the same settings first")
        lo, hi = shard_bounds(len(gallery), shard, files.shards)
        source.writer = shard
        patches = source.features(gallery[lo:hi], levels, desc=f"gallery shard {shard}/{files.shards}")
        patches = PatchFeatures(patches.vectors, patches.image + lo, patches.boxes, patches.level)
        populate_index_shard(files, shard, patches, levels, index_on_gpu(cfg))
        summary = {"shard": str(files.shard(shard)), "images": hi - lo, "patches": int(len(patches.vectors))}
    summary.update(extract=source.totals())
    report.write_json("index.json", summary)
    return summary


def run_index(cfg: DictConfig, report: RunReport) -> dict:
    """Index a gallery (any folder with dataset=folder) for task=search; only new or changed images are encoded.

    With ``index.shard`` set, only that step of a sharded build (:func:`run_index_step`).
    """
    dataset = load_dataset(cfg.dataset)
    levels = levels_for(int(cfg.pyramid.level), cfg.pyramid.multi_scale)
    check_index_fits(cfg, len(dataset.gallery), levels)
    source = make_feature_source(cfg)
    if cfg.index.get("shard") is not None:
        return run_index_step(cfg, report, dataset.gallery, source, levels)
    patches = source.features(dataset.gallery, levels, desc="gallery")
    index = build_index(cfg, source, dataset.gallery, patches, levels)
    folder = bundle_folder(cfg, source.model.fingerprint, levels)
    ids = index_ids(cfg.index, patches, levels)
    build = write_bundle(folder, index, {
        "ids": np.asarray([r.id for r in dataset.gallery], dtype=str),
        "paths": np.asarray([str(r.path) for r in dataset.gallery], dtype=str),
        "patch_image": patches.image, "boxes": patches.boxes, "levels": np.asarray(levels),
        **({} if ids is None else {"patch_ids": ids})})
    totals = source.totals()
    skipped = unsearchable_images(dataset, patches, totals["failed"])
    summary = {"bundle": str(folder), "build": str(build), "images": int(len(np.unique(patches.image))),
               "patches": int(len(patches.vectors)), "extracted": totals["extracted"], "reused": totals["reused"],
               "skipped": skipped, "extract_s": totals["seconds"]}
    report.write_json("index.json", summary)
    for line in skipped:
        logger.warning(f"skipped {line}")
    logger.info(f"indexed {summary['images']:,} images ({summary['patches']:,} patches; {summary['extracted']:,} newly "
                f"encoded, {summary['reused']:,} from cache, {len(skipped)} skipped) -> {folder}")
    return summary


def unsearchable_images(dataset: Dataset, patches: PatchFeatures, failed: list[str]) -> list[str]:
    """One message per gallery image that is not in the index, sorted: unreadable when scanned or when
    decoded (by this run or, remembered by the feature cache, an earlier one), or without any patch."""
    skipped = set(failed) | set(dataset.skipped)
    indexed = set(np.unique(patches.image).tolist())
    for i, record in enumerate(dataset.gallery):
        if i not in indexed and not any(message.startswith(f"{record.path}:") for message in skipped):
            skipped.add(f"{record.path}: no patches in the feature cache (unreadable when it was encoded)")
    return sorted(skipped)

