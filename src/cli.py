"""Command line: the paper's reference flags translated to Hydra overrides.

``python main.py --model_name dinov2 --tile_size_res 3 --pq ivfpq`` runs as
``python main.py model=dinov2 pyramid.level=3 index=ivfpq``. Both styles mix.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

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
    quoted; the settings expand a leading ``~`` in path settings (src/settings.py expand_paths)."""
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
