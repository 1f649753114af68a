"""Command line: the ``patchify`` console script (``python main.py`` is the same).

    patchify                                   # mini-ILIAS, packaged DINOv2-S, L3, exact
    patchify pyramid.level=0 index=ivfpq       # Hydra overrides
    patchify --model_name dinov2 --pq ivfpq    # the paper's reference flags
    patchify evaluate RESULTS --dataset DIR    # mAP and LocScore of any method's results (docs/API.md)

The reference flags are translated to Hydra overrides
(``--model_name dinov2 --tile_size_res 3 --pq ivfpq`` runs as
``model=dinov2 pyramid.level=3 index=ivfpq``); both styles mix. Overrides
Hydra cannot parse are answered in one line before Hydra starts.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from loguru import logger
from omegaconf import DictConfig

from . import settings  # noqa: F401 (registers the ${expanduser:...} resolver of hydra.run.dir)

FLAG_TO_OVERRIDE = {
    "model_name": "model",
    "tile_size_res": "pyramid.level",
    "multi-scale": "pyramid.multi_scale",
    "multi_scale": "pyramid.multi_scale",
    "image_size": "model.image_size",
    "split": "dataset.split",
    "iou_threshold": "eval.iou_threshold",
    "batch_size": "extract.batch_size",
    "pq_m": "index.m",
    "pq_nlist": "index.nlist",
    "pq_nprobe": "index.nprobe",
    "pq_nbits": "index.nbits",
    "pq_dist_type": "index.metric",
    "pq_train_res": "index.train_level",
}
BOOLEAN_FLAGS = {"crop", "visualize"}
TRUE, FALSE = {"true", "1", "yes"}, {"false", "0", "no", "none"}


class FlagError(ValueError):
    """An unknown or malformed reference flag."""


def hydra_quoted(text: str) -> str:
    """``text`` as a quoted Hydra string: a backslash escapes a quote, and backslashes that precede a
    quote or end the string are doubled (Hydra 1.3's rule); everything else is taken as typed."""
    text = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text)
    text = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, text)
    return f"'{text}'"


