"""``patchify.evaluate``: mAP@k and LocScore of any method's ranked results (also ``patchify evaluate``).

The formulas are :mod:`patchify.metrics`'s (the pipeline's own); this module only reads results and
ground truth in the formats that docs/API.md specifies:

- results: a Patchify run folder (its ``results.jsonl``), JSON Lines rows
  ``{"query_id", "ids", "boxes"?, "scores"?}``, or one JSON object ``{query_id: ranking}`` whose
  ranking is a list of ids, a list of ``{"id", "box"?, "score"?}`` or ILIAS's similarity form
  ``{id: score}`` (ranked by score, highest first); predicted boxes may come from a second such file;
- ground truth: a dataset folder in ILIAS layout (``<dir>/ilias_core/<instance>/{query,pos}``, read
  by :mod:`patchify.data`), manifests (``query.json`` + ``gallery.json``), or a JSON object
  ``{query_id: {positive_id: [[x, y, w, h], ...]}}``.

A user mistake in a file is one :class:`~patchify.data.DataError` line naming the file and the problem.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from loguru import logger
from omegaconf import OmegaConf

from .. import metrics as patch_metrics
from ..data import (DataError, Dataset, annotation_gaps, read_ilias_layout, read_manifest)

PathLike = Union[str, Path]
RESULTS_FILE, SIMILARITY_FILE, CONFIG_FILE = "results.jsonl", "similarity.json", "config.yaml"


@dataclass
class Ranking:
    """One query's ranked gallery ids (best first), with a predicted box (x, y, w, h) per id (NaN: none)."""

    ids: list[str]
    boxes: np.ndarray | None  # (n, 4) float64, or None when the source has no boxes at all


@dataclass
class GroundTruth:
    """Positives (id -> boxes (m, 4)) per query, in the order queries are reported; object scales when known."""

    positives: dict[str, dict[str, np.ndarray]]
    scales: dict[str, dict[str, float]] | None = None
    source: str = "ground truth"


# ----------------------------------------------------------------------------- results

def _fail(source: str, problem: str) -> DataError:
    return DataError(f"{source}: {problem}")


def _box(value: Any, where: str, source: str) -> list[float]:
    """A predicted box ``[x, y, w, h]``; ``None`` means no box (NaN, never localised)."""
    if value is None:
        return [math.nan] * 4
    if not isinstance(value, (list, tuple)) or len(value) != 4 or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise _fail(source, f"{where}: a box must be [x, y, w, h] (4 numbers) or null, got {json.dumps(value)[:60]}")
    return [float(v) for v in value]


def _ids(values: Any, where: str, source: str) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values):
        raise _fail(source, f"{where}: 'ids' must be a list of gallery ids (strings)")
    ids = [str(v) for v in values]
    if len(set(ids)) != len(ids):
        values, counts = np.unique(ids, return_counts=True)
        raise _fail(source, f"{where}: id {str(values[counts > 1][0])!r} is ranked twice")
    return ids


def _ranking_of_row(row: Any, where: str, source: str) -> tuple[str, Ranking]:
    """A JSON Lines row ``{"query_id", "ids", "boxes"?, ...}`` (the pipeline's results.jsonl; other keys ignored)."""
    if not isinstance(row, dict) or "query_id" not in row or "ids" not in row:
        raise _fail(source, f"{where}: expected an object with 'query_id' and 'ids'")
    query = str(row["query_id"])
    ids = _ids(row["ids"], f"{where} (query {query})", source)
    boxes = None
    if row.get("boxes") is not None:
        if not isinstance(row["boxes"], list) or len(row["boxes"]) != len(ids):
            raise _fail(source, f"{where} (query {query}): 'boxes' must list one box per id ({len(ids)})")
        boxes = np.asarray([_box(b, f"{where} (query {query})", source) for b in row["boxes"]], np.float64)
    return query, Ranking(ids, boxes.reshape(-1, 4) if boxes is not None else None)


