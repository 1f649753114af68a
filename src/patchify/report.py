"""Run report: everything a run leaves in ``logs/<run>/``.

- ``config.yaml``: the resolved configuration;
- ``environment.json``: git commit (and whether the tree was dirty), package
  versions, Python, command line, the encoder's precision as resolved on this
  machine (``extract.precision=auto`` -> fp16, bf16 or fp32);
- ``metrics.json``: the metrics (percent) with timings and counts;
- ``results.jsonl``: one line per query: top-k ids, scores, predicted boxes;
- ``similarity.json``: ILIAS's own format, ``{query_id: {db_id: score}}`` in
  ranked order, which ILIAS's ``evaluation/evaluate.py`` reads;
- ``similarity.pkl``: the same similarities in ILIAS's pickle form (:func:`similarity_arrays`), which
  the same ``evaluate.py`` reads (and ILIAS's ``knn_search`` writes); both are always written (no
  switch): at ILIAS's full scale (1,232 queries x k=1000) that costs seconds, against hours of extraction;
- ``run.log``: the console log (added by ``main.py``);
- with ``eval.visualize=true``: ``pictures/<query>.jpg`` (query beside its top-k,
  predicted boxes orange, ground truth green, hits and misses framed) and one
  self-contained ``report.html``.
"""

from __future__ import annotations

import json
import pickle
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from .cache import atomic_write_bytes, atomic_write_text
from .data import DataError, load_data_pickle
from .model import ModelConfigError, resolve_device, resolve_precision

PACKAGES = ("torch", "torchvision", "timm", "faiss-cpu", "faiss-gpu", "numpy", "hydra-core", "omegaconf", "Pillow")


def git_state(root: Path) -> dict:
    """Commit hash and dirtiness of the repository holding ``root`` (None outside git)."""
    def git(*args: str) -> str | None:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else None

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def resolved_precision(cfg: DictConfig) -> str | None:
    """``extract.precision`` as this machine runs it; None when the device setting cannot be met
    (the run then stops with that error when it loads the model)."""
    extract = cfg.get("extract")
    if extract is None:
        return None
    try:
        return resolve_precision(str(extract.precision), resolve_device(str(extract.device)))
    except ModelConfigError:
        return None


SIMILARITY_JSON, SIMILARITY_PICKLE = "similarity.json", "similarity.pkl"


def similarity_arrays(similarity: dict[str, dict[str, float]]) -> dict:
    """ILIAS's pickle form of ``{query_id: {db_id: score}}`` (ilias-vrg/ilias knn_search ``save_results_pkl``,
    read by evaluation/src/dataset.py ``_evaluate_pkl``): ``query_ids`` (list of str, in the given order),
    ``db_ids`` (1-D str array: every ranked id once, sorted, as ILIAS's ``reindex`` leaves them), ``sims``
    (float64, row i = query i's scores in ranked order) and ``ranks`` (int64, positions in ``db_ids`` of
    those images). ``sims`` and ``ranks`` are (n_queries, k) arrays when every query ranks as many images
    (always, unless an IVF index with ``nprobe < nlist`` ranked fewer for some), else lists of 1-D arrays, which
    ILIAS's evaluation reads the same way (it iterates rows). Scores are float64, the very numbers of
    ``similarity.json``, so both files give ILIAS's evaluation identical arrays, ties included."""
    query_ids = [str(q) for q in similarity]
    rows = [list(ranked.items()) for ranked in similarity.values()]
    seen: dict[str, int] = {}  # id -> order of first appearance
    first = np.fromiter((seen.setdefault(image_id, len(seen)) for row in rows for image_id, _ in row), np.int64)
    names = list(seen)
    order = sorted(range(len(names)), key=names.__getitem__)
    sorted_position = np.empty(len(names), np.int64)
    sorted_position[order] = np.arange(len(names))
    db_ids = np.asarray([names[i] for i in order], dtype=str)
    cuts = np.cumsum([len(row) for row in rows])[:-1]
    sims = [np.asarray([score for _, score in row], np.float64) for row in rows]
    ranks = np.split(sorted_position[first], cuts)
    if len({len(row) for row in rows}) <= 1:
        width = len(rows[0]) if rows else 0
        sims = np.asarray(sims, np.float64).reshape(len(rows), width)
        ranks = np.asarray(ranks, np.int64).reshape(len(rows), width)
    return {"query_ids": query_ids, "db_ids": db_ids, "sims": sims, "ranks": ranks}


