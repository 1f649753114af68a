"""FAISS index: build, train, fill, save and load.

The index knows vectors (float32 rows) and integer ids (row numbers,
consecutive from 0), nothing about images or models. An index is described
by an :class:`IndexSpec`, which maps one to one onto a FAISS factory string:

- ``flat``: ``Flat``, exact search;
- ``pq``: ``PQ{m}x{nbits}``, product quantizer, exhaustive scan of codes;
- ``ivfpq``: ``IVF{nlist},PQ{m}x{nbits}``, inverted file over PQ-coded
  residuals, ``nprobe`` lists visited per query (``nprobe == nlist`` visits all).

``metric`` is ``IP`` (inner product, higher is better) or ``L2`` (FAISS
returns *squared* L2 distances, lower is better).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from loguru import logger

KINDS = ("flat", "pq", "ivfpq")
METRICS = {"IP": faiss.METRIC_INNER_PRODUCT, "L2": faiss.METRIC_L2}

#: FAISS's k-means needs this many points per centroid to be well trained
#: (``ClusteringParameters.min_points_per_centroid``); it warns below it.
MIN_POINTS_PER_CENTROID = 39

#: Default k-means seed, the same as FAISS's own ``ClusteringParameters.seed``.
DEFAULT_SEED = 1234

#: Rows converted and added per FAISS call (about 256 MiB of float32).
_ADD_CHUNK_BYTES = 1 << 28


class IndexConfigError(ValueError):
    """An index setting or input that cannot work; the message is one line."""


@dataclass(frozen=True)
class IndexSpec:
    """What index to build. ``nprobe`` is a search-time setting (IVF only).

    ``m``, ``nbits`` apply to ``pq`` and ``ivfpq``; ``nlist``, ``nprobe`` to
    ``ivfpq``. ``kind`` and ``metric`` are normalised (``"IVFPQ"`` ->
    ``"ivfpq"``, ``"ip"`` -> ``"IP"``).
    """

    kind: str
    m: int = 16
    nlist: int = 256
    nbits: int = 8
    nprobe: int = 256
    metric: str = "IP"

    def __post_init__(self) -> None:
        kind, metric = str(self.kind).lower(), str(self.metric).upper()
        if kind not in KINDS:
            raise IndexConfigError(f"index: unknown kind {self.kind!r} (choose one of {', '.join(KINDS)})")
        if metric not in METRICS:
            raise IndexConfigError(f"index: unknown metric {self.metric!r} (choose IP or L2)")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "metric", metric)
        if kind == "flat":
            return
        if not 1 <= self.nbits <= 16:
            raise IndexConfigError(f"index: pq nbits={self.nbits} must be in 1..16")
        if self.m < 1:
            raise IndexConfigError(f"index: pq m={self.m} must be >= 1")
        if kind == "ivfpq":
            if self.nlist < 1:
                raise IndexConfigError(f"index: ivf nlist={self.nlist} must be >= 1")
            if self.nprobe < 1:
                raise IndexConfigError(f"index: ivf nprobe={self.nprobe} must be >= 1")

    def factory_string(self, d: int) -> str:
        """FAISS factory string for dimension ``d``, e.g. ``"IVF256,PQ16x8"``."""
        if d < 1:
            raise IndexConfigError(f"index: feature dimension {d} must be >= 1")
        if self.kind == "flat":
            return "Flat"
        if d % self.m:
            raise IndexConfigError(f"index: pq m={self.m} does not divide feature dimension {d}")
        pq = f"PQ{self.m}x{self.nbits}"
        return pq if self.kind == "pq" else f"IVF{self.nlist},{pq}"

    def needs_training(self) -> bool:
        """True for quantised indices (``pq``, ``ivfpq``)."""
        return self.kind != "flat"

    def slug(self, d: int) -> str:
        """Readable file-name part, e.g. ``"IVF256_PQ16x8.d384.IP"``.

        ``nprobe`` is left out: it changes the search, not the file.
        """
        return f"{self.factory_string(d).replace(',', '_')}.d{d}.{self.metric}"


def check_training_size(spec: IndexSpec, n_train: int) -> None:
    """Refuse training sets k-means cannot use; warn on ones it uses badly.

    Error when there are fewer training vectors than IVF lists (``nlist``)
    or PQ centroids (``2**nbits``); warning below FAISS's own heuristic of
    39 points per centroid.
    """
    if not spec.needs_training():
        return
    needs = [(f"pq 2**nbits={2 ** spec.nbits} centroids", 2**spec.nbits)]
    if spec.kind == "ivfpq":
        needs.insert(0, (f"ivf nlist={spec.nlist}", spec.nlist))
    for what, k in needs:
        if n_train < k:
            raise IndexConfigError(
                f"index: {what} needs at least {k} training vectors, got {n_train}"
            )
    for what, k in needs:
        if n_train < MIN_POINTS_PER_CENTROID * k:
            logger.warning(
                "index: {} trained on {} vectors; FAISS advises at least {} ({} per centroid)",
                what, n_train, MIN_POINTS_PER_CENTROID * k, MIN_POINTS_PER_CENTROID,
            )


def create_index(spec: IndexSpec, d: int) -> faiss.Index:
    """An empty CPU index for ``spec`` in dimension ``d`` (nprobe already set).

    Polysemous training, which the factory turns on for PQ and only serves
    Hamming-filtered search, is switched off: it costs time and nothing here
    uses it.
    """
    index = faiss.index_factory(d, spec.factory_string(d), METRICS[spec.metric])
    if hasattr(index, "do_polysemous_training"):
        index.do_polysemous_training = False
    if spec.kind == "ivfpq":
        set_nprobe(index, spec.nprobe)
    return index


def _as_matrix(vectors: np.ndarray, d: int) -> np.ndarray:
    """``vectors`` as a C-contiguous float32 (n, d) array, or IndexConfigError."""
    x = np.asarray(vectors)
    if x.ndim != 2:
        raise IndexConfigError(f"index: vectors must be a 2-D (n, d) array, got shape {x.shape}")
    if x.shape[1] != d:
        raise IndexConfigError(
            f"index: feature dimension {x.shape[1]} does not match index dimension {d}"
        )
    return np.ascontiguousarray(x, dtype=np.float32)


def train_index(
    index: faiss.Index, vectors: np.ndarray, spec: IndexSpec, *, seed: int = DEFAULT_SEED
) -> None:
    """Train the quantizers of ``index`` on ``vectors`` (n, d); no-op for flat.

    Deterministic: the k-means seeds of the IVF coarse quantizer
    (``ivf.cp.seed``) and of the product quantizer (``pq.cp.seed``) are set
    to ``seed``; FAISS's k-means is then reproducible on CPU whatever the
    thread count (it subsamples with that seed and sums per centroid). GPU
    training gets the same seeds but is not bit-reproducible.
    """
    x = _as_matrix(vectors, index.d)
    if not spec.needs_training():
        return
    if not np.isfinite(x).all():
        raise IndexConfigError("index: training vectors contain NaN or inf")
    check_training_size(spec, len(x))
    ivf = index if is_gpu_index(index) else faiss.try_extract_index_ivf(index)
    if getattr(ivf, "cp", None) is not None:  # IVF coarse quantizer (CPU or GPU)
        ivf.cp.seed = seed
    pq = getattr(ivf if ivf is not None else index, "pq", None)
    if pq is not None:
        pq.cp.seed = seed
    logger.info("index: training {} on {} vectors", spec.factory_string(index.d), len(x))
    index.train(x)


def add_vectors(index: faiss.Index, vectors: np.ndarray, start_id: int) -> None:
    """Append ``vectors`` as rows ``start_id, start_id + 1, ...``.

    Ids are row numbers, so ``start_id`` must equal ``index.ntotal``. Input
    may be any float dtype (e.g. a float16 memmap); it is converted chunk by
    chunk.
    """
    if not index.is_trained:
        raise IndexConfigError("index: add_vectors on an untrained index; call train_index first")
    if start_id != index.ntotal:
        raise IndexConfigError(
            f"index: start_id {start_id} does not follow the {index.ntotal} rows already indexed"
        )
    x = np.asarray(vectors)
    if x.ndim != 2 or x.shape[1] != index.d:
        _as_matrix(x, index.d)  # raises the dimension error
    step = max(1, _ADD_CHUNK_BYTES // (4 * index.d))
    for lo in range(0, len(x), step):
        index.add(_as_matrix(x[lo : lo + step], index.d))


def is_gpu_index(index: faiss.Index) -> bool:
    """True when ``index`` lives on a GPU."""
    gpu_index = getattr(faiss, "GpuIndex", None)
    return gpu_index is not None and isinstance(index, gpu_index)


def _nlist(index: faiss.Index) -> int | None:
    """Number of inverted lists, or None for a non-IVF index."""
    if is_gpu_index(index):
        return getattr(index, "nlist", None)
    ivf = faiss.try_extract_index_ivf(index)
    return None if ivf is None else ivf.nlist


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Set how many inverted lists a search visits (CPU or GPU index).

    No-op for non-IVF indices; values above ``nlist`` are clamped to it with a
    warning (``nprobe == nlist`` is the exhaustive scan).
    """
    nlist = _nlist(index)
    if nlist is None:
        return
    if nprobe < 1:
        raise IndexConfigError(f"index: ivf nprobe={nprobe} must be >= 1")
    if nprobe > nlist:
        logger.warning("index: nprobe={} exceeds nlist={}; using nprobe={}", nprobe, nlist, nlist)
        nprobe = nlist
    if is_gpu_index(index):
        faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", nprobe)
    else:
        faiss.extract_index_ivf(index).nprobe = nprobe