def _ranking_of_value(query: str, value: Any, source: str) -> Ranking:
    """One query's ranking in the JSON object form: ids, ``{"id", "box"?}`` items, or ``{id: score}``."""
    where = f"query {query}"
    if isinstance(value, dict) and isinstance(value.get("ids"), list):  # one JSON Lines row, keyed by its query
        return _ranking_of_row({**value, "query_id": query}, where, source)[1]
    if isinstance(value, dict):  # ILIAS similarity: ranked by score, highest first (stable: ties keep file order)
        scores = list(value.values())
        if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores):
            raise _fail(source, f"{where}: scores must be finite numbers ({{id: score}}, ILIAS's similarity form)")
        order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
        keys = list(value)
        return Ranking([str(keys[i]) for i in order], None)
    if not isinstance(value, list):
        raise _fail(source, f"{where}: a ranking must be a list of ids, a list of {{\"id\", \"box\"}} objects "
                            f"or an {{id: score}} object")
    if value and all(isinstance(item, dict) for item in value):
        if not all("id" in item for item in value):
            raise _fail(source, f"{where}: every ranked object needs an 'id'")
        ids = _ids([item["id"] for item in value], where, source)
        if not any("box" in item for item in value):
            return Ranking(ids, None)
        return Ranking(ids, np.asarray([_box(item.get("box"), where, source) for item in value], np.float64).reshape(-1, 4))
    return Ranking(_ids(value, where, source), None)


def _load_json_or_lines(path: Path) -> Any:
    """A JSON document, or the list of rows of a JSON Lines file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(f"{path}: results file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: unreadable ({type(err).__name__}: {err})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not JSON nor JSON Lines ({err.msg} at column {err.colno})") from None
        if not rows:
            raise DataError(f"{path}: empty results file") from None
        return rows


def results_file(path: PathLike) -> Path:
    """The file to read for ``path``: itself, or a run folder's ``results.jsonl`` (else ``similarity.json``)."""
    path = Path(path)
    if path.is_dir():
        for name in (RESULTS_FILE, SIMILARITY_FILE):
            if (path / name).is_file():
                return path / name
        raise DataError(f"{path}: no {RESULTS_FILE} or {SIMILARITY_FILE} here (not a Patchify run folder)")
    if not path.exists():
        raise DataError(f"{path}: results file not found")
    return path


def read_results(results: PathLike | Mapping | Sequence, boxes: PathLike | Mapping | Sequence | None = None
                 ) -> dict[str, Ranking]:
    """Rankings per query id from any accepted results form (docs/API.md, "Results format").

    ``boxes``: a second results source whose boxes are used for the rankings of ``results`` (e.g.
    an ILIAS similarity file plus a file with predicted boxes); a ranked id it has no box for is not
    localised.
    """
    source = "results"
    if isinstance(results, (str, Path)):
        path = results_file(results)
        if path.suffix == ".pkl":  # ILIAS's pickle similarity form (a run's similarity.pkl)
            from ..report import read_similarity

            source, content = str(path), read_similarity(path)
        else:
            source, content = str(path), _load_json_or_lines(path)
    else:
        content = results
    rankings: dict[str, Ranking] = {}
    if isinstance(content, Mapping) and "query_id" in content and "ids" in content:
        content = [content]  # a JSON Lines file of one row
    if isinstance(content, Mapping):
        if not content:
            raise _fail(source, "no queries in the results")
        for query, value in content.items():
            rankings[str(query)] = _ranking_of_value(str(query), value, source)
    elif isinstance(content, Sequence) and not isinstance(content, (str, bytes)):
        if not content:
            raise _fail(source, "no queries in the results")
        for number, row in enumerate(content, start=1):
            query, ranking = _ranking_of_row(row, f"row {number}", source)
            if query in rankings:
                raise _fail(source, f"row {number}: query {query!r} appears twice")
            rankings[query] = ranking
    else:
        raise _fail(source, "expected JSON Lines rows or a JSON object {query_id: ranking}")
    if boxes is not None:
        _attach_boxes(rankings, read_results(boxes), source)
    return rankings


def _attach_boxes(rankings: dict[str, Ranking], boxed: dict[str, Ranking], source: str) -> None:
    """Give every ranked id the box the other source predicts for it (NaN where it has none)."""
    if not any(r.boxes is not None for r in boxed.values()):
        raise _fail(source, "the boxes source has no boxes")
    for query, ranking in rankings.items():
        other = boxed.get(query)
        table = {} if other is None or other.boxes is None else dict(zip(other.ids, other.boxes))
        ranking.boxes = np.asarray([table.get(i, [math.nan] * 4) for i in ranking.ids], np.float64).reshape(-1, 4)


