"""A sharded on-disk IVF-PQ index larger than a process's memory limit, searched memory-mapped.

Prints figures; not a test. The parent process trains one IVF-PQ, fills ``--shards`` shard files
independently (``patchify.index.populate_shard``, ids = global vector numbers), merges them on disk
(``patchify.index.merge_shards``: ``index.faiss`` + ``index.ivfdata``) and, as the reference, merges
the same shards in memory into an ordinary index file. Vectors are synthetic: unit vectors around
``--clusters`` random centres (like patch features, many near-duplicates), encoded for real.

A child process (one FAISS thread) then limits its data segment with ``RLIMIT_DATA`` to what it
already uses plus ``--headroom-mb`` (heap counts against that limit; read-only file mappings do
not), shows that loading the ordinary file fails under that limit, and searches the on-disk index
memory-mapped, one query at a time:

- cold: before each query the index is closed, the ``.ivfdata`` is dropped from the page cache
  (``posix_fadvise(DONTNEED)``) and the index is opened again; the search alone is timed;
- warm: the same queries again on the open index, after one pass.

It prints the sizes, the limit, the child's peak RSS (mapped file pages included) and its
anonymous memory, latency p50/p95 and the agreement of the top-k with the in-memory index.

    python benchmarks/ondisk_index.py [--vectors 16000000 --d 128 --m 32 --nlist 1024 --nprobe 16 --shards 4]
                                      [--refine SQ8 --k-factor 4]   # refine codes memory-mapped too
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from index_scale import drop_from_page_cache, status_bytes as status  # noqa: E402  (benchmarks/ is this script's folder)
from patchify import index as faiss_index  # noqa: E402


def vectors(rng: np.random.Generator, centres: np.ndarray, n: int) -> np.ndarray:
    """``n`` unit vectors around random ``centres`` (float16, to halve the parent's memory)."""
    out = np.empty((n, centres.shape[1]), np.float16)
    for lo in range(0, n, 1 << 20):
        hi = min(n, lo + (1 << 20))
        x = centres[rng.integers(len(centres), size=hi - lo)]
        x = x + 0.6 * rng.standard_normal(x.shape, dtype=np.float32) / np.sqrt(centres.shape[1])
        out[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def build(args, folder: Path) -> dict:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.clusters, args.d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spec = faiss_index.IndexSpec("ivfpq", m=args.m, nlist=args.nlist, nbits=8, nprobe=args.nprobe, refine=args.refine,
                                 k_factor=args.k_factor)
    times = {}

    started = time.perf_counter()
    index = faiss_index.create_index(spec, args.d)
    faiss_index.train_index(index, vectors(rng, centres, args.train).astype(np.float32), spec)
    faiss_index.write_index(index, folder / "trained.faiss")
    times["train"] = time.perf_counter() - started

    started = time.perf_counter()
    shards = []
    for shard in range(args.shards):  # each shard needs only the trained file, its vectors and its first id
        lo, hi = args.vectors * shard // args.shards, args.vectors * (shard + 1) // args.shards
        shards.append(folder / f"shard{shard}.faiss")
        faiss_index.populate_shard(folder / "trained.faiss", vectors(np.random.default_rng(1 + shard), centres, hi - lo),
                                   np.arange(lo, hi), shards[-1])
        print(f"  shard {shard}: {hi - lo:,} vectors, {time.perf_counter() - started:.0f} s", flush=True)
    times["populate"] = time.perf_counter() - started

    started = time.perf_counter()
    faiss_index.merge_shards(folder / "trained.faiss", shards, folder / "index.faiss", on_disk=True)
    times["merge_on_disk"] = time.perf_counter() - started

    started = time.perf_counter()
    full = faiss_index.merge_shards(folder / "trained.faiss", shards, folder / "full.faiss", on_disk=False)
    times["merge_in_memory"] = time.perf_counter() - started
    queries = vectors(np.random.default_rng(999), centres, args.queries).astype(np.float32)
    faiss_index.set_search_params(full, spec)
    dist, ids = full.search(queries, args.k)
    np.save(folder / "queries.npy", queries)
    np.save(folder / "expected_ids.npy", ids)
    np.save(folder / "expected_dist.npy", dist)
    return times


def child(folder: Path, headroom: int, nprobe: int, k: int, k_factor: float) -> None:
    """The limited process: prove the limit bites, then search memory-mapped; print one JSON line."""
    queries = np.load(folder / "queries.npy")
    expected_ids, expected_dist = np.load(folder / "expected_ids.npy"), np.load(folder / "expected_dist.npy")
    baseline = status("VmData")
    resource.setrlimit(resource.RLIMIT_DATA, (baseline + headroom, baseline + headroom))
    try:
        faiss.read_index(str(folder / "full.faiss"))  # the IVF-PQ file (refine codes, if any, lie beside it)
        full_load = "succeeded"
    except MemoryError as err:
        full_load = f"MemoryError ({err})"

    def open_index():
        index = faiss_index.read_index(folder / "index.faiss")
        faiss_index.set_nprobe(index, nprobe)
        if faiss_index.is_refined(index):
            index.k_factor = k_factor
        return index

    cold, ids, dist = [], [], []
    for q in queries:
        for name in ("index.ivfdata", "index.refine.npy"):
            if (folder / name).exists():
                drop_from_page_cache(folder / name)
        index = open_index()
        started = time.perf_counter()
        d, i = index.search(q[None], k)
        cold.append(time.perf_counter() - started)
        ids.append(i[0])
        dist.append(d[0])
        del index
    index = open_index()
    for q in queries:
        index.search(q[None], k)
    warm = []
    for q in queries:
        started = time.perf_counter()
        index.search(q[None], k)
        warm.append(time.perf_counter() - started)
    ids, dist = np.array(ids), np.array(dist)
    print(json.dumps({
        "baseline_data": baseline, "limit": baseline + headroom, "full_load": full_load,
        "cold_ms": [t * 1000 for t in cold], "warm_ms": [t * 1000 for t in warm],
        "peak_rss": status("VmHWM"), "rss_anon": status("RssAnon"), "rss_file": status("RssFile"),
        "same_ids": int((ids == expected_ids).all(axis=1).sum()), "same_top1": int((ids[:, 0] == expected_ids[:, 0]).sum()),
        "max_dist_diff": float(np.abs(dist - expected_dist).max()),
    }))


def percentiles(ms: list[float]) -> str:
    return f"p50 {np.percentile(ms, 50):7.2f} ms   p95 {np.percentile(ms, 95):7.2f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", type=int, default=16_000_000)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--m", type=int, default=32, help="PQ sub-quantizers (bytes per code); keep d / m >= 4: "
                        "FAISS trains 2-dimensional sub-quantizers some 30x slower")
    parser.add_argument("--nlist", type=int, default=1024)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--train", type=int, default=100_000, help="training vectors")
    parser.add_argument("--clusters", type=int, default=5000)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--headroom-mb", type=int, default=128)
    parser.add_argument("--refine", default="none", help="none | SQ8 | SQfp16 | Flat: refine codes beside the lists, "
                        "memory-mapped (index.refine.npy); the reference is the same shards merged in memory")
    parser.add_argument("--k-factor", type=float, default=4)
    parser.add_argument("--threads", type=int, default=0, help="FAISS threads while building (0: FAISS's default)")
    parser.add_argument("--folder", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child, args.headroom_mb << 20, args.nprobe, args.k, args.k_factor)
        return

    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    folder = args.folder or Path(tempfile.mkdtemp(prefix="ondisk_index."))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        print(f"building in {folder}", flush=True)
        times = build(args, folder)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, __file__, "--child", str(folder), "--headroom-mb", str(args.headroom_mb),
                              "--nprobe", str(args.nprobe), "--k", str(args.k), "--k-factor", str(args.k_factor)],
                             env=env, capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        mib = lambda n: f"{n / 2**20:,.0f} MiB"  # noqa: E731
        data, header = (folder / "index.ivfdata").stat().st_size, (folder / "index.faiss").stat().st_size
        print(f"\nmachine: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores; "
              f"FAISS {faiss.__version__}")
        print(f"index: IVF{args.nlist},PQ{args.m}x8, d={args.d}, {args.vectors:,} vectors in {args.shards} shards; "
              f"index.faiss {header / 1024:,.0f} KiB, index.ivfdata {mib(data)} ({data / args.vectors:.0f} bytes per vector)")
        print(f"build: train {times['train']:.0f} s ({args.train:,} vectors), populate {times['populate']:.0f} s, "
              f"merge on disk {times['merge_on_disk']:.1f} s (in memory, for the reference: {times['merge_in_memory']:.1f} s)")
        print(f"limit: RLIMIT_DATA {mib(r['limit'])} = {mib(r['baseline_data'])} data segment at start "
              f"+ {args.headroom_mb} MiB headroom; loading the ordinary index file: {r['full_load']}")
        print(f"search: {args.queries} single queries, k={args.k}, nprobe={args.nprobe} of {args.nlist}, one thread")
        print(f"  cold  {percentiles(r['cold_ms'])}")
        print(f"  warm  {percentiles(r['warm_ms'])}")
        print(f"  peak RSS {mib(r['peak_rss'])} (at the end: {mib(r['rss_anon'])} anonymous, "
              f"{mib(r['rss_file'])} file pages incl. mapped lists)")
        print(f"agreement with the in-memory index: identical top-{args.k} ids for {r['same_ids']}/{args.queries} "
              f"queries, same top-1 for {r['same_top1']}/{args.queries}, max |distance difference| "
              f"{r['max_dist_diff']:.2e}")
    finally:
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