def to_cpu(index: faiss.Index) -> faiss.Index:
    """A CPU copy of a GPU index (nprobe kept); a CPU index is returned as is."""
    if not is_gpu_index(index):
        return index
    cpu = faiss.index_gpu_to_cpu(index)
    nprobe = getattr(index, "nprobe", None)
    if nprobe is not None and faiss.try_extract_index_ivf(cpu) is not None:
        faiss.extract_index_ivf(cpu).nprobe = int(nprobe)
    return cpu


def write_index(index: faiss.Index, path: Path) -> None:
    """Write ``index`` to ``path`` atomically (temp file, fsync, rename).

    A killed run leaves at most a ``<name>.tmp-<pid>`` file, never a
    half-written ``path``. GPU indices are copied to CPU first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        faiss.write_index(to_cpu(index), str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (RuntimeError, OSError) as e:  # e.g. no space left on device
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise IndexConfigError(f"{path}: cannot write index ({reason}); nothing was replaced") from None
    finally:
        tmp.unlink(missing_ok=True)


def read_index(path: Path, mmap: bool = False) -> faiss.Index:
    """Read an index written by :func:`write_index` (CPU).

    ``mmap=True`` maps the codes and inverted lists from the file instead of
    loading them (``IO_FLAG_MMAP_IFC``): little memory, read-only index.
    Raises FileNotFoundError for a missing file and IndexConfigError naming
    the file when it is not a readable FAISS index (e.g. truncated). FAISS's
    mmap reader may miss a file short of only its last few bytes; complete
    files are guaranteed by the atomic rename of :func:`write_index`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such index file")
    flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        return faiss.read_index(str(path), flags)
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        reason = reason.split("Error: ", 1)[-1]
        raise IndexConfigError(f"{path}: not a readable FAISS index ({reason})") from None