# ----------------------------------------------------------------------------- ground truth

def ground_truth_of_dataset(dataset: Dataset) -> GroundTruth:
    """Positives with boxes and object scales of every query of ``dataset`` (the pipeline's own ground truth)."""
    scale_of = {r.id: r.object_scale for r in dataset.gallery if r.instance is not None}
    positives = {q.id: dataset.positives_of(q.instance) for q in dataset.queries}
    scales = {q: {p: scale_of[p] for p in found} for q, found in positives.items()}
    gaps = annotation_gaps(dataset)
    for kind, what in (("positives_without_boxes", "positives have no box (never localised)"),
                       ("queries_without_positives", "queries have no positive in the gallery (AP 0, counted)")):
        if gaps[kind]:
            logger.warning(f"{dataset.root}: {len(gaps[kind])} {what}, e.g. {gaps[kind][0]}")
    return GroundTruth(positives, scales, source=str(dataset.root))


def read_dataset(folder: PathLike, core_dir: str = "ilias_core") -> Dataset:
    """Queries and labelled gallery of a dataset folder: ILIAS layout (scanned), or its ``query.json`` +
    ``gallery.json`` manifests. Distractors never change a metric, so they are not read."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: dataset folder not found")
    if (folder / core_dir).is_dir():
        return read_ilias_layout(folder, core_dir)
    if (folder / "query.json").is_file() and (folder / "gallery.json").is_file():
        return Dataset(name=folder.name, root=folder, queries=read_manifest(folder / "query.json", folder),
                       gallery=read_manifest(folder / "gallery.json", folder))
    raise DataError(f"{folder}: not a dataset in ILIAS layout (no {core_dir}/<instance>/query|pos folders, "
                    "no query.json + gallery.json manifests)")


def _read_truth_mapping(content: Any, source: str) -> GroundTruth:
    if not isinstance(content, Mapping) or not content:
        raise _fail(source, "ground truth must be a JSON object {query_id: {positive_id: [[x, y, w, h], ...]}}")
    positives: dict[str, dict[str, np.ndarray]] = {}
    for query, found in content.items():
        if not isinstance(found, Mapping):
            raise _fail(source, f"query {query}: expected {{positive_id: [[x, y, w, h], ...]}}, got {type(found).__name__}")
        boxes = {}
        for pid, value in found.items():
            if not isinstance(value, list):
                raise _fail(source, f"query {query}, positive {pid}: boxes must be a list of [x, y, w, h] ([] for none)")
            boxes[str(pid)] = np.asarray([_box(b, f"query {query}, positive {pid}", source) for b in value],
                                         np.float64).reshape(-1, 4)
        positives[str(query)] = boxes
    return GroundTruth(positives, None, source=source)


def read_ground_truth(ground_truth: PathLike | Mapping | Dataset | GroundTruth) -> GroundTruth:
    """Ground truth from a dataset folder, a ``Dataset``, a JSON file or a mapping (docs/API.md)."""
    if isinstance(ground_truth, GroundTruth):
        return ground_truth
    if isinstance(ground_truth, Dataset):
        return ground_truth_of_dataset(ground_truth)
    if isinstance(ground_truth, (str, Path)):
        path = Path(ground_truth)
        if path.is_dir():
            return ground_truth_of_dataset(read_dataset(path))
        if not path.exists():
            raise DataError(f"{path}: ground truth not found")
        try:
            content = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataError(f"{path}: not a JSON ground-truth file ({type(err).__name__}: {err})") from None
        return _read_truth_mapping(content, str(path))
    return _read_truth_mapping(ground_truth, "ground truth")


def run_folder_ground_truth(run: Path) -> GroundTruth:
    """The ground truth a run folder was scored on: its manifests (or the pinned ones) over its dataset.root."""
    cfg = OmegaConf.load(run / CONFIG_FILE).dataset
    root = Path(str(cfg.root)).expanduser()
    if cfg.get("kind") != "ilias":
        raise DataError(f"{run / CONFIG_FILE}: dataset.kind={cfg.get('kind')} has no ground truth; give --dataset DIR")
    suffix = "" if cfg.get("split", "test") == "test" else f"_{cfg.split}"
    names = (f"query{suffix}.json", f"gallery{suffix}.json")
    folder = run if all((run / n).is_file() for n in names) else root
    if all((folder / n).is_file() for n in names):
        return ground_truth_of_dataset(Dataset(name=str(cfg.get("name", root.name)), root=root,
                                               queries=read_manifest(folder / names[0], root),
                                               gallery=read_manifest(folder / names[1], root)))
    return ground_truth_of_dataset(read_dataset(root, str(cfg.get("core_dir", "ilias_core"))))


# ----------------------------------------------------------------------------- evaluate

def _run_folder(results: Any) -> Path | None:
    if isinstance(results, (str, Path)) and Path(results).is_dir() and (Path(results) / CONFIG_FILE).is_file():
        return Path(results)
    return None


def run_settings(run: Path) -> dict:
    """``eval.k``, ``eval.iou_threshold`` and ``eval.metrics`` of a run folder's config.yaml."""
    cfg = OmegaConf.load(run / CONFIG_FILE).get("eval", {})
    return {"k": cfg.get("k"), "iou": cfg.get("iou_threshold"),
            "metrics": list(cfg.get("metrics")) if cfg.get("metrics") is not None else None}


