"""Score a run folder's similarity files with ILIAS's own, unmodified evaluation code; print its mAP beside ours.

    git clone https://github.com/ilias-vrg/ilias /tmp/ilias      # or any checkout of it
    python scripts/check_ilias_official.py logs/<run> /tmp/ilias
    python scripts/check_ilias_official.py logs/<run> /tmp/ilias --dataset-dir /data/ilias   # real image_ids/

For each of the run's ``similarity.json`` and ``similarity.pkl`` (src/patchify/report.py), and with and
without ``--check_ids`` (every query and database id must be one ILIAS knows), this runs ILIAS's
``evaluation/evaluate.py`` as its README says (cwd = the checkout, ``--dataset_dir``, ``--k`` = the run's
``eval.k``) and prints the mAP line it prints (two decimals), then gets the same number at full
precision from the same code (``evaluation/src/dataset.py``'s ``ILIAS(...).evaluate``, called as
evaluate.py calls it) to compare with the run's metrics.json.

ILIAS's evaluation reads the dataset's ids from ``<dataset_dir>/image_ids/`` (image_query_ids.txt,
text_query_ids.txt, positive_ids.txt with object scale and clutter, distractor_ids.txt.gz). With
``--dataset-dir`` those are ILIAS's own (the real benchmark); otherwise they are written to a temporary
folder from the run's manifests (query.json, gallery.json): queries, positives with their object scale
(clutter 0: only ILIAS's per-group report uses it), one text-query id per instance (ILIAS derives its
instance list from them), and every unlabelled gallery id (tar-shard members included) as a distractor.
Needs numpy and scikit-learn (ILIAS's evaluation/requirements.txt), both in Patchify's environment.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
from patchify.data import read_manifest  # noqa: E402

FULL_PRECISION = """
import json, pickle, sys
sys.path.insert(0, "evaluation")
from src.dataset import ILIAS
dataset_dir, similarity_file, k, check = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
dataset = ILIAS(dataset_dir, check_ids=check)
if similarity_file.endswith(".pkl"):
    with open(similarity_file, "rb") as f:
        report = dataset.evaluate(**pickle.load(f), k=k, report=False)
else:
    with open(similarity_file) as f:
        report = dataset.evaluate(all_similarities=json.load(f), k=k, report=False)
print(repr(float(report["map"])), len(report["queries"]))
"""


def write_image_ids(run: Path, folder: Path) -> None:
    """ILIAS's ``image_ids/`` files for the run's dataset, from its manifests."""
    cfg = OmegaConf.load(run / "config.yaml").dataset
    root = Path(str(cfg.root))
    suffix = "" if cfg.get("split", "test") == "test" else f"_{cfg.split}"
    queries = read_manifest(run / f"query{suffix}.json", root)
    gallery = read_manifest(run / f"gallery{suffix}.json", root)
    ids = folder / "image_ids"
    ids.mkdir(parents=True, exist_ok=True)
    (ids / "image_query_ids.txt").write_text("".join(f"{q.id},{q.instance}\n" for q in queries))
    instances = sorted({q.instance for q in queries} | {r.instance for r in gallery if r.instance})
    (ids / "text_query_ids.txt").write_text("".join(f"{name}/query/T{n:03d}.txt\n" for n, name in enumerate(instances)))
    positives = [r for r in gallery if r.instance is not None]
    (ids / "positive_ids.txt").write_text("".join(  # id, object scale (0 without a box), clutter (unknown: 0)
        f"{r.id},{0.0 if math.isnan(r.object_scale) else r.object_scale!r},0\n" for r in positives))
    with gzip.open(ids / "distractor_ids.txt.gz", "wt") as handle:
        handle.writelines(f"{r.id}\n" for r in gallery if r.instance is None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run folder of task=eval (similarity.json, similarity.pkl, metrics.json)")
    parser.add_argument("ilias", type=Path, help="a checkout of github.com/ilias-vrg/ilias (its evaluation/ is run)")
    parser.add_argument("--dataset-dir", type=Path, help="ILIAS's dataset folder with image_ids/ (default: "
                                                         "written from the run's manifests)")
    args = parser.parse_args()
    run, ilias = args.run.resolve(), args.ilias.resolve()
    if not (ilias / "evaluation" / "evaluate.py").is_file():
        print(f"{ilias}: not a checkout of ilias-vrg/ilias (no evaluation/evaluate.py)", file=sys.stderr)
        return 2
    ours = json.loads((run / "metrics.json").read_text())["mAP"]
    k = int(OmegaConf.load(run / "config.yaml").eval.k)
    with tempfile.TemporaryDirectory() as temporary:
        dataset_dir = args.dataset_dir.resolve() if args.dataset_dir else Path(temporary)
        if not args.dataset_dir:
            write_image_ids(run, dataset_dir)
        print(f"run {run} (k={k}), ILIAS evaluation from {ilias}, ids from {dataset_dir / 'image_ids'}")
        print(f"{'file':<16} {'check_ids':<9} {'ILIAS prints':>12} {'ILIAS mAP (full)':>22} {'ours (metrics.json)':>22} "
              f"{'difference':>11}")
        worst = 0.0
        for name in ("similarity.json", "similarity.pkl"):
            for check in (False, True):
                command = [sys.executable, "evaluation/evaluate.py", "--dataset_dir", str(dataset_dir),
                           "--similarity_file", str(run / name), "--k", str(k)] + (["--check_ids"] if check else [])
                done = subprocess.run(command, cwd=ilias, capture_output=True, text=True)
                printed = re.search(r"mAP: ([0-9.]+)%", done.stdout)
                if done.returncode or printed is None:
                    print(f"{name}: ILIAS's evaluate.py failed:\n{done.stdout}{done.stderr}", file=sys.stderr)
                    return 1
                full = subprocess.run([sys.executable, "-c", FULL_PRECISION, str(dataset_dir), str(run / name), str(k),
                                       "1" if check else "0"], cwd=ilias, capture_output=True, text=True, check=True)
                value = float(full.stdout.split()[0])
                worst = max(worst, abs(value - ours))
                print(f"{name:<16} {str(check):<9} {printed.group(1) + '%':>12} {value:>22.15f} {ours:>22.15f} "
                      f"{value - ours:>11.1e}")
    print(f"largest difference: {worst:.1e} (mAP points)")
    return 0 if worst < 1e-9 else 1


if __name__ == "__main__":
    sys.exit(main())
