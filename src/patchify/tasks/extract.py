"""task=extract: only fill the feature caches, in shards when asked (``extract.num_shards``)."""

from __future__ import annotations

from omegaconf import DictConfig

from ..data import ImageRecord, load_dataset
from ..features import make_feature_source
from ..indexing import shard_bounds
from ..pyramid import levels_for
from ..report import RunReport
from ..settings import ConfigError
from .evaluate import query_region

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
        source.queries(queries, region=query_region(cfg))
    source.features(gallery, levels, desc=f"gallery shard {shard}/{shards}" if shards > 1 else "gallery")
    summary = source.totals()
    report.write_json("extract.json", summary)
    return summary

