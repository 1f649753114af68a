"""Image-level search against raw FAISS: what max-per-image costs on top of the patch search (prints figures).

``search_images`` (src/patchify/search.py) asks FAISS for ``kp = 4 k`` patches, keeps each image's best,
and searches again with twice as many patches for the queries that found fewer than ``k`` images. Its
gallery-wide bookkeeping (:class:`PatchOwners`) is built once per gallery, so per query it should cost
what FAISS costs plus O(kp). This benchmark measures that, single query, one thread, k = 10, 100, 1000
images, side by side in one run: for every query, the raw ``index.search`` of the first ``kp`` patches
and the image-level search, in alternating order.

Galleries (``images x 30`` patches, d = 384, ``IVF{nlist},PQ64x8``, nlist the largest power of two
<= 4 sqrt(patches), as benchmarks/index_scale.py):

- ``real``: a real build of synthetic low-rank vectors (rank 64 + noise; an image's 30 patches share an
  image component, so an image's patches rank together, as real ones do), queries near random patches;
- ``proxy``: the real shape with random content (``add_sa_codes``, as ``index_scale.py scan``), for sizes
  whose real build is hours here; ``independent`` codes (an image's patches unrelated) or ``clustered``
  (an image's 30 patches in one list, sharing 48 of their 64 code bytes: its patches rank together and
  the search must widen more often).

    python benchmarks/image_search_overhead.py --real 30000 --proxy 100000 1000000 --queries 100
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from patchify.search import PatchOwners, search_images  # noqa: E402

D, PATCHES, M = 384, 30, 64
KS = (10, 100, 1000)


def nlist_for(vectors: int) -> int:
    return 1 << int(np.log2(4 * np.sqrt(vectors)))


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def low_rank(images: int, seed: int, chunk: int = 2000):
    """Blocks of (chunk x 30, d) patch vectors: image component + patch component, both rank 64, + noise."""
    basis = np.random.default_rng([seed, 0]).standard_normal((64, D)).astype(np.float32) / 8
    for lo in range(0, images, chunk):
        rng = np.random.default_rng([seed, 1, lo])
        n = min(chunk, images - lo)
        image = np.repeat(rng.standard_normal((n, 64)).astype(np.float32), PATCHES, axis=0)
        patch = rng.standard_normal((n * PATCHES, 64)).astype(np.float32)
        noise = rng.standard_normal((n * PATCHES, D)).astype(np.float32) * 0.02
        yield unit((image + 0.8 * patch) @ basis + noise)


def real_index(images: int, nprobe: int, seed: int) -> tuple[faiss.Index, np.ndarray]:
    nlist = nlist_for(images * PATCHES)
    index = faiss.index_factory(D, f"IVF{nlist},PQ{M}x8", faiss.METRIC_INNER_PRODUCT)
    train = np.concatenate(list(low_rank(min(images, max(2000, 64 * nlist // PATCHES + 1)), seed + 7)))
    index.train(train)
    for block in low_rank(images, seed):
        index.add(block)
    faiss.downcast_index(index).nprobe = nprobe
    sample = np.concatenate(list(low_rank(min(images, 2000), seed)))  # queries: perturbed gallery patches
    rng = np.random.default_rng([seed, 9])
    picks = sample[rng.choice(len(sample), 1000, replace=False)]
    return index, unit(picks + rng.standard_normal(picks.shape).astype(np.float32) * 0.02)


def proxy_index(images: int, nprobe: int, seed: int, clustered: bool) -> tuple[faiss.Index, np.ndarray]:
    n = images * PATCHES
    nlist = nlist_for(n)
    rng = np.random.default_rng([seed, 3, images, clustered])
    index = faiss.index_factory(D, f"IVF{nlist},PQ{M}x8", faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(index)
    faiss.downcast_index(ivf.quantizer).add(unit(rng.standard_normal((nlist, D)).astype(np.float32)))
    pq = faiss.ProductQuantizer(D, M, 8)
    pq.cp.niter = 5
    pq.train(unit(rng.standard_normal((16384, D)).astype(np.float32)))
    ivf.pq = pq
    ivf.is_trained = True
    coarse = ivf.coarse_code_size()
    per_chunk = (1 << 20) // PATCHES
    for lo in range(0, images, per_chunk):
        m = min(per_chunk, images - lo)
        if clustered:
            lists = np.repeat(rng.integers(0, nlist, m), PATCHES)
            codes = np.repeat(rng.integers(0, 256, (m, M), dtype=np.uint8), PATCHES, axis=0)
            codes[:, M - 16:] = rng.integers(0, 256, (m * PATCHES, 16), dtype=np.uint8)
        else:
            lists = rng.integers(0, nlist, m * PATCHES)
            codes = rng.integers(0, 256, (m * PATCHES, M), dtype=np.uint8)
        sa = np.empty((m * PATCHES, coarse + M), np.uint8)
        for b in range(coarse):
            sa[:, b] = (lists >> (8 * b)) & 255
        sa[:, coarse:] = codes
        ivf.add_sa_codes(sa, np.arange(lo * PATCHES, (lo + m) * PATCHES, dtype=np.int64))
    ivf.nprobe = nprobe
    return index, unit(rng.standard_normal((1000, D)).astype(np.float32))


def measure(index: faiss.Index, owners: PatchOwners, queries: np.ndarray, k: int) -> dict:
    """Per-query ms of raw FAISS (first kp patches) and of search_images, alternating; widening rate."""
    kp = min(index.ntotal, 4 * k, k * owners.most_rows)
    raw, image, widened = [], [], 0
    for i, q in enumerate(queries):
        q = q[None]
        for which in ((0, 1) if i % 2 else (1, 0)):
            started = time.perf_counter()
            if which == 0:
                _, ids = index.search(q, kp)
                raw.append(time.perf_counter() - started)
            else:
                search_images(index, q, owners, k)
                image.append(time.perf_counter() - started)
        widened += len(np.unique(owners.image_of(ids[0][ids[0] >= 0]))) < min(k, owners.n_images)
    p50 = lambda t: 1000 * float(np.median(t))  # noqa: E731
    p95 = lambda t: 1000 * float(np.percentile(t, 95))  # noqa: E731
    return {"k": k, "kp": kp, "raw_p50": p50(raw), "raw_p95": p95(raw), "image_p50": p50(image),
            "image_p95": p95(image), "ratio_p50": p50(image) / p50(raw), "widened": widened / len(queries)}


def report(name: str, images: int, index: faiss.Index, queries: np.ndarray) -> None:
    """Both forms of :class:`PatchOwners`: the table of each row's image (ids are row numbers) and by id
    (``image * 30 + slot``, a sharded bundle's ids; the proxies' ids are both)."""
    forms = {"table": PatchOwners.of(np.arange(index.ntotal, dtype=np.int64) // PATCHES),
             "by id": PatchOwners.by_id(PATCHES, images)}
    for q in queries[:5]:  # warm-up: page in the lists, allocate
        search_images(index, q[None], forms["table"], 100)
    print(f"\n{name}, {images:,} images ({index.ntotal:,} patches), IVF{faiss.downcast_index(index).nlist},"
          f"PQ{M}x8, nprobe {faiss.downcast_index(index).nprobe}")
    print("| owners | k images | kp patches | raw FAISS p50 / p95 ms | search_images p50 / p95 ms | ratio (p50) | widened |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for k in KS:
        for form, owners in forms.items():
            r = measure(index, owners, queries, k)
            print(f"| {form} | {k} | {r['kp']:,} | {r['raw_p50']:.2f} / {r['raw_p95']:.2f} | {r['image_p50']:.2f} / "
                  f"{r['image_p95']:.2f} | {r['ratio_p50']:.2f}x | {100 * r['widened']:.0f} % |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", type=int, nargs="*", default=[30000], help="image counts built for real")
    parser.add_argument("--proxy", type=int, nargs="*", default=[100000, 1000000], help="image counts, random codes")
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--nprobe", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    build_threads = faiss.omp_get_max_threads()  # builds use every core; searches one thread
    print(f"machine: {platform.processor() or platform.machine()}, {build_threads} cores seen; "
          f"FAISS {faiss.__version__}; search on 1 thread, {args.queries} single queries per k")
    for images in args.real:
        faiss.omp_set_num_threads(build_threads)
        started = time.perf_counter()
        index, queries = real_index(images, args.nprobe, args.seed)
        print(f"built real {images:,} in {time.perf_counter() - started:.0f} s", flush=True)
        faiss.omp_set_num_threads(1)
        report("real (low-rank synthetic)", images, index, queries[:args.queries])
        del index
    for images in args.proxy:
        for clustered in (False, True):
            faiss.omp_set_num_threads(build_threads)
            index, queries = proxy_index(images, args.nprobe, args.seed, clustered)
            faiss.omp_set_num_threads(1)
            report(f"proxy, {'clustered' if clustered else 'independent'} codes", images, index, queries[:args.queries])
            del index


if __name__ == "__main__":
    main()
