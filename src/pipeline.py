"""Pipeline: one function per task, composing the stages.

    data -> model -> pyramid/extraction (cached) -> index (cached) -> search -> metrics -> run report

``main.py`` only parses the command line and calls ``run(cfg)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from loguru import logger
from omegaconf import DictConfig, OmegaConf

from . import index as faiss_index
from .cache import CacheError, content_key, list_key, load_arrays, save_arrays
from .data import (IMAGE_EXTENSIONS, Dataset, DataError, ImageRecord, read_folder, read_ilias_layout, read_manifest,
                   write_manifest)
from .extraction import (ExtractStats, FeatureStore, PatchFeatures, describe_images, extract_missing,
                         extract_pooled)
from .metrics import QueryResult, evaluate, resolve_iou_thresholds
from .model import LoadedModel, load_model
from .pyramid import MAX_LEVEL, levels_for
from .rerank import rerank
from .report import RunReport
from .search import ImageHits, search_images


class ConfigError(ValueError):
    """A setting that cannot work; one line."""


# ----------------------------------------------------------------------------- data

def load_dataset(cfg: DictConfig) -> Dataset:
    """The dataset of ``cfg.dataset``: ILIAS layout (generated first for mini-ILIAS) or a folder."""
    root = Path(cfg.root)
    if cfg.kind == "folder":
        return read_folder(root)
    if cfg.kind != "ilias":
        raise ConfigError(f"dataset.kind must be 'ilias' or 'folder', got {cfg.kind!r}")
    if cfg.get("generate") and not (root / cfg.core_dir).is_dir():
        from .mini_ilias import MiniIliasConfig, generate

        logger.info(f"generating mini-ILIAS into {root} ({dict(cfg.generate)})")
        generate(root, MiniIliasConfig(**cfg.generate))
    suffix = "" if cfg.split == "test" else f"_{cfg.split}"
    query_manifest, gallery_manifest = root / f"query{suffix}.json", root / f"gallery{suffix}.json"
    if cfg.pin_manifest or cfg.split != "test":
        dataset = Dataset(name=cfg.name, root=root, queries=read_manifest(query_manifest, root),
                          gallery=read_manifest(gallery_manifest, root))
        logger.info(f"dataset {cfg.name}: read pinned manifests {query_manifest.name}, {gallery_manifest.name}")
    else:
        dataset = read_ilias_layout(root, cfg.core_dir, cfg.get("distractors"))
        dataset.name = cfg.name
        write_manifest(query_manifest, dataset.queries, root)
        write_manifest(gallery_manifest, dataset.gallery, root)
    if not dataset.gallery:
        raise DataError(f"{root}: the gallery is empty")
    labelled = sum(r.instance is not None for r in dataset.gallery)
    logger.info(f"dataset {cfg.name}: {len(dataset.queries):,} queries, {len(dataset.gallery):,} gallery images "
                f"({labelled:,} positives, {len(dataset.gallery) - labelled:,} distractors)")
    return dataset


# ----------------------------------------------------------------------------- features

@dataclass
class FeatureSource:
    """Extracts (if needed) and gathers features of records for any level."""

    model: LoadedModel        # describes gallery patches
    query_model: LoadedModel  # describes whole query images (the same model, except in pool mode)
    model_name: str
    cfg: DictConfig  # the whole config
    stats: list[ExtractStats]

    def store(self, model: LoadedModel, level: int, region: str = "full", mode: str = "crop") -> FeatureStore:
        store = FeatureStore(Path(self.cfg.paths.features), self.model_name, model.fingerprint, level, mode, region,
                             writer=int(self.cfg.extract.shard))
        store.open()
        return store

    def features(self, records: list[ImageRecord], levels: list[int], region: str = "full",
                 desc: str = "gallery") -> PatchFeatures:
        """Patch features of ``records`` at ``levels`` (extracted if missing), all levels concatenated.

        Pool mode describes every level from one pass per image.
        """
        ex = self.cfg.extract
        if self.cfg.pyramid.mode == "pool":
            split = int(self.cfg.pyramid.pool_split_block)
            stores = {level: self.store(self.model, level, region, mode=f"pool-b{split}") for level in levels}
            self.stats.append(extract_pooled(stores, records, self.model, split_block=split,
                                             batch_size=ex.batch_size, num_workers=ex.num_workers,
                                             chunk_size=ex.chunk_size, desc=f"{desc} L{'-'.join(map(str, levels))}"))
        else:
            stores = {level: self.store(self.model, level, region) for level in levels}
            for level, store in stores.items():
                self.stats.append(extract_missing([store], records, [self.model], batch_size=ex.batch_size,
                                                  num_workers=ex.num_workers, chunk_size=ex.chunk_size,
                                                  desc=f"{desc} L{level}"))
        return PatchFeatures.concat([stores[level].gather(records, expected_dim=self.model.dim)[0] for level in levels])

    def totals(self) -> dict:
        """Images extracted and reused, unreadable images, and extraction seconds over all stages so far."""
        return {"extracted": sum(s.extracted for s in self.stats), "reused": sum(s.reused for s in self.stats),
                "failed": sorted({e for s in self.stats for e in s.failed}),
                "seconds": round(sum(s.seconds for s in self.stats), 2)}

    def queries(self, records: list[ImageRecord], region: str = "full") -> PatchFeatures:
        """One global descriptor per query image (level 0: the whole image or its box), cached."""
        ex = self.cfg.extract
        store = self.store(self.query_model, 0, region)
        self.stats.append(extract_missing([store], records, [self.query_model], batch_size=ex.batch_size,
                                          num_workers=ex.num_workers, chunk_size=ex.chunk_size, desc="queries L0"))
        return store.gather(records, expected_dim=self.query_model.dim)[0]


def _sized(model_cfg: DictConfig, image_size: int) -> DictConfig:
    return OmegaConf.merge(model_cfg, {"image_size": int(image_size)})


def make_feature_source(cfg: DictConfig) -> FeatureSource:
    """The model of ``cfg.model`` and its caches. In pool mode the gallery model runs at
    ``pyramid.pool_image_size`` and queries at ``pyramid.pool_query_size`` (0: the same)."""
    if cfg.pyramid.mode not in ("crop", "pool"):
        raise ConfigError(f"pyramid.mode must be crop or pool, got {cfg.pyramid.mode!r}")
    load = partial(load_model, device=cfg.extract.device, precision=cfg.extract.precision)
    if cfg.pyramid.mode == "crop":
        model = query_model = load(cfg.model)
    else:
        model = load(_sized(cfg.model, cfg.pyramid.pool_image_size))
        query_size = int(cfg.pyramid.pool_query_size) or int(cfg.pyramid.pool_image_size)
        query_model = model if query_size == model.input_size else load(_sized(cfg.model, query_size))
    logger.info(f"model {cfg.model.name}: {cfg.model.timm_name} ({model.fingerprint['weights']}), "
                f"input {model.input_size}px (queries {query_model.input_size}px), layer {cfg.model.layer}, "
                f"pool {cfg.model.pool}, dim {model.dim}, {model.device}{' fp16' if model.half else ''}")
    return FeatureSource(model, query_model, cfg.model.name, cfg, [])


# ----------------------------------------------------------------------------- index

def index_spec(cfg: DictConfig) -> faiss_index.IndexSpec:
    return faiss_index.IndexSpec(kind=cfg.kind, m=int(cfg.get("m", 16)), nlist=int(cfg.get("nlist", 256)),
                                 nbits=int(cfg.get("nbits", 8)), nprobe=int(cfg.get("nprobe", 256)),
                                 metric=str(cfg.metric))


def training_levels(train_level: int, indexed_levels: list[int]) -> list[int]:
    """Levels whose patches train the quantizers: -1 the indexed ones, -2 all, k level k."""
    if train_level == -1:
        return list(indexed_levels)
    if train_level == -2:
        return list(range(MAX_LEVEL + 1))
    if 0 <= train_level <= MAX_LEVEL:
        return [train_level]
    raise ConfigError(f"index.train_level must be -1, -2 or 0..{MAX_LEVEL}, got {train_level}")


def training_sample(vectors: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """At most ``limit`` rows, drawn without replacement with a fixed seed."""
    if len(vectors) <= limit:
        return vectors
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size=limit, replace=False))
    return vectors[rows]


def build_index(cfg: DictConfig, source: FeatureSource, gallery: list[ImageRecord],
                patches: PatchFeatures, levels: list[int]):
    """Trained (cached) and populated (cached) FAISS index over ``patches``."""
    spec = index_spec(cfg.index)
    dim = patches.dim
    factory = spec.factory_string(dim)
    use_gpu = {"auto": faiss_index.gpu_available(), True: True, False: False}[cfg.index.use_gpu]
    if not spec.needs_training():
        index = faiss_index.create_index(spec, dim)
        faiss_index.add_vectors(index, patches.vectors, 0)
        return faiss_index.to_device(index, use_gpu)
    train_levels = training_levels(int(cfg.index.train_level), levels)
    gallery_key = list_key([f"{r.id}:{r.file_signature()}" for r in gallery])
    train_fields = {"model": source.model.fingerprint, "mode": cfg.pyramid.mode, "factory": factory,
                    "metric": spec.metric, "train_levels": train_levels, "gallery": gallery_key,
                    "max_train": int(cfg.index.max_train_vectors), "seed": int(cfg.seed)}
    folder = Path(cfg.paths.indices)
    name = f"{cfg.model.name}.{spec.slug(dim)}.train{'-'.join(map(str, train_levels))}"
    trained_path = folder / f"{name}-{content_key(train_fields)}.trained.faiss"
    populated_fields = {**train_fields, "levels": levels}
    populated_path = folder / f"{name}.L{'-'.join(map(str, levels))}-{content_key(populated_fields)}.populated.faiss"
    if populated_path.exists():
        index = faiss_index.read_index(populated_path)
        if index.ntotal == len(patches.vectors) and index.d == dim:
            logger.info(f"index: reused {populated_path.name} ({index.ntotal:,} vectors)")
            return faiss_index.to_device(index, use_gpu)
        logger.warning(f"{populated_path}: stale index ({index.ntotal} vectors, expected {len(patches.vectors)}); rebuilding")
    if trained_path.exists():
        index = faiss_index.read_index(trained_path)
        logger.info(f"index: reused trained {trained_path.name}")
    else:
        train = patches.vectors if train_levels == levels else source.features(gallery, train_levels, desc="train").vectors
        train = training_sample(train, int(cfg.index.max_train_vectors), int(cfg.seed))
        faiss_index.check_training_size(spec, len(train))
        started = time.perf_counter()
        index = faiss_index.to_device(faiss_index.create_index(spec, dim), use_gpu)
        faiss_index.train_index(index, train, spec, seed=int(cfg.seed))
        faiss_index.write_index(index, trained_path)
        logger.info(f"index: trained {factory} on {len(train):,} vectors of levels {train_levels} "
                    f"in {time.perf_counter() - started:.1f} s -> {trained_path.name}")
    index = faiss_index.to_device(index, use_gpu)
    faiss_index.add_vectors(index, patches.vectors, 0)
    faiss_index.write_index(index, populated_path)
    logger.info(f"index: populated {index.ntotal:,} vectors ({faiss_index.index_nbytes(index) / max(len(gallery), 1):,.0f} "
                f"bytes per image) -> {populated_path.name}")
    return index


# ----------------------------------------------------------------------------- tasks

def _query_region(cfg: DictConfig) -> str:
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


def rerank_hits(cfg: DictConfig, source: FeatureSource, dataset: Dataset, hits: ImageHits, patches: PatchFeatures,
                queries: PatchFeatures):
    """The ``rerank`` stage (src/rerank.py) on search's hits: tighter boxes and/or verified re-ranking."""
    size = int(cfg.rerank.refine.image_size)

    def refine_model() -> LoadedModel:
        if size in (0, source.model.input_size):
            return source.model
        return load_model(_sized(cfg.model, size), device=cfg.extract.device, precision=cfg.extract.precision)

    return rerank(cfg.rerank, queries=dataset.queries, gallery=dataset.gallery, hits=hits, patch_boxes=patches.boxes,
                  patch_vectors=patches.vectors, patch_image=patches.image, patch_level=patches.level,
                  query_vectors=queries.vectors, refine_model=refine_model,
                  features_root=Path(cfg.paths.features) / "rerank", batch_size=int(cfg.extract.batch_size))


