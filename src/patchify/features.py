"""Features of a run: the configured model(s) and their caches, gathered per level (crop or pool mode).

:class:`FeatureSource` extracts what the caches lack (src/patchify/extraction.py) and gathers
patch vectors, boxes and levels of any records; :func:`make_feature_source` loads the model(s)
of ``cfg.model`` / ``cfg.pyramid`` and checks what only the loaded model can check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from loguru import logger
from omegaconf import DictConfig, OmegaConf

from .cache import CacheError
from .crops import with_crops
from .data import ImageRecord
from .digests import DigestMemo, ImageKeys
from .extraction import CorruptChunk, ExtractStats, FeatureStore, PatchFeatures, extract_missing, extract_pooled, warn_old_stores
from .index import index_spec
from .model import LoadedModel, ModelConfigError, load_model
from .pool_cells import check_pool_settings
from .settings import ConfigError


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


def at_input_size(model_cfg: DictConfig, image_size: int) -> DictConfig:
    return OmegaConf.merge(model_cfg, {"image_size": int(image_size)})


def make_feature_source(cfg: DictConfig) -> FeatureSource:
    """The model of ``cfg.model`` and its caches. In pool mode the gallery model runs at
    ``pyramid.pool_image_size`` and queries at ``pyramid.pool_query_size`` (0: the model's own
    input size, as in crop mode, whose query descriptors it then shares).

    With ``extract.import_features=PATH`` no model is loaded: that file's vectors stand in
    (src/patchify/feature_files.py ImportedSource, the same methods task=eval calls)."""
    if cfg.extract.get("import_features"):
        from .feature_files import imported_source

        return imported_source(cfg)  # type: ignore[return-value]
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
            model = load(at_input_size(cfg.model, cfg.pyramid.pool_image_size))
        except ModelConfigError as err:
            if "patch size" not in str(err):
                raise
            raise ConfigError(f"pyramid.pool_image_size={cfg.pyramid.pool_image_size}: {str(err).split(': ', 1)[1]}") from None
        query_size = int(cfg.pyramid.pool_query_size)
        query_model = load(cfg.model) if query_size == 0 else \
            model if query_size == model.input_size else load(at_input_size(cfg.model, query_size))
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
        check_pool_settings(model.encoder, split, method, cell_pos)
    spec = index_spec(cfg.index)
    if spec.kind != "flat" and model.dim % spec.m:
        raise ConfigError(f"index.m={spec.m}: must divide the descriptor width {model.dim} of model={cfg.model.name}")