def read_similarity(path: Path) -> dict[str, dict[str, float]]:
    """``{query_id: {db_id: score}}`` of an ILIAS similarity file, JSON or pickle (:func:`similarity_arrays`'s
    keys; ``sims`` and ``ranks`` as arrays or lists of rows); DataError (one line) when it is not one."""
    path = Path(path)
    try:
        if path.suffix != ".pkl":
            return json.loads(path.read_text())
        with open(path, "rb") as handle:
            content = load_data_pickle(handle)
        db_ids = np.asarray(content["db_ids"]).astype(str)
        return {str(query): {str(db_ids[int(r)]): float(s) for s, r in zip(np.asarray(sims).reshape(-1),
                                                                            np.asarray(ranks).reshape(-1))}
                for query, sims, ranks in zip(content["query_ids"], content["sims"], content["ranks"])}
    except FileNotFoundError:
        raise DataError(f"{path}: similarity file not found") from None
    except (OSError, ValueError, KeyError, TypeError, IndexError, EOFError, pickle.UnpicklingError) as err:
        raise DataError(f"{path}: not an ILIAS similarity file ({type(err).__name__}: {err})") from None


class RunReport:
    """Writer of one run folder."""

    def __init__(self, run_dir: Path, cfg: DictConfig):
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        self.write_json("environment.json", {
            "git": git_state(Path(__file__).resolve().parent),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "packages": package_versions(),
            "argv": sys.argv,
            "precision": resolved_precision(cfg),
        })

    def write_json(self, name: str, content) -> Path:
        path = self.dir / name
        atomic_write_text(path, json.dumps(content, indent=1))
        return path

    def write_results(self, results, hits, metrics: dict) -> None:
        """metrics.json, results.jsonl and the ILIAS similarity file."""
        per_query = metrics.get("per_query", [])
        self.write_json("metrics.json", {k: v for k, v in metrics.items() if k != "per_query"})
        lines, similarity = [], {}
        for row, result in enumerate(results):
            valid = hits.images[row] >= 0
            scores = hits.scores[row][valid].astype(float)
            entry = {"query_id": result.query_id, "ids": result.ranked_ids,
                     "scores": np.round(scores, 6).tolist(),
                     "boxes": np.round(result.ranked_boxes, 2).tolist(),
                     **(per_query[row] if row < len(per_query) else {})}
            lines.append(json.dumps(entry))
            similarity[result.query_id] = dict(zip(result.ranked_ids, scores.tolist()))
        atomic_write_text(self.dir / "results.jsonl", "\n".join(lines) + "\n")
        atomic_write_text(self.dir / SIMILARITY_JSON, json.dumps(similarity))
        atomic_write_bytes(self.dir / SIMILARITY_PICKLE, pickle.dumps(similarity_arrays(similarity), protocol=4),
                           what="similarity file")

    def write_visuals(self, dataset, results, hits, metrics: dict, top: int, max_queries: int) -> None:
        """Per-query pictures and the HTML report for the first ``max_queries`` queries."""
        from .visualize import write_html_report, write_query_pictures

        by_id = {r.id: r for r in dataset.gallery}
        items = []
        for row, result in enumerate(results[:max_queries]):
            valid = hits.images[row] >= 0
            ranked = [{"record": by_id[image_id], "score": float(score), "box": tuple(box),
                       "relevant": image_id in result.positives, "gt_boxes": result.positives.get(image_id)}
                      for image_id, score, box in zip(result.ranked_ids[:top], hits.scores[row][valid][:top],
                                                      result.ranked_boxes[:top])]
            items.append((dataset.queries[row], ranked))
        write_query_pictures(self.dir / "pictures", items, top=top)
        write_html_report(self.dir / "report.html", f"Patchify: {self.dir.name}", metrics, items, top=top)