def run_eval(cfg: DictConfig, report: RunReport) -> dict:
    """Extract, index, search and score one configuration; write the run folder."""
    dataset = load_dataset(cfg.dataset)
    levels = levels_for(int(cfg.pyramid.level), cfg.pyramid.multi_scale)
    source = make_feature_source(cfg)
    queries = source.queries(dataset.queries, region=_query_region(cfg))
    if len(np.unique(queries.image)) != len(dataset.queries):
        readable = set(queries.image.tolist())
        dropped = [q.id for i, q in enumerate(dataset.queries) if i not in readable]
        raise DataError(f"{dropped[0]}: query image unreadable ({len(dropped)} unreadable queries); fix or remove it")
    gallery = source.features(dataset.gallery, levels, desc="gallery")
    started = time.perf_counter()
    index = build_index(cfg, source, dataset.gallery, gallery, levels)
    faiss_index.set_nprobe(index, int(cfg.index.get("nprobe", 1)))
    k = int(cfg.eval.k)
    hits = search_images(index, queries.vectors, gallery.image, k, metric=str(cfg.index.metric))
    search_seconds = time.perf_counter() - started
    logger.info(f"search: {len(queries.vectors):,} queries over {len(gallery.vectors):,} patches of "
                f"{len(dataset.gallery):,} images (index + search) in {search_seconds:.2f} s")
    reranked = rerank_hits(cfg, source, dataset, hits, gallery, queries)
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
                         "skipped_images": totals["failed"]}
    report.write_results(results, hits, metrics)
    if cfg.eval.visualize:
        report.write_visuals(dataset, results, hits, metrics, top=int(cfg.eval.visualize_top),
                             max_queries=int(cfg.eval.visualize_max_queries))
        logger.info(f"pictures: {report.dir / 'pictures'}, report: {report.dir / 'report.html'}")
    return metrics


