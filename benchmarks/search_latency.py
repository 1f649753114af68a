"""Per-query latency of task=search on a large gallery index (prints figures, not a test).

The gallery is synthetic but shaped like real features: every patch vector is a real
mini-ILIAS patch feature of the chosen model (L0..L3, from the feature cache) plus Gaussian
noise (sigma per dimension = --noise / sqrt(d)), re-normalised, so norms, dimension and the
spread of similarities resemble a real gallery. Queries are real query images, encoded by
the real model each time (decode + preprocess + forward), then searched.

    python benchmarks/search_latency.py --images 10000 [--queries 20] [Hydra overrides ...]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from hydra import compose, initialize_config_dir  # noqa: E402

from patchify import index as faiss_index  # noqa: E402
from patchify.console import setup_logging  # noqa: E402
from patchify.extraction import describe_images  # noqa: E402
from patchify.index import index_spec  # noqa: E402
from patchify.data import load_dataset  # noqa: E402
from patchify.features import make_feature_source  # noqa: E402
from patchify.pyramid import levels_for, patches_per_image  # noqa: E402
from patchify.search import search_images  # noqa: E402


def percentiles(values: list[float]) -> str:
    ms = np.asarray(values) * 1000
    return f"p50 {np.percentile(ms, 50):7.1f} ms   p95 {np.percentile(ms, 95):7.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--k", type=int, default=10)
    args, overrides = parser.parse_known_args()
    setup_logging(None)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    dataset = load_dataset(cfg.dataset)
    levels = levels_for(int(cfg.pyramid.level), cfg.pyramid.multi_scale)
    source = make_feature_source(cfg)
    real = source.features(dataset.gallery, levels, desc="gallery")

    rng = np.random.default_rng(0)
    per_image = patches_per_image(levels)
    rows = rng.integers(0, len(real.vectors), size=args.images * per_image)
    vectors = real.vectors[rows] + rng.normal(0, args.noise / np.sqrt(real.dim), (len(rows), real.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    patch_image = np.repeat(np.arange(args.images), per_image)

    started = time.perf_counter()
    spec = index_spec(cfg.index)
    index = faiss_index.create_index(spec, real.dim)
    if spec.needs_training():
        faiss_index.train_index(index, vectors[rng.choice(len(vectors), min(len(vectors), 200_000), replace=False)], spec)
    faiss_index.add_vectors(index, vectors, 0)
    faiss_index.set_nprobe(index, spec.nprobe)
    build_s = time.perf_counter() - started

    queries = (dataset.queries * (args.queries // max(len(dataset.queries), 1) + 1))[:args.queries]
    describe_images(queries[:1], source.query_model)  # warm-up
    encode_t, search_t, total_t = [], [], []
    for record in queries:
        t0 = time.perf_counter()
        vector, _ = describe_images([record], source.query_model)
        t1 = time.perf_counter()
        search_images(index, vector, patch_image, args.k, metric=spec.metric)
        t2 = time.perf_counter()
        encode_t.append(t1 - t0)
        search_t.append(t2 - t1)
        total_t.append(t2 - t0)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores")
    print(f"gallery: {args.images:,} images x {per_image} patches = {len(vectors):,} vectors, d={real.dim}, "
          f"index {spec.factory_string(real.dim)} {spec.metric} (built in {build_s:.1f} s, "
          f"{faiss_index.index_nbytes(index) / 2**20:,.0f} MiB)")
    print(f"model: {cfg.model.name} at {source.model.input_size}px on {source.model.device}; {len(queries)} queries, k={args.k}")
    print(f"  encode query  {percentiles(encode_t)}")
    print(f"  search        {percentiles(search_t)}")
    print(f"  total         {percentiles(total_t)}")


if __name__ == "__main__":
    main()
