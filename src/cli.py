"""Command line: the paper's reference flags translated to Hydra overrides.

``python main.py --model_name dinov2 --tile_size_res 3 --pq ivfpq`` runs as
``python main.py model=dinov2 pyramid.level=3 index=ivfpq``. Both styles mix.
"""

from __future__ import annotations

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
        return f"eval.metrics=[{','.join(names)}]"
    if flag in FLAG_TO_OVERRIDE:
        return f"{FLAG_TO_OVERRIDE[flag]}={value}"
    raise FlagError(f"unknown reference flag --{flag} (known: {', '.join(sorted([*FLAG_TO_OVERRIDE, *BOOLEAN_FLAGS, 'pq', 'compute_metrics']))})")


def translate_argv(argv: list[str]) -> list[str]:
    """Replace ``--flag value`` / ``--flag=value`` pairs by overrides; keep everything else.

    Hydra's own options (``--multirun``, ``--cfg``, ``-m`` ...) pass through.
    ``query=PATH`` (a bare path for task=search) becomes ``query.path=PATH``.
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
            out.append("query.path=" + arg[len("query="):])
        else:
            out.append(arg)
        i += 1
    return out