def gpu_available() -> bool:
    """True when this FAISS build has GPU support and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


_gpu_resources = None


def _gpu_res():
    """One process-wide ``StandardGpuResources`` (kept alive with the indices)."""
    global _gpu_resources
    if _gpu_resources is None:
        _gpu_resources = faiss.StandardGpuResources()
    return _gpu_resources


def to_device(index: faiss.Index, use_gpu: bool) -> faiss.Index:
    """``index`` on GPU 0 when asked and possible, else on CPU.

    GPU FAISS has no plain PQ index and limits IVF-PQ (``nbits == 8``, some
    code sizes, lookup tables in shared memory); a failed copy is retried with
    float16 lookup tables, then falls back to the CPU index with a warning.
    """
    if not use_gpu:
        return to_cpu(index)
    if is_gpu_index(index):
        return index
    if not gpu_available():
        logger.warning("index: GPU requested but FAISS sees none; searching on CPU")
        return index
    error = None
    for float16 in (False, True):
        options = faiss.GpuClonerOptions()
        options.useFloat16 = float16
        try:
            return faiss.index_cpu_to_gpu(_gpu_res(), 0, index, options)
        except RuntimeError as e:  # unsupported on GPU
            error = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    logger.warning("index: {} cannot run on GPU ({}); searching on CPU", type(index).__name__, error)
    return index


def index_nbytes(index: faiss.Index) -> int:
    """Serialised size in bytes (the file size ``write_index`` would give)."""
    return int(faiss.serialize_index(to_cpu(index)).nbytes)