def shard_of(records: list[ImageRecord], shard: int, num_shards: int) -> list[ImageRecord]:
    """The ``shard``-th of ``num_shards`` contiguous, near-equal slices of ``records``."""
    if not 0 <= shard < num_shards:
        raise ConfigError(f"extract.shard must be in 0..{num_shards - 1}, got {shard}")
    return records[len(records) * shard // num_shards:len(records) * (shard + 1) // num_shards]


def run_extract(cfg: DictConfig, report: RunReport) -> dict:
    """Only fill the feature caches (queries at L0 and gallery at every indexed level).

    With ``extract.num_shards=N``, this run takes slice ``extract.shard`` of the
    queries and of the gallery; N such runs (a Hydra multirun, locally or as Slurm
    jobs) fill the same caches with files of their own, and any later run reads them all.
    """
    dataset = load_dataset(cfg.dataset)
    levels = levels_for(int(cfg.pyramid.level), cfg.pyramid.multi_scale)
    source = make_feature_source(cfg)
    shard, shards = int(cfg.extract.shard), int(cfg.extract.num_shards)
    queries, gallery = shard_of(dataset.queries, shard, shards), shard_of(dataset.gallery, shard, shards)
    if queries:
        source.queries(queries, region=_query_region(cfg))
    source.features(gallery, levels, desc=f"gallery shard {shard}/{shards}" if shards > 1 else "gallery")
    summary = source.totals()
    report.write_json("extract.json", summary)
    return summary


# ----------------------------------------------------------------------------- index a folder, search it

def bundle_folder(cfg: DictConfig, model_fingerprint: dict, levels: list[int]) -> Path:
    """Where task=index keeps the searchable index of ``dataset.root`` for these settings."""
    fields = {"root": str(Path(cfg.dataset.root).resolve()), "model": model_fingerprint, "levels": levels,
              "mode": cfg.pyramid.mode, "index": dict(index_spec(cfg.index).__dict__)}
    return Path(cfg.paths.indices) / "search" / (
        f"{Path(cfg.dataset.root).resolve().name}.{cfg.model.name}.L{'-'.join(map(str, levels))}.{cfg.index.kind}"
        f"-{content_key(fields)}")


def run_index(cfg: DictConfig, report: RunReport) -> dict:
    """Index a gallery (any folder with dataset=folder) for task=search; only new or changed images are encoded."""
    dataset = load_dataset(cfg.dataset)
    levels = levels_for(int(cfg.pyramid.level), cfg.pyramid.multi_scale)
    source = make_feature_source(cfg)
    patches = source.features(dataset.gallery, levels, desc="gallery")
    index = build_index(cfg, source, dataset.gallery, patches, levels)
    folder = bundle_folder(cfg, source.model.fingerprint, levels)
    faiss_index.write_index(index, folder / "index.faiss")
    save_arrays(folder / "gallery.npz", ids=np.asarray([r.id for r in dataset.gallery], dtype=str),
                paths=np.asarray([str(r.path) for r in dataset.gallery], dtype=str),
                patch_image=patches.image, boxes=patches.boxes, levels=np.asarray(levels))
    totals = source.totals()
    skipped = sorted(set(totals["failed"]) | set(dataset.skipped))
    summary = {"bundle": str(folder), "images": len(dataset.gallery), "patches": int(len(patches.vectors)),
               "extracted": totals["extracted"], "reused": totals["reused"], "skipped": skipped,
               "extract_s": totals["seconds"]}
    report.write_json("index.json", summary)
    for line in skipped:
        logger.warning(f"skipped {line}")
    logger.info(f"indexed {summary['images']:,} images ({summary['patches']:,} patches; {summary['extracted']:,} newly "
                f"encoded, {summary['reused']:,} from cache, {len(skipped)} skipped) -> {folder}")
    return summary


def _query_paths(path: str | None) -> list[Path]:
    if not path:
        raise ConfigError("task=search needs a query image: query=PATH (a file or a folder of images)")
    path = Path(path)
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not found:
            raise DataError(f"{path}: no query images in this folder")
        return found
    if not path.exists():
        raise DataError(f"{path}: query image not found")
    return [path]


def run_search(cfg: DictConfig, report: RunReport) -> dict:
    """Search an index made by task=index with one or more query images; print, save JSON and pictures."""
    from .visualize import result_strip

    levels = levels_for(int(cfg.pyramid.level), cfg.pyramid.multi_scale)
    source = make_feature_source(cfg)
    folder = bundle_folder(cfg, source.model.fingerprint, levels)
    if not (folder / "index.faiss").is_file():
        raise DataError(f"{folder}: no index for {cfg.dataset.root} with these settings; run task=index first")
    index = faiss_index.read_index(folder / "index.faiss")
    gallery = load_arrays(folder / "gallery.npz")
    if index.d != source.model.dim:
        raise CacheError(f"{folder / 'index.faiss'}: index dimension {index.d} does not match the model's {source.model.dim}")
    faiss_index.set_nprobe(index, int(cfg.index.get("nprobe", 1)))
    records = [ImageRecord(id=str(p), path=p) for p in _query_paths(cfg.query.path)]
    k = int(cfg.query.top_k)
    output = []
    for record in records:
        started = time.perf_counter()
        vectors, errors = describe_images([record], source.query_model)
        if errors:
            raise DataError(errors[0])
        hits = search_images(index, vectors, gallery["patch_image"], k, metric=str(cfg.index.metric))
        seconds = time.perf_counter() - started
        valid = hits.images[0] >= 0
        top = [{"rank": rank + 1, "id": str(gallery["ids"][i]), "path": str(gallery["paths"][i]),
                "score": round(float(score), 4), "box": [round(float(v), 1) for v in gallery["boxes"][patch]]}
               for rank, (i, score, patch) in enumerate(zip(hits.images[0][valid], hits.scores[0][valid],
                                                             hits.patches[0][valid]))]
        output.append({"query": str(record.path), "seconds": round(seconds, 4), "results": top})
        print(f"\nquery {record.path} ({seconds * 1000:.0f} ms)")
        for hit in top:
            print(f"  {hit['rank']:>3}  {hit['score']:.4f}  box {hit['box']}  {hit['path']}")
        strip = result_strip(record, [{"record": ImageRecord(id=h["id"], path=Path(h["path"])), "score": h["score"],
                                       "box": tuple(h["box"]), "relevant": None, "gt_boxes": None} for h in top])
        picture = report.dir / f"search_{len(output):03d}_{record.path.stem}.jpg"
        strip.save(picture, quality=90)
        logger.info(f"picture: {picture}")
    report.write_json("search.json", output)
    return {"queries": len(output), "results": str(report.dir / "search.json")}


TASKS = {"eval": run_eval, "extract": run_extract, "index": run_index, "search": run_search}


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Run ``cfg.task`` and write its run folder."""
    if cfg.task not in TASKS:
        raise ConfigError(f"task must be one of {sorted(TASKS)}, got {cfg.task!r}")
    if int(cfg.extract.num_shards) != 1 and cfg.task != "extract":
        raise ConfigError(f"extract.num_shards={cfg.extract.num_shards} applies to task=extract only")
    report = RunReport(run_dir, cfg)
    return TASKS[cfg.task](cfg, report)
