"""IVF-PQ at scale: memory, build time, latency and patch recall for 10k to 1M images (prints figures, not a test).

Every gallery image is an L3 pyramid, 30 patch vectors of d = 384 (packaged DINOv2
ViT-S/14). The galleries are synthetic, shaped like the real features:

- ``fit`` reads the cached real patch features (L0..L3, crop mode; nothing is extracted,
  a missing cache is an error) and fits a Gaussian: mean and full 384 x 384 covariance
  (``--components K`` > 1: a mixture, k-means centroids of the real patches as means
  and one pooled within-cluster covariance). It writes mean, covariance factor and the
  real query descriptors to a small ``.npz``, and prints whether a synthetic set of the
  real set's size resembles it: top eigenvalues, random-pair cosine, cosine to the
  nearest neighbour (mean / p50 / p99), and the real queries' top-1 / top-100 cosine
  against either set, and the recall@100 of an exhaustive IVF-PQ trained on either set.
  A Gaussian has no near-duplicates and no cluster structure beyond its covariance: its
  nearest neighbours are farther than real ones, a harder case for PQ than real data
  (on the mini-ILIAS features: recall@100 0.68 synthetic vs 0.76 real).
- ``run`` samples ``z ~ N(0, I)``, ``x = mean + F z`` (``F F^T`` = covariance), then
  L2-normalises, in blocks of 65,536 vectors, block ``b`` drawn from its own seed
  ``SeedSequence([seed, 1, b])``: deterministic, nested (the 10k gallery is the start of
  the 100k one), and generated chunk by chunk, so 30M vectors are never in memory at
  once. Patches are i.i.d.; an image is 30 consecutive vectors (this only matters for
  bytes per image). Queries: ``--queries`` held-out samples (``SeedSequence([seed, 0])``)
  plus the real query descriptors (reported apart).

Per gallery size (``--images``):

- exact ground truth, patch-level top-100 by inner product, streamed over the chunks
  (``faiss.knn`` per chunk, merged in a ``faiss.ResultHeap``);
- ``Flat`` (where ``--flat-max-images`` allows), ``IVF{nlist},PQ64x8`` (IP, by residual,
  no polysemous training) with nlist = the largest power of two <= 4 sqrt(vectors),
  trained on the first min(vectors, 64 nlist) vectors (the product quantizer itself
  subsamples 65,536 residuals, FAISS's 256 per centroid), and refine stages on top of
  that same IVF-PQ: ``RFlat`` (the float vectors, where Flat is built) and
  ``Refine(SQ8)`` (8-bit scalar quantizer, trained on the same sample), where
  ``--refine-max-images`` allows. A refine search re-scores ``k_factor * 100``
  candidates of the IVF-PQ (``IndexRefineSearchParameters``).
  ``--gpu-from N``: from N images on, the coarse k-means (spherical, 10 iterations, as
  FAISS's IVF) and the encoding of every vector (nearest list, PQ code of its residual)
  run on the GPU through PyTorch; FAISS trains the PQ on the CPU and takes the codes with
  ``add_sa_codes``: the same index, built faster (its build seconds are not CPU figures);
  the exact ground truth of those sizes is computed on the GPU too (fp32, no TF32);
- figures: build seconds (train, add), bytes per image on disk (written file / images)
  and in memory (RSS growth of a fresh process around ``read_index``; also the RSS growth
  of the building process during its adds, which includes the slack of growing
  ``std::vector`` lists), single-query latency p50 / p95 (one query per call, one thread),
  batched latency per query (100 queries per call, ``--threads`` threads), patch recall@100
  against exact search and against the same index searched exhaustively (nprobe = nlist),
  over nprobe = 1, 2, 4, ..., nlist, and the smallest nprobe whose recall@100 against
  exact search reaches 95 % of the exhaustive index's.

``scan`` (see :func:`cmd_scan`) builds indices of the real shape from random codes, for
sizes whose real build is out of reach: disk, memory and latency per nprobe, no recall.

Results go to ``<out>/results.jsonl`` and ``<out>/scan.jsonl`` (one line per size);
``report`` prints the tables, the growth curve and a power-law fit of latency against
size from results files::

    python benchmarks/index_scale.py fit [--out .bench/feature_stats.npz] [--components K] [Hydra overrides ...]
    python benchmarks/index_scale.py run --stats .bench/feature_stats.npz --images 10000 100000 [--out DIR]
    python benchmarks/index_scale.py scan --images 10000 100000 300000 1000000 [--out DIR]
    python benchmarks/index_scale.py report DIR/results.jsonl [...]
    python benchmarks/index_scale.py refine --images 30000 [--nprobe 128 --k-factor 16 --out DIR]

``refine`` (:func:`cmd_refine`): PQ alone, FAISS's in-RAM refine and patchify's on-disk refine
(SQ8 codes memory-mapped beside on-disk lists) on one gallery built through the project's sharded
path: recall@100, bytes per image on disk and in RAM, single-query latency warm and cold.

``run``, ``scan`` and ``report`` need only numpy and faiss (and PyTorch with a GPU for
``--gpu-from``); ``fit`` needs the project (Hydra, ``patchify``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faiss
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
D = 384                  # packaged DINOv2 ViT-S/14
PATCHES = 30             # L0..L3: 1 + 4 + 9 + 16 cells per image
K = 100                  # patch-level recall@K
PQ_M, PQ_NBITS = 64, 8   # 64 one-byte codes per patch
BLOCK = 1 << 16          # vectors per generation block (one seed each)
TRAIN_PER_LIST = 64      # coarse training sample: at most 64 vectors per list
BATCH = 100              # queries per call in the batched timing
DEFAULT_OVERRIDES = [
    "dataset.root=ilias/mini_60x4_120", "dataset.generate.instances=60",
    "dataset.generate.positives_per_instance=4", "dataset.generate.distractors=120",
    "paths.features=features/table_mini/dinov2_s_packaged", "pyramid.level=3",
]


# ----------------------------------------------------------------------------- small helpers

def nlist_for(n_vectors: int) -> int:
    """Largest power of two <= 4 sqrt(n_vectors) (at least 1)."""
    return 1 << max(0, int(np.floor(np.log2(4 * np.sqrt(n_vectors)))))


def train_size(n_vectors: int, nlist: int) -> int:
    return min(n_vectors, TRAIN_PER_LIST * nlist)


def rss_bytes() -> int:
    """Resident set size of this process (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cpu": model, "cores": len(os.sched_getaffinity(0)), "mem_gib": round(mem / 2**30, 1),
            "faiss": faiss.__version__, "numpy": np.__version__, "simd": faiss.get_compile_options().strip()}


def percentile_ms(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q)) if values else float("nan")


