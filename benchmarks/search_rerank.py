"""Wall time of task=search with rerank=verify on a small folder: first search (gallery local features
computed), the same search again (everything cached), a new query (only the query is described), and
the search without re-ranking (prints figures, not a test).

The folder: five real photos of scikit-image's wheel, in one of which (the coffee cup) the astronaut
portrait hangs as a small picture seen in perspective (the scene of tests/test_search_rerank.py), plus
``--distractors`` images of the generated mini-ILIAS. Each search is a separate ``python main.py``
process, as a user runs it; caches live in a fresh folder::

    python benchmarks/search_rerank.py [--distractors 25] [--workdir DIR] [Hydra overrides ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from patchify import rerank as rr  # noqa: E402
from patchify.assets import pip_package  # noqa: E402
from patchify.datasets.mini_ilias import SKIMAGE_REQUIREMENT  # noqa: E402
from patchify.metrics import box_iou  # noqa: E402


def make_folder(work: Path, distractors: int) -> tuple[Path, Path, Path, np.ndarray]:
    """(folder, query, second query, true box of the hanging picture)."""
    root = pip_package(SKIMAGE_REQUIREMENT) / "skimage" / "data"
    astronaut, coffee, cat, rocket, motorcycle = (Image.open(root / n).convert("RGB") for n in (
        "astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png"))
    scene = coffee.resize((800, 533))
    corners = np.array([[470, 60], [700, 85], [690, 330], [455, 300]], np.float64)
    h = rr.fit_homography(corners, np.array([[0, 0], [512, 0], [512, 512], [0, 512]], np.float64))
    coefficients = tuple((h / h[2, 2]).ravel()[:8])
    warped = astronaut.transform(scene.size, Image.Transform.PERSPECTIVE, coefficients, Image.Resampling.BILINEAR)
    scene.paste(warped, (0, 0), Image.new("L", astronaut.size, 255).transform(scene.size, Image.Transform.PERSPECTIVE,
                                                                             coefficients))
    folder = work / "photos"
    folder.mkdir(parents=True)
    scene.save(folder / "kitchen.jpg", quality=92)
    for name, image in (("cat.jpg", cat), ("rocket.jpg", rocket), ("motorcycle.jpg", motorcycle), ("coffee.jpg", coffee)):
        image.save(folder / name, quality=92)
    for path in sorted((ROOT / "ilias" / "mini" / "distractors").glob("*.jpg"))[:distractors]:
        shutil.copy(path, folder / path.name)
    query, other = work / "portrait.jpg", work / "portrait_small.jpg"
    astronaut.save(query, quality=95)
    astronaut.resize((384, 384)).save(other, quality=90)
    lo, hi = corners.min(0), corners.max(0)
    return folder, query, other, np.array([lo[0], lo[1], hi[0] - lo[0], hi[1] - lo[1]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--distractors", type=int, default=25)
    parser.add_argument("--workdir", type=Path, default=None)
    args, overrides = parser.parse_known_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="search_rerank_"))
    folder, query, other, truth = make_folder(work, args.distractors)
    base = [sys.executable, str(ROOT / "main.py"), "dataset=folder", f"dataset.root={folder}",
            f"paths.features={work / 'features'}", f"paths.indices={work / 'indices'}", *overrides]
    print(f"{platform.processor() or platform.machine()}, {len(list(folder.iterdir()))} images in {folder}")

    def timed(name: str, *extra: str) -> tuple[float, dict]:
        started = time.perf_counter()
        subprocess.run([*base, *extra, f"hydra.run.dir={work / 'runs' / name}"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.perf_counter() - started
        written = work / "runs" / name / "search.json"
        return seconds, json.loads(written.read_text()) if written.exists() else {}

    seconds, _ = timed("index", "task=index")
    print(f"task=index: {seconds:.1f} s")
    rows = [("search, rerank=none", "none", query), ("search, rerank=verify, first (cold)", "verify", query),
            ("same search again (warm)", "verify", query), ("a new query (warm gallery)", "verify", other)]
    print("| run | wall s | verify ms/query | local features computed | top result | verified box IoU |")
    print("|---|---:|---:|---:|---|---:|")
    for i, (label, stage, path) in enumerate(rows):
        seconds, written = timed(f"search{i}", "task=search", f"query.path={path}", f"rerank={stage}")
        best = written["queries"][0]["results"][0]
        rerank = written.get("rerank", {})
        iou = box_iou(np.array(best["box"], np.float64), truth).max() if best.get("verified") else float("nan")
        print(f"| {label} | {seconds:.1f} | {rerank.get('verify_ms_per_query', '-')} | "
              f"{rerank.get('verify_images_described', '-')} | {Path(best['path']).name} | {iou:.2f} |")


if __name__ == "__main__":
    main()
