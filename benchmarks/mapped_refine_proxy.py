"""Image-level search with on-disk refinement at 1M images, on an index of the real shape (prints figures).

A real 1M-image build (30M patch vectors) is over an hour of both cores here; the latency of a search
depends on the shape, not the content. As ``index_scale.py scan`` (latency within 9 % of a real build at
1M), the IVF-PQ holds random codes (``add_sa_codes``, independent per patch, balanced lists: see
benchmarks/image_search_overhead.py), and the refine codes are a real ``<name>.refine.npy`` file of
random SQ8 rows (30M x 384 bytes, 11.5 GB) written to ``--workdir`` beside the index file, opened by the
project's ``read_refine`` (memory-mapped, ``MADV_RANDOM``) and re-scored by its ``MappedRefine``, exactly as
a merged on-disk refined index is searched (its IVF lists here in RAM).
Recall means nothing here; the real-data accuracy is in docs/RESULTS.md and the 100k real build's recall
in docs/BENCHMARKS.md.

Reported, one search thread, single queries: image-level p50 / p95 ms through ``search_images`` for
k = 10 and 100 images, warm (the shortlist's pages cached: every query searched once before) and cold
(each query's pages evicted first with ``posix_fadvise(POSIX_FADV_DONTNEED)`` on the codes file, no root
needed; a fresh map per query, as mapped pages are not evicted); and the bytes per image a serving
process holds in RAM: the PQ index's file and the table of each row's image (``PatchOwners``); the refine
codes are page cache, which the kernel may evict.

    python benchmarks/mapped_refine_proxy.py --images 1000000 --workdir /tmp --queries 100
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from image_search_overhead import D, PATCHES, proxy_index, unit  # noqa: E402
from index_scale import drop_from_page_cache  # noqa: E402

from patchify.index import read_refine  # noqa: E402
from patchify.search import PatchOwners, search_images  # noqa: E402


def write_codes(path: Path, rows: int, seed: int) -> None:
    codes = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(rows, D))
    rng = np.random.default_rng([seed, 5])
    for lo in range(0, rows, 1 << 20):
        hi = min(rows, lo + (1 << 20))
        codes[lo:hi] = rng.integers(0, 256, (hi - lo, D), dtype=np.uint8)
    codes.flush()
    del codes


def timed(search, queries: np.ndarray) -> list[float]:
    out = []
    for q in queries:
        started = time.perf_counter()
        search(q[None])
        out.append(1000 * (time.perf_counter() - started))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--cold-queries", type=int, default=20)
    parser.add_argument("--nprobe", type=int, nargs="*", default=[64, 128])
    parser.add_argument("--k-factor", type=float, nargs="*", default=[4, 16])
    parser.add_argument("--workdir", default=tempfile.gettempdir())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    index, queries = proxy_index(args.images, args.nprobe[0], args.seed, clustered=False)
    work = Path(tempfile.mkdtemp(prefix="mapped_refine_", dir=args.workdir))
    index_path = work / "index.faiss"
    faiss.write_index(index, str(index_path))  # what a serving process loads into RAM
    pq_bytes = index_path.stat().st_size
    codes_path = work / "index.refine.npy"  # beside it, as the merge of a refined sharded index leaves it
    started = time.perf_counter()
    write_codes(codes_path, index.ntotal, args.seed)
    print(f"{args.images:,} images ({index.ntotal:,} patches): wrote {codes_path.stat().st_size / 1e9:.1f} GB of "
          f"SQ8 codes in {time.perf_counter() - started:.0f} s; the PQ index (in RAM when served) "
          f"{pq_bytes / args.images:,.0f} B per image", flush=True)
    sq = faiss.IndexScalarQuantizer(D, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
    sq.train(unit(np.random.default_rng([args.seed, 6]).standard_normal((65536, D)).astype(np.float32)))
    faiss.write_index(sq, str(work / "index.refine.faiss"))
    owners = PatchOwners.of(np.arange(index.ntotal, dtype=np.int64) // PATCHES)
    owners_bytes = owners.image.nbytes
    faiss.omp_set_num_threads(1)
    queries = queries[:args.queries]
    print(f"PatchOwners (image of every row, int64): {owners_bytes / args.images:,.0f} B per image")
    print("| nprobe | k_factor | k images | warm p50 / p95 ms | cold p50 / p95 ms |")
    print("|---:|---:|---:|---:|---:|")
    for nprobe in args.nprobe:
        faiss.downcast_index(index).nprobe = nprobe
        for k_factor in args.k_factor:
            def searcher(k: int):
                refined = read_refine(index_path, index)  # the project's reader: codes mapped, MADV_RANDOM
                refined.k_factor = k_factor
                return lambda q: search_images(refined, q, owners, k)

            for k in (10, 100):
                cold = []
                for q in queries[:args.cold_queries]:  # a fresh map each time: mapped pages are not evicted
                    drop_from_page_cache(codes_path)
                    cold += timed(searcher(k), q[None])
                search = searcher(k)
                timed(search, queries)  # warm-up: every query's pages cached
                warm = timed(search, queries)
                p = lambda t, q: np.percentile(t, q)  # noqa: E731
                print(f"| {nprobe} | {k_factor:g} | {k} | {p(warm, 50):.2f} / {p(warm, 95):.2f} | "
                      f"{p(cold, 50):.1f} / {p(cold, 95):.1f} |", flush=True)
                del search  # its map would keep the pages resident through the next cold queries
    for path in (codes_path, index_path, work / "index.refine.faiss"):
        path.unlink()
    work.rmdir()


if __name__ == "__main__":
    main()