def recall_at(found: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per query: |found top-K  &  truth top-K| / K."""
    k = truth.shape[1]
    return np.array([len(np.intersect1d(f[:k], t, assume_unique=False)) / k for f, t in zip(found, truth)])


# ----------------------------------------------------------------------------- synthetic features

class Synthetic:
    """Deterministic blocks of synthetic patch vectors from a fitted feature model."""

    def __init__(self, stats_path: Path, seed: int = 0, threads: int = 1):
        stats = np.load(stats_path)
        self.means = stats["means"].astype(np.float32)             # (C, d)
        self.weights = stats["weights"].astype(np.float64)         # (C,)
        self.factor_t = np.ascontiguousarray(stats["factor"].T.astype(np.float32))  # F^T, (d, d)
        self.real_queries = stats["real_queries"].astype(np.float32)
        self.info = json.loads(str(stats["info"]))
        self.seed, self.threads = seed, threads
        self.dim = self.means.shape[1]

    def _normals(self, seq: np.random.SeedSequence, n: int, z: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng(seq)
        rng.standard_normal(out=z[:n], dtype=np.float32)
        if len(self.weights) == 1:
            return np.zeros(n, np.int64)
        return rng.choice(len(self.weights), size=n, p=self.weights)

    def _finish(self, y: np.ndarray, comp: np.ndarray) -> None:
        y += self.means[comp] if len(self.weights) > 1 else self.means[0]
        y /= np.linalg.norm(y, axis=1, keepdims=True)

    def chunk(self, first_block: int, n_blocks: int, n: int) -> np.ndarray:
        """Vectors ``first_block * BLOCK ...``: ``n`` rows (<= n_blocks * BLOCK) as float32 (n, d)."""
        z = np.empty((n_blocks * BLOCK, self.dim), np.float32)
        sizes = [min(BLOCK, n - i * BLOCK) for i in range(n_blocks)]
        with ThreadPoolExecutor(self.threads) as pool:   # numpy's generators release the GIL
            comps = list(pool.map(lambda i: self._normals(np.random.SeedSequence([self.seed, 1, first_block + i]),
                                                          BLOCK, z[i * BLOCK:(i + 1) * BLOCK]), range(n_blocks)))
        y = np.empty((n, self.dim), np.float32)
        np.matmul(z[:n], self.factor_t, out=y)            # one multithreaded BLAS call
        del z
        with ThreadPoolExecutor(self.threads) as pool:
            list(pool.map(lambda i: self._finish(y[i * BLOCK:i * BLOCK + sizes[i]], comps[i][:sizes[i]]),
                          range(n_blocks)))
        return y

    def chunks(self, n_vectors: int, chunk_blocks: int):
        """(start row, vectors) over the first ``n_vectors`` rows of the stream."""
        total_blocks = -(-n_vectors // BLOCK)
        for b in range(0, total_blocks, chunk_blocks):
            nb = min(chunk_blocks, total_blocks - b)
            start = b * BLOCK
            yield start, self.chunk(b, nb, min(nb * BLOCK, n_vectors - start))

    def chunks_timed(self, n_vectors: int, chunk_blocks: int, seconds: dict):
        """:meth:`chunks`, adding the generation time to ``seconds["generate"]``."""
        it = self.chunks(n_vectors, chunk_blocks)
        while True:
            t0 = time.perf_counter()
            item = next(it, None)
            seconds["generate"] += time.perf_counter() - t0
            if item is None:
                return
            yield item

    def head(self, n: int, chunk_blocks: int) -> np.ndarray:
        """The first ``n`` rows of the stream (the training sample)."""
        return np.concatenate([x for _, x in self.chunks(n, chunk_blocks)]) if n else np.zeros((0, self.dim), np.float32)

    def queries(self, n: int) -> np.ndarray:
        z = np.empty((n, self.dim), np.float32)
        comp = self._normals(np.random.SeedSequence([self.seed, 0]), n, z)
        y = z @ self.factor_t
        self._finish(y, comp)
        return y


# ----------------------------------------------------------------------------- fit (needs the project)

def load_real(overrides: list[str]):
    """Real gallery patch features (L0..L3) and query descriptors, from the cache only."""
    sys.path.insert(0, str(ROOT / "src"))
    from hydra import compose, initialize_config_dir

    from patchify.extraction import PatchFeatures
    from patchify.data import load_dataset
    from patchify.features import make_feature_source
    from patchify.pyramid import levels_for

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    dataset = load_dataset(cfg.dataset)
    source = make_feature_source(cfg)
    parts = []
    for level in levels_for(int(cfg.pyramid.level), cfg.pyramid.multi_scale):
        store = source.store(source.model, level)
        if missing := store.missing(dataset.gallery):
            sys.exit(f"{store.folder}: {len(missing)} gallery images not cached at L{level}; run the pipeline first "
                     f"(this script extracts nothing)")
        parts.append(store.gather(dataset.gallery, expected_dim=source.model.dim)[0])
    store = source.store(source.query_model, 0)
    if missing := store.missing(dataset.queries):
        sys.exit(f"{store.folder}: {len(missing)} queries not cached; run the pipeline first")
    gallery = PatchFeatures.concat(parts)
    queries = store.gather(dataset.queries, expected_dim=source.query_model.dim)[0]
    return cfg, gallery, queries.vectors


def similarity_check(name: str, x: np.ndarray, queries: np.ndarray, image: np.ndarray | None = None) -> dict:
    """Spectrum and cosine statistics of a set of unit vectors."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, ids = index.search(x, 64)
    self_free = ids != np.arange(len(x))[:, None]
    nn = np.array([s[m][0] for s, m in zip(sims, self_free)])
    pairs = np.random.default_rng(1).integers(0, len(x), (50_000, 2))
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    cos = (x[pairs[:, 0]] * x[pairs[:, 1]]).sum(1)
    eig = np.linalg.eigvalsh(np.cov(x.astype(np.float64), rowvar=False))[::-1]
    q_sims, _ = index.search(np.ascontiguousarray(queries, dtype=np.float32), K)
    out = {"n": len(x), "top_eigenvalues": [round(float(e), 5) for e in eig[:6]],
           "variance_in_top_50": round(float(eig[:50].sum() / eig.sum()), 3),
           "norm_of_mean": round(float(np.linalg.norm(x.mean(0))), 3),
           "random_pair_cos_mean": round(float(cos.mean()), 3), "random_pair_cos_sd": round(float(cos.std()), 3),
           "nn_cos_mean": round(float(nn.mean()), 3), "nn_cos_p50": round(float(np.median(nn)), 3),
           "nn_cos_p99": round(float(np.percentile(nn, 99)), 3),
           "real_query_top1_cos": round(float(q_sims[:, 0].mean()), 3),
           "real_query_top100_cos": round(float(q_sims[:, -1].mean()), 3)}
    if image is not None:  # nearest neighbour from another image (the pyramid's own cells overlap)
        other = [s[image[i] != image[i_]][0] for s, i_, i in zip(sims, ids, range(len(x))) if (image[i_] != image[i]).any()]
        out["nn_other_image_cos_mean"] = round(float(np.mean(other)), 3)
        out["nn_other_image_cos_p99"] = round(float(np.percentile(other, 99)), 3)
    print(f"  {name:<10} " + ", ".join(f"{k} {v}" for k, v in out.items()))
    return out


def pq_recall(name: str, x: np.ndarray, queries: np.ndarray) -> dict:
    """Recall@100 of an exhaustively searched IVF-PQ (nlist by the rule) trained on ``x`` itself."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    nlist = nlist_for(len(x))
    index = faiss.index_factory(D, f"IVF{nlist},PQ{PQ_M}x{PQ_NBITS}", faiss.METRIC_INNER_PRODUCT)
    faiss.downcast_index(index).do_polysemous_training = False
    index.train(x)
    index.add(x)
    _, truth = faiss.knn(queries, x, K, metric=faiss.METRIC_INNER_PRODUCT)
    _, found = index.search(queries, K, params=faiss.SearchParametersIVF(nprobe=nlist))
    r = float(recall_at(found, truth).mean())
    print(f"  {name:<10} exhaustive IVF{nlist},PQ{PQ_M}x{PQ_NBITS} recall@100 against exact: {r:.3f}")
    return {"ivfpq_exhaustive_recall_at_100": round(r, 3)}


def cmd_fit(args: argparse.Namespace, overrides: list[str]) -> None:
    cfg, gallery, real_queries = load_real(DEFAULT_OVERRIDES + overrides)
    x = gallery.vectors.astype(np.float64)
    n, d = x.shape
    if args.components == 1:
        means, weights = x.mean(0, keepdims=True), np.ones(1)
        residual = x - means
    else:
        kmeans = faiss.Kmeans(d, args.components, niter=20, seed=1)
        kmeans.train(x.astype(np.float32))
        _, assign = kmeans.index.search(x.astype(np.float32), 1)
        assign = assign[:, 0]
        means = kmeans.centroids.astype(np.float64)
        weights = np.bincount(assign, minlength=args.components) / n
        residual = x - means[assign]
    cov = residual.T @ residual / (n - len(weights))
    eigval, eigvec = np.linalg.eigh(cov)
    factor = eigvec * np.sqrt(np.clip(eigval, 0, None))      # F F^T = cov
    info = {"source": f"{cfg.dataset.root} {cfg.model.name} crop L0..L{cfg.pyramid.level}", "n_real": n, "dim": d,
            "components": args.components}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, means=means.astype(np.float32), weights=weights, factor=factor.astype(np.float32),
             real_queries=real_queries.astype(np.float32), info=json.dumps(info))
    print(f"fitted {args.components}-component Gaussian on {n:,} real patch vectors ({info['source']}) -> {out} "
          f"({out.stat().st_size / 2**20:.1f} MiB)")
    synthetic = Synthetic(out, seed=args.seed, threads=2).chunk(0, -(-n // BLOCK), n)
    print(f"check at the real set's size ({n:,} vectors; queries: the {len(real_queries)} real query descriptors):")
    checks = {"real": similarity_check("real", gallery.vectors, real_queries, gallery.image),
              "synthetic": similarity_check("synthetic", synthetic, real_queries)}
    print("what PQ loses at this size (queries: the real query descriptors):")
    checks["real"].update(pq_recall("real", gallery.vectors, real_queries))
    checks["synthetic"].update(pq_recall("synthetic", synthetic, real_queries))
    (out.parent / (out.stem + ".check.json")).write_text(json.dumps({**info, **checks}, indent=1))


# ----------------------------------------------------------------------------- GPU coarse stage (optional)

def torch_device() -> str:
    """``cuda``; ``INDEX_SCALE_TORCH_DEVICE=cpu`` runs the GPU code path on the CPU (to test it)."""
    return os.environ.get("INDEX_SCALE_TORCH_DEVICE", "cuda")


def gpu_kmeans(x: np.ndarray, k: int, niter: int = 10, seed: int = 1234) -> np.ndarray:
    """Spherical k-means for inner product (as FAISS's IVF coarse training): init from a
    seeded sample, empty lists re-seeded from random points, fp32 (no TF32) on the GPU."""
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch_device()
    g = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(x).to(dev)
    cent = xt[torch.randperm(len(x), generator=g)[:k].to(dev)].clone()
    for _ in range(niter):
        assign = torch.cat([(xt[i:i + 65536] @ cent.T).argmax(1) for i in range(0, len(xt), 65536)])
        sums = torch.zeros_like(cent).index_add_(0, assign, xt)
        counts = torch.bincount(assign, minlength=k)
        empty = counts == 0
        if empty.any():
            sums[empty] = xt[torch.randint(0, len(x), (int(empty.sum()),), generator=g).to(dev)]
        cent = torch.nn.functional.normalize(sums, dim=1)
    return cent.cpu().numpy()


def gpu_topk(queries, x) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-K inner products of ``queries`` (torch, on the GPU) over the rows of ``x`` (torch)."""
    sims, ids = (queries @ x.T).topk(K, dim=1)
    return sims.cpu().numpy(), ids.cpu().numpy()


def gpu_encode(x, centroids, pq_centroids, coarse_size: int) -> np.ndarray:
    """IVF-PQ codes as ``IndexIVF.add_sa_codes`` takes them: the list number (little-endian,
    ``coarse_size`` bytes) then the PQ code of the residual ``x - centroid`` (nearest
    sub-centroid by L2 in each sub-space), computed in fp32 on the GPU (``x``: torch)."""
    import torch
    m, ksub, dsub = pq_centroids.shape
    sq = (pq_centroids ** 2).sum(-1)                                     # (m, ksub)
    out = np.empty((len(x), coarse_size + m), np.uint8)
    for i in range(0, len(x), 16384):
        xt = x[i:i + 16384]
        lists = (xt @ centroids.T).argmax(1)
        sub = (xt - centroids[lists]).view(len(xt), m, dsub)
        dist = sq[None] - 2 * torch.einsum("nmd,mkd->nmk", sub, pq_centroids)
        codes = dist.argmin(-1).to(torch.uint8)
        listno = torch.stack([(lists >> (8 * b)) & 255 for b in range(coarse_size)], 1).to(torch.uint8)
        out[i:i + len(xt)] = torch.cat([listno, codes], 1).cpu().numpy()
    return out


# ----------------------------------------------------------------------------- measuring

def read_rss(path: Path) -> int:
    """RSS growth of a fresh process around ``faiss.read_index(path)``."""
    out = subprocess.run([sys.executable, __file__, "rss", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def cmd_rss(args: argparse.Namespace) -> None:
    before = rss_bytes()
    index = faiss.read_index(args.path)
    print(index.ntotal, rss_bytes() - before)


def ivf_payload(index: faiss.Index) -> int:
    """Bytes FAISS must hold for an IVF index: codes + ids per entry, centroids, PQ tables."""
    ivf = faiss.extract_index_ivf(index)
    sizes = [ivf.invlists.list_size(i) for i in range(ivf.nlist)]
    pq = faiss.downcast_index(ivf).pq
    return sum(sizes) * (ivf.code_size + 8) + ivf.nlist * ivf.d * 4 + pq.M * pq.ksub * pq.dsub * 4


def time_single(search, queries: np.ndarray, budget_s: float, max_queries: int) -> list[float]:
    """Per-call seconds of one-query searches, one thread, until ``budget_s`` or ``max_queries``."""
    faiss.omp_set_num_threads(1)
    search(queries[:1])  # warm-up
    times, started = [], time.perf_counter()
    for q in queries[:max_queries]:
        t0 = time.perf_counter()
        search(q[None])
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - started > budget_s and len(times) >= 10:
            break
    return times


def time_batched(search, queries: np.ndarray, threads: int) -> tuple[np.ndarray, float]:
    """Ids of all queries, searched ``BATCH`` per call on ``threads`` threads; seconds per query."""
    faiss.omp_set_num_threads(threads)
    ids, started = [], time.perf_counter()
    for i in range(0, len(queries), BATCH):
        ids.append(search(queries[i:i + BATCH]))
    return np.concatenate(ids), (time.perf_counter() - started) / len(queries)


class Bench:
    def __init__(self, args: argparse.Namespace, queries: np.ndarray, n_synthetic: int):
        self.args, self.queries, self.n_syn = args, queries, n_synthetic

    def measure(self, name: str, search, gt: np.ndarray, reference: np.ndarray | None = None,
                single: bool = True) -> dict:
        """Recall (synthetic and real queries apart), batched and single-query latency."""
        ids, per_query = time_batched(search, self.queries, self.args.threads)
        r = recall_at(ids, gt)
        row = {"index": name, "recall": float(r[:self.n_syn].mean()), "recall_real_queries": float(r[self.n_syn:].mean()),
               "batched_ms_per_query": per_query * 1000}
        if reference is not None:
            row["recall_vs_exhaustive"] = float(recall_at(ids, reference)[:self.n_syn].mean())
        if single:
            times = time_single(search, self.queries[:self.n_syn], self.args.single_budget_s, self.args.single_queries)
            row.update(single_p50_ms=percentile_ms(times, 50), single_p95_ms=percentile_ms(times, 95), single_n=len(times))
        row["ids"] = ids
        return row


def print_row(row: dict) -> None:
    parts = [f"{row['index']:<34}", f"recall@100 {row['recall']:.3f} (real q {row['recall_real_queries']:.3f})"]
    if "recall_vs_exhaustive" in row:
        parts.append(f"vs exhaustive {row['recall_vs_exhaustive']:.3f}")
    if "single_p50_ms" in row:
        parts.append(f"single p50 {row['single_p50_ms']:8.2f} ms p95 {row['single_p95_ms']:8.2f} ms (n={row['single_n']})")
    parts.append(f"batched {row['batched_ms_per_query']:8.3f} ms/q")
    print("  " + "  ".join(parts), flush=True)


# ----------------------------------------------------------------------------- one gallery size

def run_size(args: argparse.Namespace, gen: Synthetic, images: int, queries: np.ndarray, n_syn: int) -> dict:
    n = images * PATCHES
    nlist = nlist_for(n)
    n_train = train_size(n, nlist)
    use_flat = images <= args.flat_max_images
    use_refine = images <= args.refine_max_images
    use_gpu = bool(args.gpu_from and images >= args.gpu_from)
    factory = f"IVF{nlist},PQ{PQ_M}x{PQ_NBITS}"
    work = Path(tempfile.mkdtemp(prefix=f"index_scale_{images}_", dir=args.workdir))
    result = {"images": images, "vectors": n, "nlist": nlist, "n_train": n_train, "factory": factory,
              "build_on": "coarse k-means and encoding on GPU (torch)" if use_gpu else "cpu (faiss)", "machine": machine(), "threads": args.threads,
              "queries_synthetic": n_syn, "queries_real": len(queries) - n_syn, "indices": {}}
    print(f"\n=== {images:,} images x {PATCHES} = {n:,} vectors: {factory}, train on {n_train:,}, "
          f"flat {use_flat}, refine {use_refine}, build on {result['build_on']}", flush=True)
    faiss.omp_set_num_threads(args.threads)
    t = {"generate": 0.0, "gt": 0.0}

    # --- train (the sample is the head of the stream: i.i.d., so as good as a random one)
    t0 = time.perf_counter()
    train = gen.head(n_train, args.chunk_blocks)
    t["generate"] += time.perf_counter() - t0
    ivfpq = faiss.index_factory(D, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(ivfpq)
    ivf.do_polysemous_training = False
    ivf.cp.seed = ivf.pq.cp.seed = 1234
    t0 = time.perf_counter()
    centroids_gpu = None
    if use_gpu:
        import torch
        centroids = gpu_kmeans(train, nlist)
        faiss.downcast_index(ivf.quantizer).add(centroids)   # trained quantizer: train() then skips k-means
        ivfpq.train(train[:2 * 65536])                       # PQ on residuals (FAISS subsamples 65,536)
        centroids_gpu = torch.from_numpy(centroids).to(torch_device())
        queries_gpu = torch.from_numpy(queries).to(torch_device())
        pq_gpu = torch.from_numpy(faiss.vector_to_array(ivf.pq.centroids).reshape(PQ_M, ivf.pq.ksub, ivf.pq.dsub)).to(torch_device())
    else:
        ivfpq.train(train)
    t_train = time.perf_counter() - t0
    sq8 = None
    if use_refine:
        sq8 = faiss.IndexScalarQuantizer(D, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        t0 = time.perf_counter()
        sq8.train(train)
        t_train_sq8 = time.perf_counter() - t0
    del train
    flat = faiss.IndexFlatIP(D) if use_flat else None

    # --- one pass over the stream: ground truth and every index
    heap = faiss.ResultHeap(len(queries), K, keep_max=True)
    add_s = {"flat": 0.0, "ivfpq": 0.0, "sq8": 0.0, "encode_gpu": 0.0}
    add_rss = {"flat": 0, "ivfpq": 0, "sq8": 0}
    started = time.perf_counter()
    for start, x in gen.chunks_timed(n, args.chunk_blocks, t):
        t0 = time.perf_counter()
        if use_gpu:  # exact fp32 on the GPU; the chunk goes over once for ground truth and encoding
            x_gpu = torch.from_numpy(x).to(torch_device())
            sims, ids = gpu_topk(queries_gpu, x_gpu)
        else:
            sims, ids = faiss.knn(queries, x, K, metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(sims, ids + start)
        t["gt"] += time.perf_counter() - t0
        for name, index in (("flat", flat), ("ivfpq", ivfpq), ("sq8", sq8)):
            if index is None:
                continue
            t0 = time.perf_counter()
            if name == "ivfpq" and use_gpu:
                codes = gpu_encode(x_gpu, centroids_gpu, pq_gpu, ivf.coarse_code_size())
                add_s["encode_gpu"] += time.perf_counter() - t0
                r0 = rss_bytes()
                ivf.add_sa_codes(codes, np.arange(start, start + len(x), dtype=np.int64))
                del codes
            else:
                r0 = rss_bytes()
                index.add(x)
            add_rss[name] += rss_bytes() - r0
            add_s[name] += time.perf_counter() - t0
        done = start + len(x)
        x_gpu = None
        if done == n or (done // BLOCK) % (8 * args.chunk_blocks) == 0:
            print(f"  streamed {done:,}/{n:,} vectors in {time.perf_counter() - started:.0f} s "
                  f"(generate {t['generate']:.0f} s, ground truth {t['gt']:.0f} s, adds "
                  + ", ".join(f"{k} {v:.0f} s" for k, v in add_s.items() if v) + ")", flush=True)
    heap.finalize()
    gt = heap.I
    result["generate_s"] = t["generate"]
    result["exact_gt_s"] = t["gt"]
    result["exact_gt_batched_ms_per_query"] = t["gt"] / len(queries) * 1000
    bench = Bench(args, queries, n_syn)

    def sizes(name: str, index: faiss.Index, build: dict) -> dict:
        path = work / f"{name}.faiss"
        faiss.write_index(index, str(path))
        entry = {**build, "file_bytes_per_image": path.stat().st_size / images,
                 "read_rss_bytes_per_image": read_rss(path) / images,
                 "build_rss_bytes_per_image": add_rss.get(name.split("_")[0], 0) / images}
        path.unlink()
        return entry

    # --- Flat
    if flat is not None:
        entry = sizes("flat", flat, {"factory": "Flat", "train_s": 0.0, "add_s": add_s["flat"]})
        row = bench.measure("Flat", lambda q: flat.search(q, K)[1], gt, single=True)
        if row["recall"] < 0.999:
            print(f"  WARNING: Flat recall {row['recall']:.4f} against the streamed ground truth")
        row.pop("ids")
        entry["search"] = [row]
        print_row(row)
        result["indices"]["flat"] = entry

    # --- IVF-PQ: nprobe sweep
    entry = sizes("ivfpq", ivfpq, {"factory": factory, "train_s": t_train, "add_s": add_s["ivfpq"],
                                   "encode_gpu_s": add_s["encode_gpu"]})
    entry["payload_bytes_per_image"] = ivf_payload(ivfpq) / images
    list_sizes = np.array([ivf.invlists.list_size(i) for i in range(nlist)])
    entry["list_size_min_mean_max"] = [int(list_sizes.min()), float(list_sizes.mean()), int(list_sizes.max())]
    print(f"  {factory}: train {t_train:.1f} s, add {add_s['ivfpq']:.1f} s; bytes/image file "
          f"{entry['file_bytes_per_image']:,.0f}, read RSS {entry['read_rss_bytes_per_image']:,.0f}, payload "
          f"{entry['payload_bytes_per_image']:,.0f}, build RSS {entry['build_rss_bytes_per_image']:,.0f}; "
          f"list sizes min/mean/max {entry['list_size_min_mean_max']}", flush=True)
    params = {}

    def ivf_search(nprobe: int):
        params[nprobe] = faiss.SearchParametersIVF(nprobe=nprobe)
        return lambda q: ivfpq.search(q, K, params=params[nprobe])[1]

    exhaustive = bench.measure(f"{factory} nprobe {nlist}", ivf_search(nlist), gt,
                               single=nlist <= args.single_max_nprobe)
    ref = exhaustive["ids"]
    sweep = []
    nprobe = 1
    while nprobe <= nlist:
        row = exhaustive if nprobe == nlist else bench.measure(
            f"{factory} nprobe {nprobe}", ivf_search(nprobe), gt, ref, single=nprobe <= args.single_max_nprobe)
        row["nprobe"] = nprobe
        row["recall_vs_exhaustive"] = float(recall_at(row["ids"], ref)[:n_syn].mean())
        print_row(row)
        sweep.append(row)
        nprobe *= 2
    for row in sweep:
        row.pop("ids", None)
    target = 0.95 * exhaustive["recall"]
    at95 = next(r for r in sweep if r["recall"] >= target)
    entry.update(search=sweep, exhaustive_recall=exhaustive["recall"], exhaustive_recall_real=exhaustive["recall_real_queries"],
                 nprobe95=at95["nprobe"], nprobe95_recall=at95["recall"], nprobe95_single_p50_ms=at95.get("single_p50_ms"),
                 nprobe95_single_p95_ms=at95.get("single_p95_ms"), nprobe95_batched_ms=at95["batched_ms_per_query"])
    print(f"  -> nprobe reaching 95 % of the exhaustive recall@100 ({exhaustive['recall']:.3f}): {at95['nprobe']} "
          f"(recall {at95['recall']:.3f}, single p50 {at95.get('single_p50_ms', float('nan')):.2f} ms)", flush=True)
    result["indices"]["ivfpq"] = entry

    # --- refine stages on top of the same IVF-PQ
    refiners = []
    if use_refine and flat is not None:
        refiners.append(("rflat", f"{factory},RFlat", flat, {"train_s": 0.0, "add_s": add_s["flat"]}))
    if use_refine:
        refiners.append(("sq8", f"{factory},Refine(SQ8)", sq8, {"train_s": t_train_sq8, "add_s": add_s["sq8"]}))
    for key, name, refine_index, build in refiners:
        refine = faiss.IndexRefine(ivfpq, refine_index)
        if key == "rflat":  # the refine stage is the Flat index measured above
            flat_entry = result["indices"]["flat"]
            sub = {**build, **{k: flat_entry[k] for k in ("file_bytes_per_image", "read_rss_bytes_per_image",
                                                          "build_rss_bytes_per_image")}}
        else:
            sub = sizes(key, refine_index, build)
        sub["factory"] = name
        sub["bytes_note"] = "bytes and build seconds of the refine stage alone, on top of the IVF-PQ's"
        rows = []
        keep = {}

        def refine_search(nprobe: int, k_factor: float):
            keep[(nprobe, k_factor)] = (base := faiss.SearchParametersIVF(nprobe=nprobe),
                                        faiss.IndexRefineSearchParameters(k_factor=k_factor, base_index_params=base))
            return lambda q: refine.search(q, K, params=keep[(nprobe, k_factor)][1])[1]

        grid = [(p, 4.0) for p in (r["nprobe"] for r in sweep) if p <= nlist]
        grid += [(at95["nprobe"], kf) for kf in (1.0, 2.0, 8.0, 16.0)]
        grid += [(nlist, 16.0)] if nlist <= 4096 else []
        for nprobe, kf in grid:
            row = bench.measure(f"{name} nprobe {nprobe} k_factor {kf:g}", refine_search(nprobe, kf), gt,
                                single=nprobe <= args.single_max_nprobe)
            row.update(nprobe=nprobe, k_factor=kf)
            row.pop("ids")
            print_row(row)
            rows.append(row)
        sub["search"] = rows
        result["indices"][key] = sub
        del refine
    shutil.rmtree(work, ignore_errors=True)
    return result


def synthetic_setup(args: argparse.Namespace) -> tuple[Synthetic, np.ndarray, Path]:
    """Threads, the generator, the queries (``args.queries`` synthetic, then the real ones) and the output folder."""
    args.threads = args.threads or len(os.sched_getaffinity(0))
    faiss.omp_set_num_threads(args.threads)
    gen = Synthetic(Path(args.stats), seed=args.seed, threads=args.threads)
    queries = np.ascontiguousarray(np.concatenate([gen.queries(args.queries), gen.real_queries]), dtype=np.float32)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}; threads {args.threads}; stats {args.stats} ({gen.info}); "
          f"{args.queries} synthetic + {len(gen.real_queries)} real queries", flush=True)
    return gen, queries, out


def cmd_run(args: argparse.Namespace) -> None:
    gen, queries, out = synthetic_setup(args)
    started = time.perf_counter()
    for images in args.images:
        if args.deadline_s and time.perf_counter() - started > args.deadline_s:
            print(f"skipping {images:,} images: past --deadline-s {args.deadline_s}")
            continue
        t0 = time.perf_counter()
        result = run_size(args, gen, images, queries, args.queries)
        result["wall_s"] = time.perf_counter() - t0
        result["command"] = " ".join(sys.argv)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"  ({images:,} images done in {result['wall_s']:.0f} s)", flush=True)
    cmd_report(argparse.Namespace(files=[str(out / "results.jsonl")]))


# ----------------------------------------------------------------------------- probe (IVF probing loss only)

def cmd_probe(args: argparse.Namespace) -> None:
    """IVF's probing loss with exact distances, for sizes whose full IVF-PQ build is out of reach.

    Trains the coarse quantizer exactly as ``run`` does (same ``IVF{nlist}`` k-means, seed and
    sample, the head of the same stream) and computes the exact top-100 by streaming, but
    encodes nothing: only the 100 true neighbours of each query are assigned to their lists
    (in a second pass over the stream). The recall@100 of an IVF with exact distances at
    nprobe p is then the share of true neighbours whose list is among the query's p nearest
    lists; ``nprobe95_flat`` is the smallest p reaching 0.95. ``run`` measures the IVF-PQ's own
    nprobe95 where it can build, so the two can be compared at the same sizes.
    """
    gen, queries, out = synthetic_setup(args)
    n_syn = args.queries
    for images in args.images:
        t_start = time.perf_counter()
        n = images * PATCHES
        nlist = nlist_for(n)
        n_train = train_size(n, nlist)
        print(f"\n=== probe {images:,} images = {n:,} vectors: IVF{nlist}, train on {n_train:,}", flush=True)
        ivf = faiss.index_factory(D, f"IVF{nlist},Flat", faiss.METRIC_INNER_PRODUCT)  # an IndexIVFFlat
        ivf.cp.seed = 1234
        t0 = time.perf_counter()
        ivf.train(gen.head(n_train, args.chunk_blocks))   # the coarse k-means of run's IVF-PQ, same sample and seed
        train_s = time.perf_counter() - t0
        quantizer = ivf.quantizer
        _, order = quantizer.search(queries, nlist)        # every list, nearest first, per query
        rank_of_list = np.empty_like(order)
        rank_of_list[np.arange(len(queries))[:, None], order] = np.arange(nlist)[None, :]
        heap = faiss.ResultHeap(len(queries), K, keep_max=True)
        t0 = time.perf_counter()
        for start, x in gen.chunks(n, args.chunk_blocks):
            sims, ids = faiss.knn(queries, x, K, metric=faiss.METRIC_INNER_PRODUCT)
            heap.add_result(sims, ids + start)
        heap.finalize()
        gt = heap.I
        gt_s = time.perf_counter() - t0
        wanted = np.unique(gt)
        list_of = np.full(len(wanted), -1, np.int64)
        for start, x in gen.chunks(n, args.chunk_blocks):  # second pass: the true neighbours' lists
            lo, hi = np.searchsorted(wanted, [start, start + len(x)])
            if hi > lo:
                list_of[lo:hi] = quantizer.search(x[wanted[lo:hi] - start], 1)[1][:, 0]
        ranks = rank_of_list[np.arange(len(queries))[:, None], list_of[np.searchsorted(wanted, gt)]]
        grid = [1 << i for i in range(int(np.log2(nlist)) + 1)]

        def summary(r: np.ndarray) -> dict:
            flat = np.sort(r.reshape(-1))
            return {"recall_by_nprobe": {p: float(np.mean(r < p)) for p in grid},
                    "nprobe95_flat": int(flat[int(np.ceil(0.95 * flat.size)) - 1] + 1),
                    "nprobe95_flat_pow2": next(p for p in grid if np.mean(r < p) >= 0.95)}

        result = {"images": images, "vectors": n, "nlist": nlist, "n_train": n_train, "machine": machine(),
                  "threads": args.threads, "queries_synthetic": n_syn, "queries_real": len(queries) - n_syn,
                  "train_s": train_s, "exact_gt_s": gt_s, "all": summary(ranks), "synthetic": summary(ranks[:n_syn]),
                  "real": summary(ranks[n_syn:]), "wall_s": time.perf_counter() - t_start,
                  "command": " ".join(sys.argv)}
        with open(out / "probe.jsonl", "a") as f:
            f.write(json.dumps(result) + "\n")
        a = result["all"]
        print(f"  train {train_s:.0f} s, ground truth {gt_s:.0f} s; nprobe95 (exact distances) {a['nprobe95_flat']} "
              f"(grid {a['nprobe95_flat_pow2']}); recall by nprobe: "
              + ", ".join(f"{p}: {v:.3f}" for p, v in a["recall_by_nprobe"].items()), flush=True)


# ----------------------------------------------------------------------------- scan (structure only)

def cmd_scan(args: argparse.Namespace) -> None:
    """Disk, memory and scan latency of IVF-PQ indices of the real shape but random content.

    For sizes whose real build is out of reach on the machine (the coarse assignment of 30M
    vectors to 16,384 lists is ~3.8e14 flops): ``images * 30`` entries, nlist by the same rule,
    uniform random lists and random 64-byte codes (``add_sa_codes``, in chunks of ``--chunk``
    entries as a build would add them); coarse centroids are synthetic vectors, the PQ is
    trained on 16,384 of them. Searching scans as many codes per probed list as a real index
    with balanced lists would, so latency is comparable; recall means nothing here.
    """
    args.threads = args.threads or len(os.sched_getaffinity(0))
    gen = Synthetic(Path(args.stats), seed=args.seed, threads=args.threads)
    queries = np.ascontiguousarray(gen.queries(args.queries))
    sample = gen.head(1 << 16, 4)
    pq = faiss.ProductQuantizer(D, PQ_M, PQ_NBITS)
    pq.cp.niter = 10
    pq.train(sample[:16384])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"machine: {machine()}; threads {args.threads}; {args.queries} synthetic queries; random codes", flush=True)
    for images in args.images:
        n, started = images * PATCHES, time.perf_counter()
        nlist = nlist_for(n)
        index = faiss.index_factory(D, f"IVF{nlist},PQ{PQ_M}x{PQ_NBITS}", faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.downcast_index(index)
        faiss.downcast_index(ivf.quantizer).add(gen.head(nlist, 4) if nlist > len(sample) else sample[:nlist])
        ivf.pq = pq
        ivf.is_trained = True
        rng = np.random.default_rng([args.seed, 2, images])
        coarse = ivf.coarse_code_size()
        faiss.omp_set_num_threads(args.threads)
        r0 = rss_bytes()
        for lo in range(0, n, args.chunk):
            m = min(args.chunk, n - lo)
            lists = rng.integers(0, nlist, m)
            codes = np.empty((m, coarse + PQ_M), np.uint8)
            for b in range(coarse):
                codes[:, b] = (lists >> (8 * b)) & 255
            codes[:, coarse:] = rng.integers(0, 256, (m, PQ_M), dtype=np.uint8)
            ivf.add_sa_codes(codes, np.arange(lo, lo + m, dtype=np.int64))
        build_rss = rss_bytes() - r0
        work = Path(tempfile.mkdtemp(prefix=f"index_scan_{images}_", dir=args.workdir))
        path = work / "ivfpq.faiss"
        faiss.write_index(index, str(path))
        row = {"mode": "scan", "images": images, "vectors": n, "nlist": nlist, "machine": machine(), "threads": args.threads,
               "file_bytes_per_image": path.stat().st_size / images, "build_rss_bytes_per_image": build_rss / images,
               "payload_bytes_per_image": ivf_payload(index) / images, "search": []}
        del index, ivf
        row["read_rss_bytes_per_image"] = read_rss(path) / images
        index = faiss.read_index(str(path))
        path.unlink()
        shutil.rmtree(work, ignore_errors=True)
        print(f"\n=== {images:,} images, IVF{nlist},PQ64x8 (random codes): bytes/image file {row['file_bytes_per_image']:,.0f}, "
              f"read RSS {row['read_rss_bytes_per_image']:,.0f}, payload {row['payload_bytes_per_image']:,.0f}, "
              f"build RSS {row['build_rss_bytes_per_image']:,.0f}", flush=True)
        nprobe = 1
        while nprobe <= min(nlist, args.max_nprobe):
            params = faiss.SearchParametersIVF(nprobe=nprobe)
            search = lambda q: index.search(q, K, params=params)[1]   # noqa: E731
            _, per_query = time_batched(search, queries, args.threads)
            times = time_single(search, queries, args.single_budget_s, args.single_queries) \
                if nprobe <= args.single_max_nprobe else []
            r = {"nprobe": nprobe, "batched_ms_per_query": per_query * 1000}
            if times:
                r.update(single_p50_ms=percentile_ms(times, 50), single_p95_ms=percentile_ms(times, 95), single_n=len(times))
            row["search"].append(r)
            print(f"  nprobe {nprobe:6d}  single p50 {r.get('single_p50_ms', float('nan')):8.2f} ms p95 "
                  f"{r.get('single_p95_ms', float('nan')):8.2f} ms (n={len(times)})  batched {r['batched_ms_per_query']:8.3f} ms/q",
                  flush=True)
            nprobe *= 2
        row["wall_s"] = time.perf_counter() - started
        row["command"] = " ".join(sys.argv)
        del index
        with open(out / "scan.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------- report

# ----------------------------------------------------------------------------- refine: PQ alone, in-RAM and on-disk refine

REFINE_VARIANTS = ("pq_ram", "pq_disk", "refine_ram", "refine_disk")


def status_bytes(key: str) -> int:
    """A /proc/self/status field in bytes (RssAnon, RssFile, VmHWM, ...)."""
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key + ":"))


def drop_from_page_cache(path: Path) -> None:
    """Evict ``path``'s clean, unmapped pages from the page cache (no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cmd_refine(args: argparse.Namespace) -> None:
    """PQ alone, FAISS's in-RAM ``IndexRefine`` and patchify's on-disk refine (``MappedRefine``) on one gallery.

    The gallery is filled through the project's sharded path: one trained ``IVF{nlist},PQ64x8,Refine(SQ8)``
    (``patchify.index.train_index``, both stages trained on the same sample), one shard per generated chunk
    (``populate_shard``: IVF-PQ codes and SQ8 refine codes), merged on disk (``merge_shards``: ``index.faiss``,
    ``index.ivfdata``, ``index.refine.npy``) and, for the in-RAM variants, in memory. Each variant is then
    measured in a fresh process (``refine-child``), one thread.
    """
    sys.path.insert(0, str(ROOT / "src"))
    from patchify import index as faiss_index

    gen, queries, out = synthetic_setup(args)
    n = args.images * PATCHES
    nlist = nlist_for(n)
    spec = faiss_index.IndexSpec("ivfpq", m=PQ_M, nbits=PQ_NBITS, nlist=nlist, nprobe=args.nprobe, refine="SQ8",
                                 k_factor=args.k_factor)
    work = Path(tempfile.mkdtemp(prefix=f"index_refine_{args.images}_", dir=args.workdir))
    result = {"images": args.images, "vectors": n, "factory": spec.factory_string(D), "nprobe": args.nprobe,
              "k_factor": args.k_factor, "machine": machine(), "command": " ".join(sys.argv), "variants": {}}
    print(f"\n=== {args.images:,} images x {PATCHES} = {n:,} vectors: {result['factory']}", flush=True)
    started = time.perf_counter()
    try:
        trained = work / "trained.faiss"
        index = faiss_index.create_index(spec, D)
        faiss_index.train_index(index, gen.head(train_size(n, nlist), args.chunk_blocks), spec)
        faiss_index.write_index(index, trained)
        del index
        result["train_s"] = time.perf_counter() - started
        print(f"  trained in {result['train_s']:.0f} s", flush=True)
        heap, shards, t0 = faiss.ResultHeap(len(queries), K, keep_max=True), [], time.perf_counter()
        for start, x in gen.chunks(n, args.chunk_blocks):
            sims, ids = faiss.knn(queries, x, K, metric=faiss.METRIC_INNER_PRODUCT)
            heap.add_result(sims, ids + start)
            shards.append(work / f"shard{len(shards):03d}.faiss")
            faiss_index.populate_shard(trained, x, np.arange(start, start + len(x)), shards[-1])
            print(f"  shard {len(shards)}: {start + len(x):,}/{n:,} vectors, {time.perf_counter() - t0:.0f} s", flush=True)
        heap.finalize()
        result["fill_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        faiss_index.merge_shards(trained, shards, work / "disk" / "index.faiss", on_disk=True)
        result["merge_on_disk_s"] = time.perf_counter() - t0
        ram = faiss_index.merge_shards(trained, shards, work / "ram" / "index.faiss", on_disk=False)
        for shard in shards:
            shard.unlink()
            faiss_index.shard_refine_path(shard).unlink()
        # the in-RAM variants as FAISS files: the IVF-PQ, and FAISS's IndexRefine over it with the same SQ8 codes
        faiss.write_index(ram.base, str(work / "pq.faiss"))
        sq8 = faiss.clone_index(ram.quantizer)
        sq8.add_sa_codes(np.ascontiguousarray(ram.codes[:n]), np.arange(n, dtype=np.int64))
        faiss.write_index(faiss.IndexRefine(ram.base, sq8), str(work / "refine_ram.faiss"))
        del ram, sq8
        np.save(work / "queries.npy", queries[: args.queries])
        np.save(work / "gt.npy", heap.I[: args.queries])
        for variant in REFINE_VARIANTS:
            env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
            child = subprocess.run([sys.executable, __file__, "refine-child", str(work), variant, "--nprobe",
                                    str(args.nprobe), "--k-factor", str(args.k_factor), "--cold", str(args.cold_queries)],
                                   env=env, capture_output=True, text=True)
            if child.returncode:
                sys.exit(f"refine-child {variant} failed:\n{child.stderr[-3000:]}")
            row = json.loads(child.stdout.strip().splitlines()[-1])
            for key in [k for k in row if k.endswith("_bytes")]:
                row[key.replace("_bytes", "_bytes_per_image")] = row.pop(key) / args.images
            result["variants"][variant] = row
            print(f"  {variant:<12} " + ", ".join(f"{k} {v:,.3f}" if isinstance(v, float) else f"{k} {v}"
                                                  for k, v in row.items()), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["wall_s"] = time.perf_counter() - started
    with open(out / "refine.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    print(f"  ({args.images:,} images done in {result['wall_s']:.0f} s) -> {out / 'refine.jsonl'}")


def cmd_refine_child(args: argparse.Namespace) -> None:
    """One variant in a fresh process: memory around loading, recall@100, single-query latency warm and cold."""
    sys.path.insert(0, str(ROOT / "src"))
    from patchify import index as faiss_index
    from patchify.search import PatchOwners, search_images

    work = Path(args.work)
    queries, gt = np.load(work / "queries.npy"), np.load(work / "gt.npy")
    spec = faiss_index.IndexSpec("ivfpq", m=PQ_M, nprobe=args.nprobe, nlist=args.nprobe, refine="SQ8",
                                 k_factor=args.k_factor)
    path = {"pq_ram": work / "pq.faiss", "refine_ram": work / "refine_ram.faiss"}.get(args.variant, work / "disk" / "index.faiss")
    files = [path] + ([path.with_suffix(".ivfdata")] if "disk" in args.variant else []) + \
        ([faiss_index.refine_codes_path(path), faiss_index.refine_quantizer_path(path)] if args.variant == "refine_disk" else [])

    prefetch = [32]  # threads FAISS's OnDiskInvertedLists starts per search to read the lists (its default: 32)

    def open_index():
        index = faiss_index.read_index(path)
        if args.variant == "pq_disk":
            index = index.base
        faiss_index.set_search_params(index, spec)
        if faiss_index.is_on_disk(index):
            faiss_index._on_disk_lists(index).prefetch_nthread = prefetch[0]
        return index

    anon, file_pages = status_bytes("RssAnon"), status_bytes("RssFile")
    index = open_index()
    row = {"disk_bytes": sum(f.stat().st_size for f in files), "load_anon_bytes": status_bytes("RssAnon") - anon}
    _, ids = index.search(queries, K)
    row["recall_at_100"] = float(recall_at(ids, gt).mean())
    for q in queries:  # warm the page cache
        index.search(q[None], K)
    warm = []
    for q in queries:
        t0 = time.perf_counter()
        index.search(q[None], K)
        warm.append(time.perf_counter() - t0)
    row.update(warm_p50_ms=percentile_ms(warm, 50), warm_p95_ms=percentile_ms(warm, 95))
    owners = PatchOwners.of(np.arange(index.ntotal) // PATCHES)
    images = []
    for q in queries:  # warm: an image-level search asks for more patches (4 x 100) than the patch search
        search_images(index, q[None], owners, 100)
    for q in queries:  # the project's image-level search (max per image), k = 100 images
        t0 = time.perf_counter()
        search_images(index, q[None], owners, 100)
        images.append(time.perf_counter() - t0)
    row.update(image_k100_warm_p50_ms=percentile_ms(images, 50), image_k100_warm_p95_ms=percentile_ms(images, 95))
    row.update(anon_after_search_bytes=status_bytes("RssAnon") - anon, file_pages_after_search_bytes=status_bytes("RssFile") - file_pages)
    if "disk" in args.variant:
        for threads in (32, 0):
            prefetch[0], cold, warm = threads, [], []
            for q in queries[: args.cold]:
                del index  # unmap: the kernel keeps pages a process maps
                for f in files:
                    drop_from_page_cache(f)
                index = open_index()
                t0 = time.perf_counter()
                index.search(q[None], K)
                cold.append(time.perf_counter() - t0)
            for q in queries:
                index.search(q[None], K)
            for q in queries:
                t0 = time.perf_counter()
                index.search(q[None], K)
                warm.append(time.perf_counter() - t0)
            images = []
            for q in queries:
                search_images(index, q[None], owners, 100)
            for q in queries:
                t0 = time.perf_counter()
                search_images(index, q[None], owners, 100)
                images.append(time.perf_counter() - t0)
            row.update({f"prefetch{threads}_image_k100_warm_p50_ms": percentile_ms(images, 50),
                        f"prefetch{threads}_cold_p50_ms": percentile_ms(cold, 50),
                        f"prefetch{threads}_cold_p95_ms": percentile_ms(cold, 95),
                        f"prefetch{threads}_warm_p50_ms": percentile_ms(warm, 50),
                        f"prefetch{threads}_warm_p95_ms": percentile_ms(warm, 95)})
        row["cold_n"] = args.cold
    print(json.dumps(row))


def cmd_report(args: argparse.Namespace) -> None:
    results = [json.loads(line) for f in args.files for line in open(f) if line.strip()]
    for r in results:
        m = r["machine"]
        print(f"\n## {r['images']:,} images ({r['vectors']:,} vectors), {m['cpu']}, {m['cores']} cores, "
              f"{r['threads']} threads batched, build on {r['build_on']}; exact ground truth {r['exact_gt_s']:.1f} s "
              f"({r['exact_gt_batched_ms_per_query']:.1f} ms/query batched), generation {r['generate_s']:.1f} s")
        print("| index | train s | add s | B/image disk | B/image RSS read | B/image RSS build | p50 / p95 single ms "
              "| batched ms/q | recall@100 vs exact | vs exhaustive | nprobe at 95 % |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for key, e in r["indices"].items():
            if key == "ivfpq":
                rows = [s for s in e["search"] if s["nprobe"] in (e["nprobe95"], r["nlist"])]
            elif key in ("rflat", "sq8"):
                ivf = r["indices"]["ivfpq"]
                rows = [s for s in e["search"] if s["k_factor"] == 4.0 and s["nprobe"] in (ivf["nprobe95"], r["nlist"])]
            else:
                rows = e["search"]
            for s in rows:
                label = e["factory"] + (f", nprobe {s['nprobe']}" if "nprobe" in s else "") + \
                    (f", k_factor {s['k_factor']:g}" if "k_factor" in s else "")
                single = f"{s['single_p50_ms']:.2f} / {s['single_p95_ms']:.2f}" if "single_p50_ms" in s else "-"
                print(f"| {label} | {e['train_s']:.1f} | {e['add_s']:.1f} | {e['file_bytes_per_image']:,.0f} "
                      f"| {e['read_rss_bytes_per_image']:,.0f} | {e['build_rss_bytes_per_image']:,.0f} | {single} "
                      f"| {s['batched_ms_per_query']:.3f} | {s['recall']:.3f} | {s.get('recall_vs_exhaustive', float('nan')):.3f} "
                      f"| {e.get('nprobe95', '')} |")
    ivf = [(r["images"], r["indices"]["ivfpq"]) for r in results]
    if len({m for m, _ in ivf}) >= 2:
        print("\n## Growth (IVF-PQ at the nprobe reaching 95 % of its exhaustive recall@100)")
        print("| images | nlist | nprobe95 | recall@100 | single p50 ms | batched ms/q | B/image disk | B/image RSS read |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for images, e in sorted(ivf, key=lambda t: t[0]):
            r = next(x for x in results if x["images"] == images)
            p50 = e["nprobe95_single_p50_ms"]
            print(f"| {images:,} | {r['nlist']} | {e['nprobe95']} | {e['nprobe95_recall']:.3f} | "
                  f"{p50 if p50 is None else round(p50, 2)} | {e['nprobe95_batched_ms']:.3f} | {e['file_bytes_per_image']:,.0f} | "
                  f"{e['read_rss_bytes_per_image']:,.0f} |")
        pts = [(im, e["nprobe95_single_p50_ms"]) for im, e in ivf if e["nprobe95_single_p50_ms"]]
        if len(pts) >= 2:
            x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
            b, a = np.polyfit(x, y, 1)
            print(f"fit single p50 = {np.exp(a):.3g} ms * images^{b:.3f} over {len(pts)} sizes -> 10M images: "
                  f"{np.exp(a) * 1e7 ** b:.1f} ms (an assumption: the power law holds one decade further)")
        big = max(ivf, key=lambda t: t[0])[1]
        print(f"10M images from the largest size's bytes/image: disk {big['file_bytes_per_image'] * 1e7 / 2**30:.1f} GiB, "
              f"RSS {big['read_rss_bytes_per_image'] * 1e7 / 2**30:.1f} GiB")


# ----------------------------------------------------------------------------- main

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit the feature model to the cached real features")
    fit.add_argument("--out", default=str(ROOT / ".bench" / "feature_stats.npz"))
    fit.add_argument("--components", type=int, default=1)
    fit.add_argument("--seed", type=int, default=0)
    run = sub.add_parser("run", help="benchmark synthetic galleries")
    run.add_argument("--stats", default=str(ROOT / ".bench" / "feature_stats.npz"))
    run.add_argument("--images", type=int, nargs="+", default=[10_000, 100_000])
    run.add_argument("--queries", type=int, default=300, help="synthetic queries (the real ones come on top)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--threads", type=int, default=0, help="batched search and build threads (0: all cores)")
    run.add_argument("--chunk-blocks", type=int, default=4, help=f"blocks of {BLOCK:,} vectors generated at once")
    run.add_argument("--flat-max-images", type=int, default=100_000)
    run.add_argument("--refine-max-images", type=int, default=100_000)
    run.add_argument("--gpu-from", type=int, default=0,
                     help="from this many images on, coarse k-means and IVF-PQ encoding run on the GPU (0: never)")
    run.add_argument("--single-queries", type=int, default=100)
    run.add_argument("--single-budget-s", type=float, default=3.0)
    run.add_argument("--single-max-nprobe", type=int, default=1 << 30, help="no single-query timing above this nprobe")
    run.add_argument("--deadline-s", type=float, default=0, help="skip further sizes after this many seconds")
    run.add_argument("--workdir", default=None, help="where index files are written and read back (default: temp)")
    run.add_argument("--out", default=str(ROOT / ".bench" / "index_scale"))
    scan = sub.add_parser("scan", help="disk, memory and latency of random-content IVF-PQ of the real shape")
    scan.add_argument("--stats", default=str(ROOT / ".bench" / "feature_stats.npz"))
    scan.add_argument("--images", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    scan.add_argument("--queries", type=int, default=100)
    scan.add_argument("--seed", type=int, default=0)
    scan.add_argument("--threads", type=int, default=0)
    scan.add_argument("--chunk", type=int, default=1 << 20, help="entries per add_sa_codes call")
    scan.add_argument("--max-nprobe", type=int, default=1 << 30)
    scan.add_argument("--single-queries", type=int, default=100)
    scan.add_argument("--single-budget-s", type=float, default=3.0)
    scan.add_argument("--single-max-nprobe", type=int, default=2048)
    scan.add_argument("--workdir", default=None)
    scan.add_argument("--out", default=str(ROOT / ".bench" / "index_scale"))
    probe = sub.add_parser("probe", help="IVF probing loss with exact distances (no encoding)")
    probe.add_argument("--stats", default=str(ROOT / ".bench" / "feature_stats.npz"))
    probe.add_argument("--images", type=int, nargs="+", default=[10_000, 100_000, 300_000, 1_000_000])
    probe.add_argument("--queries", type=int, default=200, help="synthetic queries (the real ones come on top)")
    probe.add_argument("--seed", type=int, default=0)
    probe.add_argument("--threads", type=int, default=0)
    probe.add_argument("--chunk-blocks", type=int, default=4)
    probe.add_argument("--out", default=str(ROOT / ".bench" / "index_scale"))
    refine = sub.add_parser("refine", help="PQ alone vs in-RAM vs on-disk refine (SQ8) at one gallery size")
    refine.add_argument("--stats", default=str(ROOT / ".bench" / "feature_stats.npz"))
    refine.add_argument("--images", type=int, default=30_000)
    refine.add_argument("--queries", type=int, default=100, help="synthetic queries (timed and scored)")
    refine.add_argument("--cold-queries", type=int, default=30, help="queries timed with a dropped page cache")
    refine.add_argument("--nprobe", type=int, default=128)
    refine.add_argument("--k-factor", type=float, default=16)
    refine.add_argument("--seed", type=int, default=0)
    refine.add_argument("--threads", type=int, default=0, help="build threads (0: all cores); searches use one")
    refine.add_argument("--chunk-blocks", type=int, default=4, help=f"blocks of {BLOCK:,} vectors per shard")
    refine.add_argument("--workdir", default=None)
    refine.add_argument("--out", default=str(ROOT / ".bench" / "index_scale"))
    refine_child = sub.add_parser("refine-child")
    refine_child.add_argument("work")
    refine_child.add_argument("variant", choices=REFINE_VARIANTS)
    refine_child.add_argument("--nprobe", type=int, default=128)
    refine_child.add_argument("--k-factor", type=float, default=16)
    refine_child.add_argument("--cold", type=int, default=30)
    report = sub.add_parser("report", help="tables from results.jsonl files")
    report.add_argument("files", nargs="+")
    rss = sub.add_parser("rss")
    rss.add_argument("path")
    args, overrides = parser.parse_known_args()
    if overrides and args.command != "fit":
        parser.error(f"unknown arguments {overrides}")
    {"fit": lambda: cmd_fit(args, overrides), "run": lambda: cmd_run(args), "report": lambda: cmd_report(args),
     "rss": lambda: cmd_rss(args), "scan": lambda: cmd_scan(args), "probe": lambda: cmd_probe(args),
     "refine": lambda: cmd_refine(args), "refine-child": lambda: cmd_refine_child(args)}[args.command]()


if __name__ == "__main__":
    main()
