"""Pipeline: check every setting, then run the task that ``cfg.task`` names (src/patchify/tasks/).

    data -> model -> pyramid/extraction (cached) -> index (cached) -> search -> rerank -> metrics -> run report

Stages: data.py, model.py, pyramid.py + extraction.py (features.py gathers them for a run), index.py
(FAISS) + indexing.py (a run's index files and shards), search.py, rerank.py, metrics.py, report.py.
The console script (cli.py) only parses the command line and calls :func:`run`.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from .indexing import check_index_sharding
from .model import resolve_device, resolve_precision
from .report import RunReport
from .settings import ConfigError, expand_paths, validate  # noqa: F401 (ConfigError: pipeline.ConfigError stays importable)
from .tasks import TASKS


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Run ``cfg.task`` and write its run folder. Every setting is checked first (src/patchify/settings.py), ``~``
    expanded in path settings."""
    validate(cfg)  # task, extract.num_shards vs task, and every other key's domain
    expand_paths(cfg)
    check_index_sharding(cfg)
    resolve_precision(cfg.extract.precision, resolve_device(cfg.extract.device))  # e.g. fp16 on a CPU, before any work
    report = RunReport(run_dir, cfg)
    return TASKS[cfg.task](cfg, report)

