"""Patchify: patch-wise instance-level image retrieval (Hydra entry point).

    python main.py                                   # mini-ILIAS, packaged DINOv2-S, L3, exact
    python main.py pyramid.level=0 index=ivfpq       # Hydra overrides
    python main.py --model_name dinov2 --pq ivfpq    # the paper's reference flags
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from loguru import logger
from omegaconf import DictConfig

from src.cli import FlagError, check_overrides, translate_argv
import src.settings  # noqa: F401 (registers the ${expanduser:...} resolver of hydra.run.dir)


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def main(cfg: DictConfig) -> None:
    from src.console import print_summary, setup_logging
    from src.pipeline import run

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    setup_logging(run_dir / "run.log")
    logger.info(f"run folder: {run_dir}")
    try:
        summary = run(cfg, run_dir)
    except KeyboardInterrupt:
        logger.error("interrupted; finished cache chunks are kept and the next run resumes from them")
        raise SystemExit(130)
    except Exception as err:  # expected user errors become one line; bugs keep their traceback
        from src.console import is_user_error

        if not is_user_error(err):
            raise
        logger.error(str(err))
        raise SystemExit(2)
    print_summary(cfg, summary, run_dir)


if __name__ == "__main__":
    try:
        sys.argv = [sys.argv[0], *translate_argv(sys.argv[1:])]
        check_overrides(sys.argv[1:])
    except FlagError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
    main()
