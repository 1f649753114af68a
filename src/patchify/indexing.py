"""The gallery's FAISS index for a run: which levels train it, where its files are cached, shards.

Settings -> files: :func:`index_files` names the trained and populated index of a configuration by
content keys; :func:`build_index` trains (cached) and fills (cached) it, in shard files when
``index.shards`` > 1 or ``index.on_disk``; :func:`bundle_folder` is where task=index keeps a
folder's searchable bundle (src/patchify/bundle.py). FAISS itself is wrapped in src/patchify/index.py.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from loguru import logger
from omegaconf import DictConfig

from . import index as faiss_index
from .cache import content_key, list_key
from .data import ImageRecord
from .digests import DEFAULT_KEYS, ImageKeys
from .extraction import PatchFeatures
from .features import FeatureSource, patch_mode
from .index import index_spec
from .pyramid import MAX_LEVEL, patches_per_image
from .settings import ConfigError


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
    """``(index.shards, index.on_disk)`` of the index config; both need inverted lists (``kind=ivfpq``).

    A refined sharded or on-disk index keeps its refine codes beside the lists, memory-mapped
    (``index.MappedRefine``); a one-file index uses FAISS's in-RAM ``IndexRefine``.
    """
    shards, on_disk = int(cfg.get("shards", 1)), bool(cfg.get("on_disk", False))
    if shards < 1:
        raise faiss_index.IndexConfigError(f"index: shards={shards} must be >= 1")
    if (shards > 1 or on_disk) and str(cfg.kind).lower() != "ivfpq":
        raise faiss_index.IndexConfigError(f"index: shards={shards} and on_disk={str(on_disk).lower()} need "
                                           f"kind=ivfpq (inverted lists), got kind={cfg.kind}")
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
    refined: bool = False  # refine codes beside the lists (shard and merged files)

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
                      shard_stem=f"{stem}-{content_key(shard_fields)}", shards=shards, on_disk=on_disk,
                      refined=spec.refine != "none")


def index_on_gpu(cfg: DictConfig) -> bool:
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
    index = faiss_index.to_device(faiss_index.create_index(spec, train.shape[1]), index_on_gpu(cfg))
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
        if faiss_index.shard_is_complete(path, len(patches.vectors), refined=files.refined):
            logger.info(f"index: reused shard {path.name} ({len(patches.vectors):,} vectors)")
            return
        logger.warning(f"{path}: stale shard (expected {len(patches.vectors)} vectors); populating it again")
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
    use_gpu = index_on_gpu(cfg)
    if not spec.needs_training():
        index = faiss_index.create_index(spec, dim)
        faiss_index.add_vectors(index, patches.vectors, 0)
        return faiss_index.to_device(index, use_gpu)
    files = index_files(cfg, source.model.fingerprint, gallery, levels, dim, source.keys)
    if files.populated.exists():
        index = faiss_index.read_index(files.populated)  # on-disk lists and refine codes are mapped, not loaded
        if index.ntotal == len(patches.vectors) and index.d == dim and \
                faiss_index.is_refined(index) == (spec.refine != "none"):  # a merge killed before its refine codes
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


def shard_bounds(n: int, shard: int, num_shards: int) -> tuple[int, int]:
    """``[lo, hi)`` of the ``shard``-th of ``num_shards`` contiguous, near-equal slices of ``n`` items."""
    return n * shard // num_shards, n * (shard + 1) // num_shards


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


def bundle_folder(cfg: DictConfig, model_fingerprint: dict, levels: list[int]) -> Path:
    """Where task=index keeps the searchable index of ``dataset.root`` for these settings."""
    fields = {"root": str(Path(cfg.dataset.root).resolve()), "model": model_fingerprint, "levels": levels,
              "mode": patch_mode(cfg.pyramid), "index": dict(index_spec(cfg.index).__dict__)}
    return Path(cfg.paths.indices) / "search" / (
        f"{Path(cfg.dataset.root).resolve().name}.{cfg.model.name}.L{'-'.join(map(str, levels))}.{cfg.index.kind}"
        f"-{content_key(fields)}")

