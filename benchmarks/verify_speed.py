"""Milliseconds per query of geometric verification (rerank=verify), per matcher, cold and warm
(prints figures, not a test).

The first stage runs as ``python main.py`` would (same config and overrides; default: the
mini-ILIAS, packaged DINOv2, L3, exact search, caches reused). Then, per matcher, in a fresh
local-feature cache folder:

1. ``gallery``: the local features of every gallery image among the queries' top N are
   computed (timed: seconds per image);
2. ``warm``: verification of each query's top N (``_verify``, as ``rerank=verify`` runs it) with
   those gallery features cached: the query's own features, matching, RANSAC, re-sorting.

Warm ms/query is (2) / queries. Cold ms/query is the warm figure plus N times the gallery
seconds per image: a query none of whose candidates was described before. Match and RANSAC
columns are per (query, candidate) pair, measured inside (2)::

    python benchmarks/verify_speed.py [Hydra overrides ...] [--queries 30] [--top-n 100] [--threads 1]
        [--matchers mnn lighterglue lightglue]

(``--matchers`` takes every word after it: give Hydra overrides before it.)

The first line printed gives the threads and the machine's load average: on a shared machine,
torch's two threads fight other jobs for the cores and the learned matchers slow down several-fold.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from patchify import index as faiss_index  # noqa: E402
from patchify import rerank as rr  # noqa: E402
from patchify.console import setup_logging  # noqa: E402
from patchify.data import load_dataset  # noqa: E402
from patchify.features import make_feature_source  # noqa: E402
from patchify.index import index_spec  # noqa: E402
from patchify.indexing import build_index, index_ids  # noqa: E402
from patchify.tasks.evaluate import query_region  # noqa: E402
from patchify.pyramid import levels_for  # noqa: E402
from patchify.search import ImageHits, rows_of_ids, search_images  # noqa: E402
from patchify.settings import validate  # noqa: E402


class Stopwatch:
    """Wraps a function of ``rr`` and adds up its calls' seconds."""

    def __init__(self, name: str):
        self.name, self.seconds, self.calls = name, 0.0, 0
        self.inner = getattr(rr, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return self.inner(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started
                self.calls += 1

        setattr(rr, name, timed)

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def first_stage(cfg) -> tuple:
    dataset = load_dataset(cfg.dataset)
    levels = levels_for(int(cfg.pyramid.level), cfg.pyramid.multi_scale)
    source = make_feature_source(cfg)
    queries = source.queries(dataset.queries, region=query_region(cfg))
    gallery = source.features(dataset.gallery, levels, desc="gallery")
    index = build_index(cfg, source, dataset.gallery, gallery, levels)
    faiss_index.set_search_params(index, index_spec(cfg.index))
    ids = index_ids(cfg.index, gallery, levels)
    hits = search_images(index, queries.vectors, gallery.image, int(cfg.eval.k), metric=str(cfg.index.metric),
                         row_of_id=None if ids is None else rows_of_ids(ids))
    boxes = gallery.boxes[np.maximum(hits.patches, 0)].astype(np.float64)
    return dataset, ImageHits(hits.images, hits.scores, hits.patches, boxes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--matchers", nargs="+", default=list(rr.MATCHERS), choices=rr.MATCHERS)
    parser.add_argument("--queries", type=int, default=0, help="first Q queries only (0: all)")
    parser.add_argument("--top-n", type=int, default=0, help="candidates verified per query (0: rerank.top_n)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args, overrides = parser.parse_known_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    setup_logging(None)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["rerank=verify", *overrides])
    validate(cfg)
    dataset, hits = first_stage(cfg)
    nq = args.queries or len(dataset.queries)
    queries = dataset.queries[:nq]
    hits = ImageHits(hits.images[:nq], hits.scores[:nq], hits.patches[:nq], hits.boxes[:nq])
    n = min(args.top_n or int(cfg.rerank.top_n), hits.images.shape[1])
    sizes: dict[int, tuple[int, int]] = {}

    def size_of(i: int) -> tuple[int, int]:
        if i not in sizes:
            sizes[i] = rr._size(dataset.gallery[i])
        return sizes[i]

    needed = sorted({int(i) for i in hits.images[:, :n].ravel() if i >= 0})
    watches = [Stopwatch(name) for name in ("mutual_matches", "learned_matches", "ransac")]
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f} at start; "
          f"{nq} queries x top {n} ({len(needed)} distinct gallery images); overrides: {' '.join(overrides) or '-'}")
    print("| matcher | gallery s/image | warm ms/query | cold ms/query | query features + rest ms | match ms/pair "
          "| RANSAC ms/pair | verified pairs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for matcher in args.matchers:
        verify = OmegaConf.merge(cfg.rerank.verify, {"matcher": matcher})
        with tempfile.TemporaryDirectory(prefix="verify_speed-") as root:
            local = rr.LocalFeatures(Path(root), int(verify.top_k), int(verify.max_side), rr.EXTRACTOR_OF[matcher])
            if matcher != "mnn":
                rr._lightglue(matcher)  # load the matcher's weights outside the timings
            started = time.perf_counter()
            local.get([dataset.gallery[i] for i in needed])
            gallery_s = (time.perf_counter() - started) / max(len(needed), 1)
            for watch in watches:
                watch.reset()
            run_hits = copy.deepcopy(hits)
            started = time.perf_counter()
            inliers, _, described = rr._verify(verify, run_hits, n, queries, dataset.gallery, size_of, Path(root))
            warm = time.perf_counter() - started
        pairs = int((inliers >= 0).sum())
        match = sum(w.seconds for w in watches if w.name != "ransac")
        ransac = next(w for w in watches if w.name == "ransac").seconds
        verified = int((inliers >= int(verify.min_inliers)).sum())
        describe_ms = 1000 * (warm - match - ransac) / nq  # the query's features, sorting, loading the extractor
        print(f"| {matcher} | {gallery_s:.3f} | {1000 * warm / nq:,.0f} | {1000 * (warm / nq + n * gallery_s):,.0f} "
              f"| {describe_ms:,.0f} | {1000 * match / max(pairs, 1):.2f} | {1000 * ransac / max(pairs, 1):.2f} "
              f"| {verified} of {pairs} |", flush=True)
        if described > len(queries):
            print(f"  (warning: {described - len(queries)} gallery images were described inside the warm pass)")


if __name__ == "__main__":
    main()