def evaluate(results: PathLike | Mapping | Sequence, ground_truth: PathLike | Mapping | Dataset | None = None, *,
             boxes: PathLike | Mapping | Sequence | None = None, k: int | None = None,
             iou: str | float | Sequence[float] | None = None, metrics: Sequence[str] | None = None) -> dict:
    """mAP@k, LocScore and top-k rates (percent) of ranked results against ground truth.

    ``results``/``boxes``: see :func:`read_results`; ``ground_truth``: see :func:`read_ground_truth`
    (None: a run folder's own). ``k`` (default 1000), ``iou`` (``"default"`` 0.4, ``"average"``
    0.2..0.6, a number or a list; default ``"average"``) and ``metrics`` (``map``, ``locscore``,
    ``topk``; default all, ``locscore`` only when the results carry boxes) default to a run folder's
    ``eval`` settings. Every ground-truth query counts: one the results lack ranks nothing (AP 0,
    ``missing_queries`` lists it). Returns :func:`patchify.metrics.evaluate`'s dict.
    """
    run = _run_folder(results)
    saved = run_settings(run) if run is not None else {}
    k = int(k if k is not None else saved.get("k") or 1000)
    iou = iou if iou is not None else saved.get("iou") or "average"
    try:
        taus = patch_metrics.resolve_iou_thresholds(iou)
    except ValueError as err:
        raise DataError(f"iou={iou}: {err}") from None
    if k < 1:
        raise DataError(f"k={k}: must be a positive integer")
    rankings = read_results(results, boxes)
    source = str(results_file(results)) if isinstance(results, (str, Path)) else "results"
    if ground_truth is None:
        if run is None:
            raise DataError(f"{source}: no ground truth given (a dataset folder, a ground-truth JSON file or a mapping)")
        truth = run_folder_ground_truth(run)
    else:
        truth = read_ground_truth(ground_truth)
    unknown = [q for q in rankings if q not in truth.positives]
    if unknown:
        raise _fail(source, f"query {unknown[0]!r} is not a query of {truth.source} ({len(unknown)} unknown of "
                            f"{len(rankings)}; are the ids in the same form, e.g. {next(iter(truth.positives))!r}?)")
    has_boxes = any(r.boxes is not None for r in rankings.values())
    wanted = tuple(m.lower() for m in (metrics or saved.get("metrics") or patch_metrics.METRICS))
    if metrics is None and not has_boxes:
        wanted = tuple(m for m in wanted if m != "locscore")
    unknown_metrics = sorted(set(wanted) - set(patch_metrics.METRICS))
    if unknown_metrics:
        raise DataError(f"metrics={list(wanted)}: unknown metric {unknown_metrics[0]!r} "
                        f"(choose from {', '.join(patch_metrics.METRICS)})")
    if "locscore" in wanted and not has_boxes:
        raise _fail(source, "no predicted boxes, which LocScore needs; give 'boxes' per ranked id (or a boxes file)")
    missing = [q for q in truth.positives if q not in rankings]
    if missing:
        logger.warning(f"{source}: {len(missing)} of {len(truth.positives)} ground-truth queries have no results "
                       f"(each scores 0), e.g. {missing[0]}")
    query_results = []
    for query, positives in truth.positives.items():
        ranking = rankings.get(query, Ranking([], np.zeros((0, 4))))
        ranked_boxes = ranking.boxes
        if ranked_boxes is None and "locscore" in wanted:
            ranked_boxes = np.full((len(ranking.ids), 4), np.nan)
        query_results.append(patch_metrics.QueryResult(
            query_id=query, ranked_ids=ranking.ids, ranked_boxes=ranked_boxes, positives=positives,
            positive_scales=truth.scales.get(query) if truth.scales is not None else None))
    out = patch_metrics.evaluate(query_results, k=k, iou_thresholds=taus, metrics=wanted)
    if missing:
        out["missing_queries"] = missing
    return out


