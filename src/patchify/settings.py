"""Settings: what every key of the composed config allows, checked before any work.

One frozen dataclass per config group (``configs/<group>/*.yaml``) declares each key: its type in the
annotation (``int``, ``float``, ``bool``, ``str``, ``Path``, ``list[...]``, a nested group, ``Optional``
for null) and its domain in :func:`key` (choices, numeric range, a check for the odd domain).
:func:`validate` walks a composed config against :class:`Settings` and raises :class:`ConfigError` on the
first problem, one line naming key, value and what is allowed::

    pyramid.level=7: must be an integer in 0..3
    eval.metrics=[map, bogus]: unknown metric 'bogus' (choose from map, locscore, topk)

Why not Hydra's structured configs (the same dataclasses registered in the ConfigStore): every yaml would
have to name its schema in its defaults list; OmegaConf checks types only, so ranges and choices (level
0..3, metric names, ``cuda:N``) would still need checks of their own; and a type error would print
Hydra's multi-line error and exit 1 before ``main.py`` could answer in one line with exit code 2. So the
schema is plain dataclasses, read by our own ``validate``; ``tests/test_settings.py`` composes every
config group and experiment through it, so schema and yamls cannot drift apart.

Keys a yaml does not define are left to Hydra (it refuses them unless added with ``+``). Paths (fields
annotated ``Path``) get ``~`` expanded by :func:`expand_paths`; ``configs/config.yaml`` expands
``paths.logs`` for the run folder with the ``${expanduser:...}`` resolver registered here.

This module imports no model code (``main.py`` imports it to register the resolver): choices owned by
other modules are repeated here and the tests check they still agree.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional, Union, get_args, get_origin, get_type_hints

from omegaconf import DictConfig, ListConfig, OmegaConf, read_write
from omegaconf.errors import OmegaConfBaseException

from .metrics import METRICS
from .pyramid import MAX_LEVEL, MULTI_SCALE_MODES

TASKS = ("eval", "extract", "index", "search")         # src/patchify/tasks/__init__.py TASKS
POOLS = ("cls", "mean", "gem", "head", "projection")   # src/patchify/model.py POOLS
RESIZES = ("squash", "long_side")                      # src/patchify/model.py RESIZES
POOL_METHODS = ("split", "masked")                     # src/patchify/pool_cells.py POOL_METHODS
CELL_POSITIONS = ("local", "global")                   # src/patchify/pool_cells.py CELL_POSITIONS
PACKAGED = ("dinov2_s_packaged", "efficientnet_lite0")  # src/patchify/weights.py PACKAGED
INDEX_KINDS = ("flat", "pq", "ivfpq")                  # src/patchify/index.py KINDS
INDEX_METRICS = ("IP", "L2")                           # src/patchify/index.py METRICS
REFINES = ("none", "SQ8", "SQfp16", "Flat")            # src/patchify/index.py REFINES
RERANK_STAGES = ("none", "refine", "verify", "both")   # src/patchify/rerank.py STAGES
VERIFY_MATCHERS = ("mnn", "lighterglue", "lightglue")  # src/patchify/rerank.py MATCHERS
PATCH_MODES = ("crop", "pool")
CROP_METHODS = ("pil", "tensor")                        # src/patchify/crops.py CROP_METHODS
MISSING_FEATURES = ("error", "skip")                    # src/patchify/feature_files.py MISSING_CHOICES
FEATURE_FILE_SUFFIXES = (".npz", ".h5", ".hdf5")        # src/patchify/feature_files.py SUFFIXES


class ConfigError(ValueError):
    """A setting that cannot work; one line."""


# ----------------------------------------------------------------------------- declaring keys

@dataclass(frozen=True)
class Rule:
    """The domain of one key beyond its type.

    ``lo``/``hi`` bound numbers (``lo_open``: ``lo`` itself excluded); ``choices`` lists the allowed
    values (of a list's items, for lists); ``check`` says whether a value fits, for domains those
    cannot say (it also sees null), and ``allowed`` then describes the domain; ``absent_ok``: the key may be missing
    from a group (e.g. dataset.core_dir for a folder); ``item`` names a list's items in messages.
    """

    choices: tuple = ()
    ignore_case: bool = False
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    check: Callable[[Any], bool] | None = None
    allowed: str = ""
    absent_ok: bool = False
    nonempty: bool = False
    item: str = "value"


def key(**rule) -> Any:
    """A schema field with its :class:`Rule` (the dataclasses are never instantiated)."""
    return field(default=None, metadata={"rule": Rule(**rule)})


def _iou_threshold(value: Any) -> bool:
    """``default``, ``average``, a number in (0, 1] (or its text), or a list of those (src/patchify/metrics.py)."""
    values = list(value) if isinstance(value, (list, ListConfig)) and len(value) else [value]
    for v in values:
        if isinstance(v, str) and v.strip().lower() in ("default", "average"):
            continue
        try:
            number = float(v) if isinstance(v, (int, float, str)) and not isinstance(v, bool) else math.nan
        except ValueError:
            number = math.nan
        if not 0.0 < number <= 1.0:
            return False
    return True


def _device(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", value) is not None


FEATURE_FILE_ALLOWED = "a path ending in .npz, .h5 or .hdf5"


def _feature_file(value: Any) -> bool:
    """null or a feature file name (src/patchify/feature_files.py SUFFIXES)."""
    return value is None or (isinstance(value, str) and Path(value).suffix.lower() in FEATURE_FILE_SUFFIXES)


def _index_shard(value: Any) -> bool:
    return value is None or value == "train" or (type(value) is int and value >= 0)


# ----------------------------------------------------------------------------- the schema, group by group

@dataclass(frozen=True)
class PathsSettings:
    """configs/config.yaml ``paths``."""

    home: Path = key()
    features: Path = key()
    indices: Path = key()
    logs: Path = key()


@dataclass(frozen=True)
class GenerateSettings:
    """configs/dataset/mini_ilias.yaml ``generate``: src/patchify/datasets/mini_ilias.py MiniIliasConfig."""

    CLOSED: ClassVar[bool] = True  # passed as keyword arguments: an unknown key cannot be ignored
    instances: int = key(lo=1)
    queries_per_instance: int = key(lo=1)
    positives_per_instance: int = key(lo=1)
    distractors: int = key(lo=0)
    seed: int = key(lo=0)
    hard_negative_fraction: float = key(lo=0, hi=1, absent_ok=True)
    min_area: float = key(lo=0, hi=1, lo_open=True, absent_ok=True)
    max_area: float = key(lo=0, hi=1, lo_open=True, absent_ok=True)
    objects: str = key(choices=("emoji", "photo", "both"), absent_ok=True)  # mini_ilias.py OBJECT_FAMILIES


@dataclass(frozen=True)
class DatasetSettings:
    """configs/dataset/*.yaml (src/patchify/data.py load_dataset)."""

    kind: str = key(choices=("ilias", "folder", "revisited", "instre"))
    name: str = key()
    root: Path = key()
    split: str = key(absent_ok=True)
    pin_manifest: bool = key(absent_ok=True)
    core_dir: str = key(absent_ok=True)
    distractors: Optional[Path] = key(absent_ok=True)
    generate: Optional[GenerateSettings] = key(absent_ok=True)
    # benchmarks read from their ground-truth file (src/patchify/datasets/benchmarks.py)
    gnd_file: str = key(absent_ok=True)
    image_dir: str = key(absent_ok=True)
    eval_k: int = key(lo=0, absent_ok=True)          # eval.k's default for this dataset (0: the whole gallery)
    crop_queries: bool = key(absent_ok=True)         # query.crop_to_bbox's default for this dataset


@dataclass(frozen=True)
class ModelSettings:
    """configs/model/*.yaml (src/patchify/model.py load_model; model.layer's upper end depends on the backbone)."""

    name: str = key()
    timm_name: str = key()
    tag: Optional[str] = key()
    pretrained: bool = key()
    checkpoint: Optional[Path] = key()
    packaged: Optional[str] = key(choices=PACKAGED)
    image_size: int = key(lo=0)
    resize: str = key(choices=RESIZES, absent_ok=True)  # absent: squash
    layer: int = key(lo=-1, allowed="-1 (the final features) or a block index >= 0")
    pool: str = key(choices=POOLS)
    norm_intermediate: bool = key()


@dataclass(frozen=True)
class PyramidSettings:
    """configs/pyramid/default.yaml (src/patchify/pyramid.py, src/patchify/features.py pool_settings)."""

    level: int = key(lo=0, hi=MAX_LEVEL)
    multi_scale: str = key(choices=MULTI_SCALE_MODES)
    mode: str = key(choices=PATCH_MODES)
    pool_method: str = key(choices=POOL_METHODS)
    pool_image_size: int = key(lo=0)
    pool_split_block: int = key(lo=0)
    pool_cell_pos: str = key(choices=CELL_POSITIONS)
    pool_query_size: int = key(lo=0)
    pool_l0: str = key(choices=("whole", "pooled"))


@dataclass(frozen=True)
class ExtractSettings:
    """configs/extract/default.yaml (src/patchify/extraction.py, src/patchify/model.py resolve_device)."""

    batch_size: int = key(lo=1)
    num_workers: int = key(lo=0)
    chunk_size: int = key(lo=1)
    device: str = key(check=_device, allowed="auto, cpu, cuda or cuda:N")
    precision: str = key(choices=("auto", "fp32", "fp16", "bf16"))
    crops: str = key(choices=CROP_METHODS)
    shard: int = key(lo=0)
    num_shards: int = key(lo=1)
    import_features: Optional[Path] = key(check=_feature_file, allowed=FEATURE_FILE_ALLOWED)
    missing_features: str = key(choices=MISSING_FEATURES)
    export_features: Optional[Path] = key(check=_feature_file, allowed=FEATURE_FILE_ALLOWED)


@dataclass(frozen=True)
class QuerySettings:
    """configs/query/default.yaml."""

    crop_to_bbox: bool = key()
    path: Optional[Path] = key()
    top_k: int = key(lo=1)


@dataclass(frozen=True)
class IndexSettings:
    """configs/index/*.yaml (src/patchify/index.py IndexSpec, src/patchify/indexing.py index_layout / training_levels)."""

    kind: str = key(choices=INDEX_KINDS, ignore_case=True)
    m: int = key(lo=1)
    nlist: int = key(lo=1)
    nbits: int = key(lo=1, hi=16)
    nprobe: int = key(lo=1)
    metric: str = key(choices=INDEX_METRICS, ignore_case=True)
    train_level: int = key(lo=-2, hi=MAX_LEVEL, allowed=f"-1 (the indexed levels), -2 (all levels) or 0..{MAX_LEVEL}")
    use_gpu: Any = key(choices=("auto", True, False))
    max_train_vectors: int = key(lo=0)
    shards: int = key(lo=1)
    on_disk: bool = key()
    shard: Any = key(check=_index_shard, allowed="null, train or a shard number >= 0")
    refine: Optional[str] = key(choices=REFINES, ignore_case=True)
    k_factor: float = key(lo=1)


@dataclass(frozen=True)
class EvalSettings:
    """configs/eval/default.yaml (src/patchify/metrics.py evaluate / resolve_iou_thresholds, src/patchify/report.py)."""

    k: int = key(lo=0, allowed="an integer >= 1, or 0 for the whole gallery")
    metrics: list[str] = key(choices=METRICS, ignore_case=True, nonempty=True, item="metric")
    iou_threshold: Any = key(check=_iou_threshold, allowed="default, average or a number in (0, 1]")
    visualize: bool = key()
    visualize_top: int = key(lo=1)
    visualize_max_queries: int = key(lo=0)


@dataclass(frozen=True)
class RoundSettings:
    """One window-search round of rerank.refine.rounds (src/patchify/rerank.py windows_around)."""

    CLOSED: ClassVar[bool] = True
    scales: list[float] = key(lo=0, lo_open=True, nonempty=True, item="scale")
    offsets: list[float] = key(nonempty=True, item="offset")


@dataclass(frozen=True)
class RefineSettings:
    """configs/rerank/none.yaml ``refine`` (src/patchify/rerank.py _refine)."""

    search_top: int = key(lo=0)
    image_size: int = key(lo=0)
    map_fraction: float = key(lo=0, hi=1)
    rounds: list[RoundSettings] = key()


@dataclass(frozen=True)
class VerifySettings:
    """configs/rerank/none.yaml ``verify`` (src/patchify/rerank.py _verify / verify_pair)."""

    matcher: str = key(choices=VERIFY_MATCHERS)
    top_k: int = key(lo=1)
    max_side: int = key(lo=1)
    min_cosine: float = key(lo=-1, hi=1)
    min_confidence: float = key(lo=0, hi=1)
    ransac_px: float = key(lo=0, lo_open=True)
    ransac_max_iterations: int = key(lo=1)
    min_inliers: int = key(lo=0)
    saturate: float = key(lo=0, lo_open=True)
    weight: float = key(lo=0)


@dataclass(frozen=True)
class QeSettings:
    """configs/rerank/none.yaml ``qe`` (src/patchify/expansion.py)."""

    top: int = key(lo=0)
    alpha: float = key(lo=0)
    verified_only: bool = key()


@dataclass(frozen=True)
class RerankSettings:
    """configs/rerank/*.yaml (src/patchify/rerank.py rerank)."""

    stage: str = key(choices=RERANK_STAGES)
    top_n: int = key(lo=1)
    refine: RefineSettings = key()
    verify: VerifySettings = key()
    qe: QeSettings = key()


@dataclass(frozen=True)
class Settings:
    """configs/config.yaml composed with one file of each group."""

    task: str = key(choices=TASKS)
    seed: int = key(lo=0, hi=2**31 - 1)
    run_name: str = key()
    paths: PathsSettings = key()
    dataset: DatasetSettings = key()
    model: ModelSettings = key()
    pyramid: PyramidSettings = key()
    extract: ExtractSettings = key()
    query: QuerySettings = key()
    index: IndexSettings = key()
    eval: EvalSettings = key()
    rerank: RerankSettings = key()


# ----------------------------------------------------------------------------- settings that must agree

def _shard_in_range(cfg: DictConfig) -> str | None:
    shard, shards = cfg.extract.shard, cfg.extract.num_shards
    return None if shard < shards else f"extract.shard={shard}: must be in 0..{shards - 1} (extract.num_shards={shards})"


def _shards_need_extract(cfg: DictConfig) -> str | None:
    shards = cfg.extract.num_shards
    return None if shards == 1 or cfg.task == "extract" else \
        f"extract.num_shards={shards}: applies to task=extract only (task={cfg.task})"


def _search_needs_query(cfg: DictConfig) -> str | None:
    return None if cfg.task != "search" or cfg.query.path else \
        "query.path=null: task=search needs a query image: query=PATH (a file or a folder of images)"


def _eval_needs_labels(cfg: DictConfig) -> str | None:
    return None if cfg.task != "eval" or cfg.dataset.kind != "folder" else \
        "task=eval: needs labelled queries (an ILIAS-layout dataset), got dataset.kind=folder; index a folder " \
        "with task=index and search it with task=search"


def _revisited_crops_queries(cfg: DictConfig) -> str | None:
    return None if cfg.task != "eval" or cfg.dataset.kind != "revisited" or cfg.query.crop_to_bbox else \
        f"query.crop_to_bbox=false: dataset={cfg.dataset.name} follows the revisited protocol, which crops every " \
        "query to its box (gnd bbx); leave query.crop_to_bbox=true"


def _mat_needs_scipy(cfg: DictConfig) -> str | None:
    gnd_file = str(cfg.dataset.get("gnd_file") or "")
    return None if cfg.task != "eval" or not gnd_file.endswith(".mat") or importlib.util.find_spec("scipy") else \
        f'dataset.gnd_file={gnd_file}: reading a .mat ground-truth file needs scipy, which is not installed: ' \
        'pip install "patchify[benchmarks]"'


def _refine_needs_quantizer(cfg: DictConfig) -> str | None:
    refine = str(cfg.index.refine or "none")
    return None if refine.lower() == "none" or str(cfg.index.kind).lower() != "flat" else \
        f"index.refine={refine}: needs a quantised index (index=pq or index=ivfpq); flat is exact already"


def _head_needs_final_layer(cfg: DictConfig) -> str | None:
    pool, layer = cfg.model.pool, cfg.model.layer
    return None if pool not in ("head", "projection") or layer == -1 else \
        f"model.layer={layer}: model.pool={pool} uses the model's own head and needs model.layer=-1"


def _pool_mode_needs_tokens(cfg: DictConfig) -> str | None:
    pool = cfg.model.pool
    return None if cfg.pyramid.mode != "pool" or pool not in ("head", "projection") else \
        f"pyramid.mode=pool: needs model.pool cls, mean or gem (pools its own cells), got model.pool={pool}"


def _long_side_fits(cfg: DictConfig) -> str | None:
    """What ``model.resize=long_side`` (a token grid of each crop's own shape) cannot do."""
    if str(cfg.model.get("resize", "squash")) != "long_side":
        return None
    if cfg.pyramid.mode == "pool":
        return "pyramid.mode=pool: cuts cells from one square token grid; model.resize=long_side needs " \
               "pyramid.mode=crop"
    if str(cfg.extract.get("crops", "pil")) != "pil":
        return f"extract.crops={cfg.extract.crops}: cuts squashed crops only; model.resize=long_side needs " \
               f"extract.crops=pil"
    if str(cfg.rerank.stage) in ("refine", "both"):
        return f"rerank.stage={cfg.rerank.stage}: refine encodes squashed windows; model.resize=long_side needs " \
               f"rerank=none or rerank=verify"
    return None


def rerank_extra_missing(rerank: DictConfig) -> str | None:
    """What ``rerank`` (the group) needs from the ``rerank`` extra and is not installed: poselib for
    verification, kornia for a learned matcher (src/patchify/rerank.py); found without importing them."""
    if str(rerank.stage) not in ("verify", "both"):
        return None
    needed = [("poselib", f"rerank.stage={rerank.stage}")]
    if str(rerank.verify.matcher) != "mnn":
        needed.append(("kornia", f"rerank.verify.matcher={rerank.verify.matcher}"))
    for module, setting in needed:
        if importlib.util.find_spec(module) is None:
            return f'{setting}: needs {module}, which is not installed: pip install "patchify[rerank]"'
    return None


def _verify_needs_rerank_extra(cfg: DictConfig) -> str | None:
    return rerank_extra_missing(cfg.rerank)


def _feature_files_need_eval(cfg: DictConfig) -> str | None:
    for name in ("import_features", "export_features"):
        if cfg.extract.get(name) and cfg.task != "eval":
            return f"extract.{name}={cfg.extract[name]}: applies to task=eval only (task={cfg.task})"
    return None


def _imported_features_fit(cfg: DictConfig) -> str | None:
    """What imported vectors cannot do: refine encodes windows with the encoder (which the file replaces), and a
    sharded index numbers patches by the pyramid's cells."""
    path = cfg.extract.get("import_features")
    if not path:
        return None
    if str(cfg.rerank.stage) in ("refine", "both"):
        return f"rerank.stage={cfg.rerank.stage}: refine encodes windows with the encoder, which " \
               f"extract.import_features={path} replaces; use rerank=none or rerank=verify"
    if int(cfg.index.get("shards", 1)) > 1 or bool(cfg.index.get("on_disk", False)):
        return f"index.shards={cfg.index.get('shards', 1)}: a sharded or on-disk index numbers patches by pyramid " \
               f"cell, which extract.import_features={path} has not; use index.shards=1 index.on_disk=false"
    return None


AGREEMENTS: tuple[Callable[[DictConfig], str | None], ...] = (
    _shard_in_range, _shards_need_extract, _search_needs_query, _eval_needs_labels, _revisited_crops_queries,
    _mat_needs_scipy, _refine_needs_quantizer,
    _head_needs_final_layer, _pool_mode_needs_tokens, _verify_needs_rerank_extra, _feature_files_need_eval,
    _imported_features_fit, _long_side_fits)


# ----------------------------------------------------------------------------- checking

def show(value: Any) -> str:
    """A value as one would type it in an override: ``null``, ``true``, ``[map, bogus]``, ``''``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, ListConfig)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, (dict, DictConfig)):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str) and not value:
        return "''"
    return str(value)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) is Union and type(None) in get_args(tp):
        rest = [a for a in get_args(tp) if a is not type(None)]
        return (rest[0] if len(rest) == 1 else Union[tuple(rest)]), True
    return tp, False


def _same(a: Any, b: Any, ignore_case: bool) -> bool:
    if isinstance(a, str) and isinstance(b, str) and ignore_case:
        return a.lower() == b.lower()
    return type(a) is type(b) and a == b


def _num(x: float) -> str:
    return str(int(x)) if float(x) == int(x) else str(x)


def _range_text(rule: Rule, integer: bool) -> str:
    lo, hi = rule.lo, rule.hi
    if lo is not None and hi is not None:
        if integer:
            return f" in {_num(lo)}..{_num(hi)}"
        return f" in {'(' if rule.lo_open else '['}{_num(lo)}, {_num(hi)}]"
    if lo is not None:
        return f" {'>' if rule.lo_open else '>='} {_num(lo)}"
    return f" <= {_num(hi)}" if hi is not None else ""


def _item_rule(rule: Rule) -> Rule:
    """The range of a list's items (a list's rule bounds its items)."""
    return Rule(lo=rule.lo, hi=rule.hi, lo_open=rule.lo_open)


def describe(tp: Any, rule: Rule) -> str:
    """What a key allows, in words: ``an integer in 0..3``, ``one of crop, pool``, ``null or a path``."""
    inner, nullable = _unwrap_optional(tp)
    if rule.allowed:
        text = rule.allowed
    elif rule.choices and get_origin(inner) is not list:
        text = "one of " + ", ".join(show(c) for c in rule.choices)
    elif inner is int:
        text = "an integer" + _range_text(rule, integer=True)
    elif inner is float:
        text = "a number" + _range_text(rule, integer=False)
    elif inner is bool:
        text = "true or false"
    elif inner is Path:
        text = "a path"
    elif inner is str:
        text = "text"
    elif get_origin(inner) is list:
        (item,) = get_args(inner)
        if rule.choices:
            text = f"a list of {rule.item}s from " + ", ".join(rule.choices)
        elif is_dataclass(item):
            text = "a list of settings groups (" + ", ".join(f.name for f in fields(item)) + ")"
        else:
            text = "a list of " + describe(item, _item_rule(rule)).replace("a number", "numbers", 1)
    elif is_dataclass(inner):
        text = "a group of settings (" + ", ".join(f.name for f in fields(inner)) + ")"
    else:
        text = "a value"
    return f"null or {text}" if nullable else text


def _fits(tp: Any, rule: Rule, value: Any) -> bool:
    """True when ``value`` has type ``tp`` and lies within ``rule`` (choices, range, check)."""
    if tp is bool:
        return isinstance(value, bool)
    if tp is int and type(value) is not int:
        return False
    if tp is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        return False
    if tp in (str, Path) and (not isinstance(value, str) or not value.strip()):
        return False
    if rule.choices and not any(_same(value, c, rule.ignore_case) for c in rule.choices):
        return False
    if rule.lo is not None and (value < rule.lo or (rule.lo_open and value == rule.lo)):
        return False
    if rule.hi is not None and value > rule.hi:
        return False
    return rule.check(value) if rule.check else True


def _check_value(tp: Any, rule: Rule, value: Any, name: str) -> None:
    inner, nullable = _unwrap_optional(tp)

    def wrong(hint: str = "") -> ConfigError:
        return ConfigError(f"{name}={show(value)}: must be {describe(tp, rule)}{hint}")

    if value is None and (nullable or (rule.check and rule.check(None))):
        return
    if is_dataclass(inner):
        if not isinstance(value, (DictConfig, dict)):
            raise wrong()
        _check_group(inner, value, name + ".")
        return
    if get_origin(inner) is list:
        (item_type,) = get_args(inner)
        if not isinstance(value, (ListConfig, list)) or (rule.nonempty and not len(value)):
            raise wrong()
        for i in range(len(value)):
            item = _get(value, i, f"{name}[{i}]")
            if is_dataclass(item_type):
                _check_value(item_type, Rule(), item, f"{name}[{i}]")
            elif rule.choices and not any(_same(item, c, rule.ignore_case) for c in rule.choices):
                raise ConfigError(f"{name}={show(value)}: unknown {rule.item} {item!r} "
                                  f"(choose from {', '.join(rule.choices)})")
            elif not _fits(item_type, _item_rule(rule), item):
                raise wrong()
        return
    if not _fits(inner, rule, value):
        number_for_text = inner in (str, Path) and isinstance(value, (int, float)) and not isinstance(value, bool)
        raise wrong(f" (Hydra reads this one as a number; quote it: '{name}=\"{value}\"')" if number_for_text else "")


def _get(node: Any, index: Any, name: str) -> Any:
    try:
        return node[index]
    except OmegaConfBaseException as err:  # an interpolation that does not resolve
        raise ConfigError(f"{name}: {str(err).splitlines()[0]}") from None


def _check_group(schema: type, node: Any, prefix: str) -> None:
    hints = get_type_hints(schema)
    declared = {f.name for f in fields(schema)}
    for f in fields(schema):
        name, rule = prefix + f.name, f.metadata["rule"]
        if isinstance(node, DictConfig) and OmegaConf.is_missing(node, f.name):
            raise ConfigError(f"{name}=???: required; must be {describe(hints[f.name], rule)}")
        if f.name not in node:
            if rule.absent_ok:
                continue
            raise ConfigError(f"{name}: missing from the config ({describe(hints[f.name], rule)})")
        _check_value(hints[f.name], rule, _get(node, f.name, name), name)
    if getattr(schema, "CLOSED", False):
        unknown = [k for k in node if k not in declared]
        if unknown:
            raise ConfigError(f"{prefix}{unknown[0]}={show(node[unknown[0]])}: unknown setting "
                              f"(known: {', '.join(sorted(declared))})")


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` with the first setting that cannot work (one line), else return."""
    _check_group(Settings, cfg, "")
    for agreement in AGREEMENTS:
        problem = agreement(cfg)
        if problem:
            raise ConfigError(problem)


def path_keys(schema: type = Settings, prefix: str = "") -> list[str]:
    """Dotted names of every key annotated ``Path`` (or ``Optional[Path]``)."""
    keys = []
    for name, tp in get_type_hints(schema).items():
        inner, _ = _unwrap_optional(tp)
        if inner is Path:
            keys.append(prefix + name)
        elif is_dataclass(inner):
            keys.extend(path_keys(inner, f"{prefix}{name}."))
    return keys


def expand_paths(cfg: DictConfig) -> None:
    """Expand ``~`` and ``~user`` (only those) in every path setting, in place."""
    with read_write(cfg):
        for dotted in path_keys():
            group, _, name = dotted.rpartition(".")
            node = OmegaConf.select(cfg, group) if group else cfg
            if node is None or name not in node:
                continue
            value = node[name]
            if isinstance(value, str) and value.startswith("~"):
                node[name] = os.path.expanduser(value)


if not OmegaConf.has_resolver("expanduser"):  # ${expanduser:${paths.logs}} in configs/config.yaml
    OmegaConf.register_new_resolver("expanduser", lambda path: os.path.expanduser(str(path)))
if not OmegaConf.has_resolver("mini_ilias_name"):  # configs/dataset/mini_ilias.yaml: one folder per object family
    OmegaConf.register_new_resolver("mini_ilias_name",
                                    lambda objects: "mini" if objects in (None, "emoji") else f"mini_{objects}")


__all__ = ["AGREEMENTS", "ConfigError", "Settings", "describe", "expand_paths", "path_keys", "show", "validate"]