def _parses(override: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        OverridesParser.create().parse_override(override)
    except Exception:  # Hydra's grammar errors (HydraException, OverrideParseException)
        return False
    return True


def hydra_value(key: str, value: str) -> str:
    """``key=value`` for a reference flag: as typed when Hydra reads it (``3`` stays a number, ``0,1`` a
    sweep), else quoted, so that a value such as ``3)`` reaches the settings check as text."""
    return f"{key}={value}" if _parses(f"{key}={value}") else f"{key}={hydra_quoted(value)}"


TILDE_VALUE = re.compile(r"(\+{0,2}[A-Za-z_][\w.\-/@]*)=(.*~.*)", re.DOTALL)


def tilde_override(arg: str) -> str:
    """``key=~/path`` (or any value with a ``~``, which Hydra's parser refuses unquoted) with the value
    quoted; the settings expand a leading ``~`` in path settings (src/patchify/settings.py expand_paths)."""
    match = TILDE_VALUE.fullmatch(arg)
    if not match or _parses(arg):
        return arg
    return f"{match.group(1)}={hydra_quoted(match.group(2))}"


def _bool(flag: str, value: str) -> bool:
    if value.lower() in TRUE:
        return True
    if value.lower() in FALSE:
        return False
    raise FlagError(f"--{flag} expects True or False, got {value!r}")


def _translate(flag: str, value: str) -> str:
    if flag == "crop":
        return f"pyramid.mode={'crop' if _bool(flag, value) else 'pool'}"
    if flag == "visualize":
        return f"eval.visualize={str(_bool(flag, value)).lower()}"
    if flag == "pq":
        kind = "flat" if value.lower() in FALSE else value.lower()
        if kind not in ("flat", "pq", "ivfpq"):
            raise FlagError(f"--pq expects False, pq or ivfpq, got {value!r}")
        return f"index={kind}"
    if flag == "compute_metrics":
        names = [name.strip().lower().replace("-", "").replace("_", "") for name in value.split(",") if name.strip()]
        names = [name if re.fullmatch(r"\w+", name) else hydra_quoted(name) for name in names]
        return f"eval.metrics=[{','.join(names)}]"
    if flag in FLAG_TO_OVERRIDE:
        return hydra_value(FLAG_TO_OVERRIDE[flag], value)
    raise FlagError(f"unknown reference flag --{flag} (known: {', '.join(sorted([*FLAG_TO_OVERRIDE, *BOOLEAN_FLAGS, 'pq', 'compute_metrics']))})")


def translate_argv(argv: list[str]) -> list[str]:
    """Replace ``--flag value`` / ``--flag=value`` pairs by overrides; keep everything else.

    Hydra's own options (``--multirun``, ``--cfg``, ``-m`` ...) pass through.
    ``query=PATH`` (a bare path for task=search) becomes ``query.path=PATH``; a value with a ``~``
    (``key=~/...``) is quoted for Hydra, whose parser refuses a bare ``~`` (the settings expand it).
    """
    hydra_flags = {"--multirun", "--cfg", "--help", "--hydra-help", "--resolve", "--package", "--info",
                   "--config-path", "--config-name", "--config-dir", "--run", "--shell-completion",
                   "--experimental-rerun", "--version"}
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name = arg.split("=", 1)[0]
        if arg.startswith("--") and name not in hydra_flags:
            flag = name[2:]
            if "=" in arg:
                value = arg.split("=", 1)[1]
            elif flag in BOOLEAN_FLAGS and (i + 1 == len(argv) or argv[i + 1].startswith("-") or "=" in argv[i + 1]):
                value = "True"  # bare switch: --visualize
            elif i + 1 < len(argv):
                i += 1
                value = argv[i]
            else:
                raise FlagError(f"--{flag} needs a value")
            out.append(_translate(flag, value))
        elif arg.startswith("query=") and not arg.startswith("query.") :
            out.append(tilde_override("query.path=" + arg[len("query="):]))
        else:
            out.append(tilde_override(arg))
        i += 1
    return out


def check_overrides(argv: list[str]) -> None:
    """Parse every override as Hydra will, before Hydra starts: a value its grammar refuses (e.g. a path
    with ``(`` or ``,`` left unquoted) is one FlagError line naming the override and how to quote it;
    the run folder's parent (``paths.logs``) must be writable."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    logs = "logs"
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            (override,) = parser.parse_overrides([arg])
        except OverrideParseException as err:
            key, value = arg.split("=", 1)
            reason = str(err).splitlines()[0].strip()
            raise FlagError(f"{key}={value}: Hydra cannot parse this value ({reason}); quote it inside the argument, "
                            f"e.g. '{key}=\"{value}\"'") from None
        if override.key_or_group == "paths.logs" and isinstance(override.value(), str):
            logs = override.value()
    if "${" not in logs:
        from .cache import CacheError, check_writable

        try:
            check_writable(Path(os.path.expanduser(logs)), setting="paths.logs")
        except CacheError as err:
            raise FlagError(str(err).replace("cache folder", "run folder")) from None


@hydra.main(version_base="1.3", config_path="configs", config_name="config")
def _hydra_main(cfg: DictConfig) -> None:
    """One run: the task that ``cfg.task`` names, a one-line error for a user's mistake."""
    from .console import is_user_error, print_summary, setup_logging
    from .pipeline import run

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    setup_logging(run_dir / "run.log")
    logger.info(f"run folder: {run_dir}")
    try:
        summary = run(cfg, run_dir)
    except KeyboardInterrupt:
        logger.error("interrupted; finished cache chunks are kept and the next run resumes from them")
        raise SystemExit(130)
    except Exception as err:  # expected user errors become one line; bugs keep their traceback
        if not is_user_error(err):
            raise
        logger.error(str(err))
        raise SystemExit(2)
    print_summary(cfg, summary, run_dir)


def main() -> None:
    """Entry point of the ``patchify`` console script and of ``python main.py``.

    ``patchify evaluate RESULTS ...`` scores any method's results (src/patchify/api/evaluation.py, an
    argparse command of its own: ``patchify evaluate --help``); everything else is a Hydra run."""
    if len(sys.argv) > 1 and sys.argv[1] == "evaluate":
        from .api.evaluation import main as evaluate_main

        raise SystemExit(evaluate_main(sys.argv[2:], console_logging=True))
    try:
        sys.argv = [sys.argv[0], *translate_argv(sys.argv[1:])]
        check_overrides(sys.argv[1:])
    except FlagError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2)
    _hydra_main()
