"""Console: logging set-up, the one-line error policy, and the final summary table."""

from __future__ import annotations

import sys
from pathlib import Path

from loguru import logger
from omegaconf import DictConfig


def setup_logging(log_file: Path | None) -> None:
    """loguru to stderr (short format) and to the run folder's log file (full format)."""
    logger.remove()
    logger.add(sys.stderr, level="INFO", format="<green>{time:HH:mm:ss}</green> <level>{level: <7}</level> {message}")
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        logger.add(log_file, level="DEBUG", format="{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {name}:{line} | {message}")


def is_user_error(err: BaseException) -> bool:
    """Errors that describe bad input or settings (shown as one line, no traceback)."""
    from .assets import AssetError
    from .cache import CacheError
    from .data import DataError
    from .extraction import ExtractionError
    from .index import IndexConfigError
    from .datasets.mini_ilias import MiniIliasError
    from .model import ModelConfigError
    from .settings import ConfigError

    return isinstance(err, (AssetError, CacheError, DataError, IndexConfigError, MiniIliasError, ModelConfigError,
                            ConfigError, ExtractionError, FileNotFoundError))


def metrics_table(rows: list[tuple[str, dict]]) -> str:
    """Small fixed-width table of the headline metrics, one row per named run."""
    columns = ["mAP", "LocScore@0.4", "LocScore", "R@1"]
    header = f"{'run':<40}" + "".join(f"{c:>14}" for c in columns)
    lines = [header, "-" * len(header)]
    for name, metrics in rows:
        cells = "".join(f"{metrics[c]:>14.2f}" if isinstance(metrics.get(c), (int, float)) else f"{'-':>14}" for c in columns)
        lines.append(f"{name:<40}{cells}")
    return "\n".join(lines)


def protocol_table(metrics: dict) -> str:
    """A benchmark protocol's metrics (revisited: one row per setup Easy / Medium / Hard; INSTRE: one row)."""
    protocol = metrics["protocol"]
    setups = metrics[protocol] if protocol == "revisited" else {protocol: metrics[protocol]}
    columns = ["mAP", "mP@1", "mP@5", "mP@10"]
    lines = [f"{protocol + ' protocol':<40}" + "".join(f"{c:>14}" for c in columns)]
    for name, values in setups.items():
        lines.append(f"{name:<40}" + "".join(f"{values[c]:>14.2f}" if isinstance(values.get(c), (int, float))
                                             else f"{'-':>14}" for c in columns))
    return "\n".join(lines)


def print_summary(cfg: DictConfig, summary: dict, run_dir: Path) -> None:
    if cfg.task == "eval":
        print(metrics_table([(cfg.run_name, summary)]))
        why = (summary.get("not_available") or {}).get("LocScore")
        thresholds = summary.get("iou_thresholds")
        locscore = f"no LocScore: {why}" if why else f"LocScore = mean over IoU thresholds {thresholds}"
        print(f"{locscore}; run folder: {run_dir}")
        if summary.get("protocol"):
            print(protocol_table(summary))
    else:
        logger.info(f"{cfg.task} done: {summary}")
