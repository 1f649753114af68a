"""Pipeline: one function per task, composing the stages.

    data -> model -> pyramid/extraction (cached) -> index (cached) -> search -> metrics -> run report

``main.py`` only parses the command line and calls ``run(cfg)``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from loguru import logger
from omegaconf import DictConfig, OmegaConf

from . import index as faiss_index
from .bundle import read_bundle, write_bundle
from .cache import CacheError, content_key, list_key
from .crops import with_crops
from .data import (Dataset, DataError, ImageRecord, annotation_gaps, image_files, read_folder, read_ilias_layout,
                   read_manifest, write_manifest)
from .digests import DEFAULT_KEYS, DigestMemo, ImageKeys
from .extraction import (CorruptChunk, ExtractStats, FeatureStore, PatchFeatures, describe_images, extract_missing,
                         extract_pooled, warn_old_stores)
from .metrics import QueryResult, evaluate, resolve_iou_thresholds
from .model import LoadedModel, ModelConfigError, load_model, resolve_device, resolve_precision
from .pyramid import MAX_LEVEL, levels_for, patches_per_image
from .rerank import rerank
from .report import RunReport
from .search import ImageHits, rows_of_ids, search_images
from .settings import ConfigError, expand_paths, validate  # noqa: F401 (ConfigError: pipeline.ConfigError stays importable)


# ----------------------------------------------------------------------------- data

def load_dataset(cfg: DictConfig, manifests: Path | None = None) -> Dataset:
    """The dataset of ``cfg.dataset``: ILIAS layout (generated first for mini-ILIAS) or a folder.

    Nothing is written into the dataset folder (it may be a read-only mount): a scanned ILIAS layout's
    manifests go to ``manifests`` (the run folder) when given; pinned ones are read from ``root``.
    """
    root = Path(cfg.root)
    if cfg.kind == "folder":
        return read_folder(root)
    if cfg.kind != "ilias":
        raise ConfigError(f"dataset.kind must be 'ilias' or 'folder', got {cfg.kind!r}")
    if cfg.get("generate") and not (root / cfg.core_dir).is_dir():
        from .datasets.mini_ilias import MiniIliasConfig, generate

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
        if manifests is not None:
            write_manifest(Path(manifests) / query_manifest.name, dataset.queries, root)
            write_manifest(Path(manifests) / gallery_manifest.name, dataset.gallery, root)
    if not dataset.gallery:
        raise DataError(f"{root}: the gallery is empty")
    for line in dataset.skipped:
        logger.warning(f"skipped distractor {line}")
    warn_annotation_gaps(annotation_gaps(dataset))
    labelled = sum(r.instance is not None for r in dataset.gallery)
    logger.info(f"dataset {cfg.name}: {len(dataset.queries):,} queries, {len(dataset.gallery):,} gallery images "
                f"({labelled:,} positives, {len(dataset.gallery) - labelled:,} distractors)")
    return dataset


def warn_annotation_gaps(gaps: dict[str, list[str]], shown: int = 3) -> None:
    """One warning line per kind of ground-truth gap, with the count and the first few ids."""
    why = {"positives_without_boxes": "positives have no _bbox.txt (LocScore never counts them as localised)",
           "queries_without_positives": "queries have no positive in the gallery (no <instance>/pos/ images; "
                                        "each scores AP 0)"}
    for kind, ids in gaps.items():
        if ids:
            more = f", ... ({len(ids) - shown} more)" if len(ids) > shown else ""
            logger.warning(f"{len(ids)} {why[kind]}: {', '.join(ids[:shown])}{more}; counted in metrics.json")


# ----------------------------------------------------------------------------- features

@dataclass
class FeatureSource:
    """Extracts (if needed) and gathers features of records for any level."""

    model: LoadedModel        # describes gallery patches
    query_model: LoadedModel  # describes whole query images (the same model, except in pool mode)
    model_name: str
    cfg: DictConfig  # the whole config
    stats: list[ExtractStats]
    writer: int = 0  # shard index, part of this run's chunk file names
    l0_model: LoadedModel | None = None  # pool mode, pool_l0=whole: describes L0 as crop mode does
    keys: ImageKeys = field(default_factory=ImageKeys)  # what each image is (hash of its bytes), memoised
    cached_failures: set[str] = field(default_factory=set)  # read errors of images reused from the cache

    def store(self, model: LoadedModel, level: int, region: str = "full", mode: str = "crop") -> FeatureStore:
        store = FeatureStore(Path(self.cfg.paths.features), self.model_name, model.fingerprint, level, mode, region,
                             writer=self.writer, keys=self.keys)
        store.open()
        return store

    def features(self, records: list[ImageRecord], levels: list[int], region: str = "full",
                 desc: str = "gallery") -> PatchFeatures:
        """Patch features of ``records`` at ``levels`` (extracted if missing), all levels concatenated.

        Pool mode describes every level from one pass per image, except L0 with
        ``pyramid.pool_l0=whole``: the whole image at the model's own input size, crop mode's L0.
        A cache chunk found corrupt while gathering is set aside, and its images are extracted again (``_filled``).
        """
        ex = self.cfg.extract
        batching = dict(batch_size=ex.batch_size, num_workers=ex.num_workers, chunk_size=ex.chunk_size)

        def fill() -> dict[int, FeatureStore]:
            if self.cfg.pyramid.mode == "pool":
                return self._pool_stores(records, levels, region, desc, batching)
            stores = {level: self.store(self.model, level, region) for level in levels}
            self.stats.append(extract_missing(list(stores.values()), records, [self.model] * len(levels),
                                              **batching, desc=f"{desc} L{'-'.join(map(str, levels))}"))
            return stores

        return self._filled(fill, records, levels, self.model.dim)

    def _filled(self, fill: Callable[[], dict[int, FeatureStore]], records: list[ImageRecord], levels: list[int],
                dim: int) -> PatchFeatures:
        """``fill()`` the stores (extracting what they lack), then gather ``levels``; a chunk found corrupt while
        gathering is set aside by the store, so filling again re-extracts its images (up to three rounds)."""
        for attempt in range(3):
            stores = fill()
            try:
                return PatchFeatures.concat([self._gather(stores[level], records, dim) for level in levels])
            except CorruptChunk:
                if attempt == 2:
                    raise CacheError(f"{stores[levels[0]].folder}: cache chunks keep failing their checks; "
                                     "is another program writing there?") from None
        raise AssertionError("unreachable")

    def _gather(self, store: FeatureStore, records: list[ImageRecord], dim: int) -> PatchFeatures:
        """``store.gather``, remembering the read errors of reused images (listed by every run)."""
        patches, errors = store.gather(records, expected_dim=dim)
        self.cached_failures.update(errors)
        return patches

    def _pool_stores(self, records: list[ImageRecord], levels: list[int], region: str, desc: str,
                     batching: dict) -> dict[int, FeatureStore]:
        """Pool mode's stores at ``levels``, filled: L0 as crop mode's (``pool_l0=whole``), the rest pooled."""
        stores: dict[int, FeatureStore] = {}
        if self.l0_model is not None and 0 in levels:  # crop mode's L0, and its cache
            stores[0] = self.store(self.l0_model, 0, region)
            self.stats.append(extract_missing([stores[0]], records, [self.l0_model], **batching, desc=f"{desc} L0"))
        pooled_levels = [level for level in levels if level not in stores]
        if not pooled_levels:
            return stores
        split, method, cell_pos = pool_settings(self.cfg.pyramid)
        mode = pooled_store_mode(self.cfg.pyramid)
        pooled = {level: self.store(self.model, level, region, mode=mode) for level in pooled_levels}
        self.stats.append(extract_pooled(pooled, records, self.model, split_block=split, method=method,
                                         cell_pos=cell_pos, **batching,
                                         desc=f"{desc} L{'-'.join(map(str, pooled_levels))}"))
        return {**stores, **pooled}

    def totals(self) -> dict:
        """Images extracted and reused, unreadable images (this run's and cached), and extraction seconds."""
        self.keys.memo.save()
        return {"extracted": sum(s.extracted for s in self.stats), "reused": sum(s.reused for s in self.stats),
                "failed": sorted({**{e.split(": ", 1)[0]: e for e in self.cached_failures},  # one line per file
                                  **{e.split(": ", 1)[0]: e for s in self.stats for e in s.failed}}.values()),
                "seconds": round(sum(s.seconds for s in self.stats), 2)}

    def queries(self, records: list[ImageRecord], region: str = "full") -> PatchFeatures:
        """One global descriptor per query image (level 0: the whole image or its box), cached."""
        ex = self.cfg.extract

        def fill() -> dict[int, FeatureStore]:
            store = self.store(self.query_model, 0, region)
            self.stats.append(extract_missing([store], records, [self.query_model], batch_size=ex.batch_size,
                                              num_workers=ex.num_workers, chunk_size=ex.chunk_size, desc="queries L0"))
            return {0: store}

        return self._filled(fill, records, [0], self.query_model.dim)


def pool_settings(pyramid: DictConfig) -> tuple[int, str, str]:
    """Pool mode's split block, method and cell positions (masked cells keep the image's)."""
    split, method = int(pyramid.pool_split_block), str(pyramid.pool_method)
    return split, method, str(pyramid.get("pool_cell_pos", "local")) if method == "split" else "global"


def pooled_store_mode(pyramid: DictConfig) -> str:
    """Mode name of the feature stores of pooled cells (split with global positions keeps "pool-b{split}")."""
    split, method, cell_pos = pool_settings(pyramid)
    variant = method if method != "split" else None if cell_pos == "global" else cell_pos
    return f"pool-{variant}-b{split}" if variant else f"pool-b{split}"


def patch_mode(pyramid: DictConfig) -> str:
    """Everything about how gallery patches are described beyond the model: ``crop``, or pool mode's
    method, split block, cell positions and L0 source (index and bundle keys)."""
    if pyramid.mode != "pool":
        return str(pyramid.mode)
    return f"{pooled_store_mode(pyramid)}.L0-{pyramid.get('pool_l0', 'whole')}"


def _sized(model_cfg: DictConfig, image_size: int) -> DictConfig:
    return OmegaConf.merge(model_cfg, {"image_size": int(image_size)})


def make_feature_source(cfg: DictConfig) -> FeatureSource:
    """The model of ``cfg.model`` and its caches. In pool mode the gallery model runs at
    ``pyramid.pool_image_size`` and queries at ``pyramid.pool_query_size`` (0: the model's own
    input size, as in crop mode, whose query descriptors it then shares)."""
    if cfg.pyramid.mode not in ("crop", "pool"):
        raise ConfigError(f"pyramid.mode must be crop or pool, got {cfg.pyramid.mode!r}")
    load = partial(load_model, device=cfg.extract.device, precision=cfg.extract.precision)
    l0_model = None
    if cfg.pyramid.mode == "crop":
        model = query_model = load(cfg.model)
    else:
        pool_l0 = str(cfg.pyramid.get("pool_l0", "whole"))
        if pool_l0 not in ("whole", "pooled"):
            raise ConfigError(f"pyramid.pool_l0 must be whole or pooled, got {pool_l0!r}")
        try:
            model = load(_sized(cfg.model, cfg.pyramid.pool_image_size))
        except ModelConfigError as err:
            if "patch size" not in str(err):
                raise
            raise ConfigError(f"pyramid.pool_image_size={cfg.pyramid.pool_image_size}: {str(err).split(': ', 1)[1]}") from None
        query_size = int(cfg.pyramid.pool_query_size)
        query_model = load(cfg.model) if query_size == 0 else \
            model if query_size == model.input_size else load(_sized(cfg.model, query_size))
        if pool_l0 == "whole":
            l0_model = query_model if query_size == 0 else load(cfg.model)
    if str(cfg.extract.get("crops", "pil")) != "pil":  # how crops are made keys every cache of these models
        model, query_model = with_crops(model, cfg.extract.crops), with_crops(query_model, cfg.extract.crops)
        l0_model = with_crops(l0_model, cfg.extract.crops) if l0_model is not None else None
    logger.info(f"model {cfg.model.name}: {cfg.model.timm_name} ({model.fingerprint['weights']}), "
                f"input {model.input_size}px (queries {query_model.input_size}px), layer {cfg.model.layer}, "
                f"pool {cfg.model.pool}, dim {model.dim}, {model.device}, precision {model.precision}"
                f"{' (extract.precision=auto)' if cfg.extract.precision == 'auto' else ''}")
    check_against_model(cfg, model)
    warn_old_stores(Path(cfg.paths.features))
    memo = DigestMemo(Path(cfg.paths.features) / "digests", collection=str(Path(cfg.dataset.root).resolve()))
    return FeatureSource(model, query_model, cfg.model.name, cfg, [], writer=int(cfg.extract.shard), l0_model=l0_model,
                         keys=ImageKeys(memo))


def check_against_model(cfg: DictConfig, model: LoadedModel) -> None:
    """Settings that only the loaded model can check (src/patchify/settings.py checks the rest), before any work:
    pool mode's split block and backbone kind, and the index's code size against the descriptor width."""
    if cfg.pyramid.mode == "pool":
        split, method, cell_pos = pool_settings(cfg.pyramid)
        model.encoder.check_pool_settings(split, method, cell_pos)
    spec = index_spec(cfg.index)
    if spec.kind != "flat" and model.dim % spec.m:
        raise ConfigError(f"index.m={spec.m}: must divide the descriptor width {model.dim} of model={cfg.model.name}")


# ----------------------------------------------------------------------------- index

def index_spec(cfg: DictConfig) -> faiss_index.IndexSpec:
    return faiss_index.IndexSpec(kind=cfg.kind, m=int(cfg.get("m", 16)), nlist=int(cfg.get("nlist", 256)),
                                 nbits=int(cfg.get("nbits", 8)), nprobe=int(cfg.get("nprobe", 256)),
                                 metric=str(cfg.metric), refine=str(cfg.get("refine", "none")),
                                 k_factor=float(cfg.get("k_factor", 4)))


def training_levels(train_level: int, indexed_levels: list[int]) -> list[int]:
    """Levels whose patches train the quantizers: -1 the indexed ones, -2 all, k level k."""
    if train_level == -1:
        return list(indexed_levels)
    if train_level == -2:
        return list(range(MAX_LEVEL + 1))
    if 0 <= train_level <= MAX_LEVEL:
        return [train_level]
    raise ConfigError(f"index.train_level must be -1, -2 or 0..{MAX_LEVEL}, got {train_level}")


def check_index_fits(cfg: DictConfig, n_images: int, levels: list[int]) -> None:
    """Before any extraction: the quantizers can be trained on at most the gallery's patches at the training
    levels (capped by ``index.max_train_vectors``); refuse settings that need more (one line)."""
    spec = index_spec(cfg.index)
    if not spec.needs_training():
        return
    train_levels = training_levels(int(cfg.index.train_level), levels)
    most = min(n_images * patches_per_image(train_levels), int(cfg.index.max_train_vectors))
    needs = {"index.nbits": 2 ** spec.nbits, **({"index.nlist": spec.nlist} if spec.kind == "ivfpq" else {})}
    for key, count in needs.items():
        if most < count:
            raise faiss_index.IndexConfigError(
                f"{key}={cfg.index[key.split('.')[1]]}: needs at least {count:,} training vectors, but {n_images:,} "
                f"gallery images give at most {most:,} (levels {train_levels}, index.max_train_vectors="
                f"{int(cfg.index.max_train_vectors):,}); lower {key} or train on more levels")


def training_sample(vectors: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """At most ``limit`` rows, drawn without replacement with a fixed seed."""
    if len(vectors) <= limit:
        return vectors
    rows = np.sort(np.random.default_rng(seed).choice(len(vectors), size=limit, replace=False))
    return vectors[rows]


def index_layout(cfg: DictConfig) -> tuple[int, bool]:
    """``(index.shards, index.on_disk)`` of the index config; both need inverted lists (``kind=ivfpq``)."""
    shards, on_disk = int(cfg.get("shards", 1)), bool(cfg.get("on_disk", False))
    if shards < 1:
        raise faiss_index.IndexConfigError(f"index: shards={shards} must be >= 1")
    if (shards > 1 or on_disk) and str(cfg.kind).lower() != "ivfpq":
        raise faiss_index.IndexConfigError(f"index: shards={shards} and on_disk={str(on_disk).lower()} need "
                                           f"kind=ivfpq (inverted lists), got kind={cfg.kind}")
    refine = index_spec(cfg).refine
    if (shards > 1 or on_disk) and refine != "none":
        raise faiss_index.IndexConfigError(f"index: refine={refine} keeps its codes in memory by row number, so it "
                                           f"cannot be sharded or on disk (shards={shards}, on_disk="
                                           f"{str(on_disk).lower()}); use refine=none or shards=1 on_disk=false")
    return shards, on_disk


def is_sharded(cfg: DictConfig) -> bool:
    """True when the index is built in shard files (``index.shards`` > 1 or ``index.on_disk``)."""
    shards, on_disk = index_layout(cfg)
    return shards > 1 or on_disk


def patch_ids(patches: PatchFeatures, levels: list[int]) -> np.ndarray:
    """Id of every patch in a sharded index: ``image * P + slot``.

    ``image`` indexes the whole gallery, ``P`` is the number of patches an image has at ``levels`` and
    ``slot`` the patch's place among them (levels in order, cells row-major). A shard so computes its ids
    from its own images alone, whatever the other shards hold; an unreadable image leaves its ids unused.
    """
    offset = np.zeros(MAX_LEVEL + 1, np.int64)
    offset[levels] = np.cumsum([0] + [(level + 1) ** 2 for level in levels[:-1]])
    run = patches.image * (MAX_LEVEL + 1) + patches.level  # an image's patches of one level are consecutive rows
    starts = np.flatnonzero(np.r_[True, run[1:] != run[:-1]])
    cell = np.arange(len(run)) - np.repeat(starts, np.diff(np.r_[starts, len(run)]))
    return patches.image * patches_per_image(levels) + offset[patches.level] + cell


def index_ids(cfg: DictConfig, patches: PatchFeatures, levels: list[int]) -> np.ndarray | None:
    """Index id of every row of ``patches``: :func:`patch_ids` when sharded, None (the row number) otherwise."""
    return patch_ids(patches, levels) if is_sharded(cfg) else None


@dataclass(frozen=True)
class IndexFiles:
    """The cached files of one trained index configuration (readable names plus content keys)."""

    trained: Path
    train_levels: list[int]
    populated: Path  # the whole gallery: one file, or the merged shards (+ .ivfdata when on disk)
    shard_stem: str
    shards: int
    on_disk: bool

    @property
    def sharded(self) -> bool:
        return self.shards > 1 or self.on_disk

    def shard(self, i: int) -> Path:
        return self.populated.with_name(f"{self.shard_stem}.shard{i:03d}-of-{self.shards:03d}.faiss")


def index_files(cfg: DictConfig, model_fingerprint: dict, gallery: list[ImageRecord], levels: list[int],
                dim: int, keys: ImageKeys = DEFAULT_KEYS) -> IndexFiles:
    """Where the trained index, the shard files and the populated index of these settings are cached
    (keyed by the gallery's ids in order and what each image is, ``keys``)."""
    spec = index_spec(cfg.index)
    shards, on_disk = index_layout(cfg.index)
    train_levels = training_levels(int(cfg.index.train_level), levels)
    gallery_key = list_key([f"{r.id}:{key}" for r, key in zip(gallery, keys.keys(gallery))])
    train_fields = {"model": model_fingerprint, "mode": patch_mode(cfg.pyramid), "factory": spec.factory_string(dim),
                    "metric": spec.metric, "train_levels": train_levels, "gallery": gallery_key,
                    "max_train": int(cfg.index.max_train_vectors), "seed": int(cfg.seed)}
    folder = Path(cfg.paths.indices)
    name = f"{cfg.model.name}.{spec.slug(dim)}.train{'-'.join(map(str, train_levels))}"
    stem = f"{name}.L{'-'.join(map(str, levels))}"
    populated_fields = {**train_fields, "levels": levels}
    shard_fields = {**populated_fields, "ids": "patch", "shards": shards}
    if is_sharded(cfg.index):  # other ids, other files; a one-file index keeps its key
        populated_fields = {**shard_fields, "on_disk": on_disk}
    return IndexFiles(trained=folder / f"{name}-{content_key(train_fields)}.trained.faiss", train_levels=train_levels,
                      populated=folder / f"{stem}-{content_key(populated_fields)}.populated.faiss",
                      shard_stem=f"{stem}-{content_key(shard_fields)}", shards=shards, on_disk=on_disk)


def _use_gpu(cfg: DictConfig) -> bool:
    return {"auto": faiss_index.gpu_available(), True: True, False: False}[cfg.index.use_gpu]


def trained_index(cfg: DictConfig, source: FeatureSource, gallery: list[ImageRecord], levels: list[int],
                  files: IndexFiles, patches: PatchFeatures | None = None):
    """The empty trained index of ``files``: read, or trained on the training levels' patches and written.

    ``patches`` (the indexed levels, when at hand) are the training vectors when those levels are the same.
    """
    if files.trained.exists():
        index = faiss_index.read_index(files.trained)
        logger.info(f"index: reused trained {files.trained.name}")
        return index
    spec = index_spec(cfg.index)
    if patches is not None and files.train_levels == levels:
        train = patches.vectors
    else:
        train = source.features(gallery, files.train_levels, desc="train").vectors
    train = training_sample(train, int(cfg.index.max_train_vectors), int(cfg.seed))
    faiss_index.check_training_size(spec, len(train))
    started = time.perf_counter()
    index = faiss_index.to_device(faiss_index.create_index(spec, train.shape[1]), _use_gpu(cfg))
    faiss_index.train_index(index, train, spec, seed=int(cfg.seed))
    faiss_index.write_index(index, files.trained)
    logger.info(f"index: trained {spec.factory_string(index.d)} on {len(train):,} vectors of levels "
                f"{files.train_levels} in {time.perf_counter() - started:.1f} s -> {files.trained.name}")
    return index


def populate_index_shard(files: IndexFiles, shard: int, patches: PatchFeatures, levels: list[int],
                         use_gpu: bool) -> None:
    """Fill shard file ``shard`` with ``patches`` (image indices in the whole gallery), unless already done."""
    path = files.shard(shard)
    if path.exists():
        found = faiss_index.read_index(path, mmap=True).ntotal
        if found == len(patches.vectors):
            logger.info(f"index: reused shard {path.name} ({found:,} vectors)")
            return
        logger.warning(f"{path}: stale shard ({found} vectors, expected {len(patches.vectors)}); populating it again")
    started = time.perf_counter()
    added = faiss_index.populate_shard(files.trained, patches.vectors, patch_ids(patches, levels), path,
                                       use_gpu=use_gpu)
    logger.info(f"index: populated shard {shard} of {files.shards} with {added:,} vectors in "
                f"{time.perf_counter() - started:.1f} s -> {path.name}")


def build_index(cfg: DictConfig, source: FeatureSource, gallery: list[ImageRecord],
                patches: PatchFeatures, levels: list[int]):
    """Trained (cached) and populated (cached) FAISS index over ``patches``.

    Sharded (``index.shards`` > 1 or ``index.on_disk``): every shard file (a slice of the gallery, ids from
    :func:`patch_ids`) is cached, so a killed build resumes with the shards it finished; the shards are then
    merged, on disk into a memory-mapped index when ``index.on_disk``.
    """
    spec = index_spec(cfg.index)
    dim = patches.dim
    use_gpu = _use_gpu(cfg)
    if not spec.needs_training():
        index = faiss_index.create_index(spec, dim)
        faiss_index.add_vectors(index, patches.vectors, 0)
        return faiss_index.to_device(index, use_gpu)
    files = index_files(cfg, source.model.fingerprint, gallery, levels, dim, source.keys)
    if files.populated.exists():
        index = faiss_index.read_index(files.populated)  # on-disk lists are mapped, not loaded
        if index.ntotal == len(patches.vectors) and index.d == dim:
            logger.info(f"index: reused {files.populated.name} ({index.ntotal:,} vectors)")
            return faiss_index.to_device(index, use_gpu)
        logger.warning(f"{files.populated}: stale index ({index.ntotal} vectors, expected {len(patches.vectors)}); "
                       "rebuilding")
    index = trained_index(cfg, source, gallery, levels, files, patches)
    if files.sharded:
        for shard in range(files.shards):
            lo, hi = shard_bounds(len(gallery), shard, files.shards)
            populate_index_shard(files, shard, patches.select((patches.image >= lo) & (patches.image < hi)), levels,
                                 use_gpu)
        index = faiss_index.merge_shards(files.trained, [files.shard(i) for i in range(files.shards)],
                                         files.populated, on_disk=files.on_disk)
    else:
        index = faiss_index.to_device(index, use_gpu)
        faiss_index.add_vectors(index, patches.vectors, 0)
        faiss_index.write_index(index, files.populated)
    logger.info(f"index: populated {index.ntotal:,} vectors ({faiss_index.index_nbytes(index) / max(len(gallery), 1):,.0f} "
                f"bytes per image) -> {files.populated.name}")
    return faiss_index.to_device(index, use_gpu)


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
    """The ``rerank`` stage (src/patchify/rerank.py) on search's hits: tighter boxes and/or verified re-ranking."""
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
    dataset = load_dataset(cfg.dataset, manifests=report.dir)
    levels = levels_for(int(cfg.pyramid.level), cfg.pyramid.multi_scale)
    check_index_fits(cfg, len(dataset.gallery), levels)
    source = make_feature_source(cfg)
    queries = source.queries(dataset.queries, region=_query_region(cfg))
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
    hits = search_images(index, queries.vectors, gallery.image, k, metric=str(cfg.index.metric),
                         row_of_id=None if ids is None else rows_of_ids(ids))
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


def shard_bounds(n: int, shard: int, num_shards: int) -> tuple[int, int]:
    """``[lo, hi)`` of the ``shard``-th of ``num_shards`` contiguous, near-equal slices of ``n`` items."""
    return n * shard // num_shards, n * (shard + 1) // num_shards


def shard_of(records: list[ImageRecord], shard: int, num_shards: int) -> list[ImageRecord]:
    """The ``shard``-th of ``num_shards`` contiguous, near-equal slices of ``records``."""
    if not 0 <= shard < num_shards:
        raise ConfigError(f"extract.shard must be in 0..{num_shards - 1}, got {shard}")
    lo, hi = shard_bounds(len(records), shard, num_shards)
    return records[lo:hi]


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
              "mode": patch_mode(cfg.pyramid), "index": dict(index_spec(cfg.index).__dict__)}
    return Path(cfg.paths.indices) / "search" / (
        f"{Path(cfg.dataset.root).resolve().name}.{cfg.model.name}.L{'-'.join(map(str, levels))}.{cfg.index.kind}"
        f"-{content_key(fields)}")


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
        populate_index_shard(files, shard, patches, levels, _use_gpu(cfg))
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


def _query_paths(path: str | None) -> list[Path]:
    """The query image, or the image files of a query folder (:func:`src.data.image_files`)."""
    if not path:
        raise ConfigError("task=search needs a query image: query=PATH (a file or a folder of images)")
    path = Path(path)
    if path.is_dir():
        found = image_files(path)
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
    bundle = read_bundle(folder, dim=source.model.dim)  # every part checked against its manifest
    if bundle is None:
        raise DataError(f"{folder}: no index for {cfg.dataset.root} with these settings; run task=index first")
    index, gallery = bundle.index, bundle.gallery
    row_of_id = rows_of_ids(gallery["patch_ids"]) if "patch_ids" in gallery else None
    faiss_index.set_search_params(index, index_spec(cfg.index))
    records = [ImageRecord(id=str(p), path=p) for p in _query_paths(cfg.query.path)]
    k = int(cfg.query.top_k)
    output, skipped = [], []
    for record in records:
        started = time.perf_counter()
        vectors, errors = describe_images([record], source.query_model)
        if errors:  # an unreadable query is skipped and listed, as gallery images are
            logger.warning(f"skipped query {errors[0]}")
            skipped.append(errors[0])
            continue
        hits = search_images(index, vectors, gallery["patch_image"], k, metric=str(cfg.index.metric),
                             row_of_id=row_of_id)
        seconds = time.perf_counter() - started
        valid = hits.images[0] >= 0
        top = [{"rank": rank + 1, "id": str(gallery["ids"][i]), "path": str(gallery["paths"][i]),
                "score": round(float(score), 4), "box": [round(float(v), 1) for v in gallery["boxes"][patch]]}
               for rank, (i, score, patch) in enumerate(zip(hits.images[0][valid], hits.scores[0][valid],
                                                             hits.patches[0][valid]))]
        gone = [hit for hit in top if not os.path.exists(hit["path"])]
        for hit in gone:  # indexed, then deleted or moved: still a result, said so
            hit["missing"] = True
        if gone:
            logger.warning(f"{len(gone)} result(s) of {record.path} no longer exist on disk (deleted or moved since "
                           f"task=index), first: {gone[0]['path']}; re-run task=index to update the index")
        output.append({"query": str(record.path), "seconds": round(seconds, 4), "results": top})
        print(f"\nquery {record.path} ({seconds * 1000:.0f} ms)")
        for hit in top:
            print(f"  {hit['rank']:>3}  {hit['score']:.4f}  box {hit['box']}  {hit['path']}"
                  f"{'  (missing on disk)' if hit.get('missing') else ''}")
        strip = result_strip(record, [{"record": ImageRecord(id=h["id"], path=Path(h["path"])), "score": h["score"],
                                       "box": tuple(h["box"]), "relevant": None, "gt_boxes": None} for h in top])
        picture = report.dir / f"search_{len(output):03d}_{record.path.stem}.jpg"
        strip.save(picture, quality=90)
        logger.info(f"picture: {picture}")
    results = report.write_json("search.json", {"queries": output, "skipped": skipped})
    if not output:
        raise DataError(skipped[0] if len(skipped) == 1 else
                        f"{cfg.query.path}: none of the {len(skipped)} query images is readable; first: {skipped[0]}")
    return {"queries": len(output), "skipped": len(skipped), "results": str(results)}


def check_index_sharding(cfg: DictConfig) -> None:
    """``index.shard`` is null, ``train`` or a shard number, and only for task=index of a sharded index."""
    sharded, shard = is_sharded(cfg.index), cfg.index.get("shard")
    if shard is None:
        return
    if cfg.task != "index":
        raise ConfigError(f"index.shard={shard} applies to task=index only")
    if not sharded:
        raise ConfigError(f"index.shard={shard} needs a sharded index (index.shards > 1 or index.on_disk=true)")
    shards = int(cfg.index.shards)
    if shard != "train" and not (isinstance(shard, int) and 0 <= shard < shards):
        raise ConfigError(f"index.shard must be null, train or 0..{shards - 1}, got {shard!r}")


TASKS = {"eval": run_eval, "extract": run_extract, "index": run_index, "search": run_search}


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Run ``cfg.task`` and write its run folder. Every setting is checked first (src/patchify/settings.py), ``~``
    expanded in path settings."""
    validate(cfg)  # task, extract.num_shards vs task, and every other key's domain
    expand_paths(cfg)
    check_index_sharding(cfg)
    resolve_precision(cfg.extract.precision, resolve_device(cfg.extract.device))  # e.g. fp16 on a CPU, before any work
    report = RunReport(run_dir, cfg)
    return TASKS[cfg.task](cfg, report)