# ----------------------------------------------------------------------------- command line

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _iou_spec(text: str) -> str | list[float]:
    spec: str | list[float] = text
    if "," in text:
        try:
            spec = [float(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected default, average, a number or numbers like 0.3,0.5; got {text!r}") from None
    try:
        patch_metrics.resolve_iou_thresholds(spec)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return spec


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="patchify evaluate",
        description="mAP@k and LocScore of any method's ranked results (formats: docs/API.md, 'Results format').",
        epilog="examples:\n"
               "  patchify evaluate logs/<run>                       # a run folder, scored on its own dataset\n"
               "  patchify evaluate results.jsonl --dataset ilias/mini\n"
               "  patchify evaluate similarity.json --boxes boxes.json --dataset DIR --k 1000 --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", help="a run folder, a JSON Lines results file, or a JSON object {query_id: ranking} "
                                   "(ILIAS similarity files included)")
    truth = p.add_mutually_exclusive_group()
    truth.add_argument("--dataset", metavar="DIR", help="dataset folder in ILIAS layout (or with query.json + "
                                                        "gallery.json); default for a run folder: its own")
    truth.add_argument("--ground-truth", metavar="FILE", help="JSON {query_id: {positive_id: [[x, y, w, h], ...]}}")
    p.add_argument("--boxes", metavar="FILE", help="predicted boxes from another results file (e.g. beside an ILIAS "
                                                   "similarity file)")
    p.add_argument("--k", type=_positive_int, help="ranked list length (default 1000, or the run folder's eval.k)")
    p.add_argument("--iou", type=_iou_spec, help="LocScore IoU threshold(s): default (0.4), average (0.2..0.6), a "
                                                 "number, or numbers like 0.3,0.5 (default average, or the run's)")
    p.add_argument("--metrics", help="comma-separated subset of map,locscore,topk (default: all the input allows)")
    p.add_argument("--name", help="row name in the table (default: the results' folder or file name)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON instead of the table")
    p.add_argument("--per-query", action="store_true", help="with --json: include every query's values")
    return p


def main(argv: list[str], console_logging: bool = False) -> int:
    """``patchify evaluate ...``: print the metrics table (or JSON); user errors are one line, exit 2.
    ``console_logging``: warnings in the command line's short format (the console script sets it)."""
    from ..console import is_user_error, metrics_table, setup_logging

    args = parser().parse_args(argv)
    if console_logging:
        setup_logging(None)
    try:
        if args.dataset and not Path(args.dataset).is_dir():
            raise DataError(f"{args.dataset}: dataset folder not found")
        metrics = evaluate(args.results, args.dataset or args.ground_truth, boxes=args.boxes, k=args.k, iou=args.iou,
                           metrics=[m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None)
    except Exception as err:  # a user's mistake is one line; a bug keeps its traceback
        if not isinstance(err, DataError) and not is_user_error(err):  # (is_user_error imports torch)
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        shown = metrics if args.per_query else {key: v for key, v in metrics.items() if key != "per_query"}
        print(json.dumps(shown, indent=1))
        return 0
    run = _run_folder(args.results)
    name = args.name or (str(OmegaConf.load(run / CONFIG_FILE).get("run_name", run.name)) if run else
                         Path(args.results).resolve().name)
    print(metrics_table([(name, metrics)]))
    if "iou_thresholds" in metrics:
        print(f"LocScore = mean over IoU thresholds {metrics['iou_thresholds']}; k = {metrics['k']}; "
              f"{metrics['num_queries']} queries")
    else:
        print(f"k = {metrics['k']}; {metrics['num_queries']} queries; no LocScore (the results carry no boxes)")
    return 0
