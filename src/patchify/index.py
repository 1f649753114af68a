"""FAISS index: build, train, fill, save and load.

The index knows vectors (float32 rows) and integer ids (row numbers,
consecutive from 0), nothing about images or models. An index is described
by an :class:`IndexSpec`, which maps one to one onto a FAISS factory string:

- ``flat``: ``Flat``, exact search;
- ``pq``: ``PQ{m}x{nbits}``, product quantizer, exhaustive scan of codes;
- ``ivfpq``: ``IVF{nlist},PQ{m}x{nbits}``, inverted file over PQ-coded
  residuals, ``nprobe`` lists visited per query (``nprobe == nlist`` visits all).

A quantised index may carry a refine stage (``refine``: ``SQ8``, ``SQfp16`` or
``Flat``; factory suffix ``,Refine(...)``): every vector is also stored with
finer codes, and a search re-scores the ``k_factor * k`` best PQ candidates
with them. It buys back PQ's loss for ``d`` (SQ8), ``2d`` or ``4d`` bytes
per vector (docs/BENCHMARKS.md). A one-file index uses FAISS's ``IndexRefine``
(codes in RAM, by row number). A sharded or on-disk index keeps them in
``<name>.refine.npy`` beside its inverted lists (one row per index id), read
through a memory map by :class:`MappedRefine`: RAM stays the PQ index's.

``metric`` is ``IP`` (inner product, higher is better) or ``L2`` (FAISS
returns *squared* L2 distances, lower is better).

A large IVF index is built in shards: one trained index file, shard files
filled from it independently under explicit global ids (:func:`populate_shard`),
then joined by :func:`merge_shards`, on disk with FAISS's own
``merge_ondisk``: ``<name>.faiss`` holds the quantizers, ``<name>.ivfdata``
beside it the inverted lists, which :func:`read_index` memory-maps, so the
index may be larger than RAM.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk
from loguru import logger

from .cache import discard, read_at_random, sweep_temporaries, tmp_path_for

KINDS = ("flat", "pq", "ivfpq")
#: Refine stages (FAISS ``Refine(...)`` factory names; bytes per vector: d, 2d, 4d).
REFINES = ("none", "SQ8", "SQfp16", "Flat")
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

    ``m``, ``nbits``, ``refine`` apply to ``pq`` and ``ivfpq``; ``nlist``,
    ``nprobe`` to ``ivfpq``; ``k_factor`` (candidates re-scored per result) to
    a refined index. ``kind``, ``metric`` and ``refine`` are normalised
    (``"IVFPQ"`` -> ``"ivfpq"``, ``"ip"`` -> ``"IP"``, ``"sq8"`` -> ``"SQ8"``).
    """

    kind: str
    m: int = 16
    nlist: int = 256
    nbits: int = 8
    nprobe: int = 256
    metric: str = "IP"
    refine: str = "none"
    k_factor: float = 4.0

    def __post_init__(self) -> None:
        kind, metric = str(self.kind).lower(), str(self.metric).upper()
        refine = {r.lower(): r for r in REFINES}.get(str(self.refine if self.refine else "none").lower())
        if kind not in KINDS:
            raise IndexConfigError(f"index: unknown kind {self.kind!r} (choose one of {', '.join(KINDS)})")
        if metric not in METRICS:
            raise IndexConfigError(f"index: unknown metric {self.metric!r} (choose IP or L2)")
        if refine is None:
            raise IndexConfigError(f"index: unknown refine {self.refine!r} (choose one of {', '.join(REFINES)})")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "metric", metric)
        object.__setattr__(self, "refine", refine)
        if kind == "flat":
            if refine != "none":
                raise IndexConfigError(f"index: refine={refine} needs a quantised index (kind=pq or ivfpq); "
                                       "flat is exact already")
            return
        if not self.k_factor >= 1:
            raise IndexConfigError(f"index: refine k_factor={self.k_factor} must be >= 1")
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
        base = pq if self.kind == "pq" else f"IVF{self.nlist},{pq}"
        return base if self.refine == "none" else f"{base},Refine({self.refine})"

    def needs_training(self) -> bool:
        """True for quantised indices (``pq``, ``ivfpq``)."""
        return self.kind != "flat"

    def slug(self, d: int) -> str:
        """Readable file-name part, e.g. ``"IVF256_PQ16x8.d384.IP"`` or ``"PQ16x8_RefineSQ8.d384.IP"``.

        ``nprobe`` and ``k_factor`` are left out: they change the search, not the file.
        """
        name = self.factory_string(d).replace(",", "_").replace("(", "").replace(")", "")
        return f"{name}.d{d}.{self.metric}"


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
    quantised = quantised_part(index)
    if hasattr(quantised, "do_polysemous_training"):
        quantised.do_polysemous_training = False
    set_search_params(index, spec)
    return index


def quantised_part(index: faiss.Index) -> faiss.Index:
    """The PQ or IVF-PQ index itself: ``index``, or the base of a refined index."""
    if isinstance(index, MappedRefine):
        return index.base
    return faiss.downcast_index(faiss.downcast_index(index).base_index) if is_refined(index) else index


def is_refined(index: faiss.Index) -> bool:
    """True when ``index`` re-scores its candidates with a refine stage (``IndexRefine`` or :class:`MappedRefine`)."""
    if isinstance(index, MappedRefine):
        return True
    return not is_gpu_index(index) and isinstance(faiss.downcast_index(index), faiss.IndexRefine)


def set_search_params(index: faiss.Index, spec: IndexSpec) -> None:
    """Apply the search-time settings of ``spec``: ``nprobe`` (IVF) and ``k_factor`` (refined index)."""
    set_nprobe(index, spec.nprobe)
    if isinstance(index, MappedRefine):
        index.k_factor = float(spec.k_factor)
    elif is_refined(index):
        faiss.downcast_index(index).k_factor = float(spec.k_factor)


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
    pq = getattr(ivf if ivf is not None else quantised_part(index), "pq", None)
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


def add_with_ids(index: faiss.Index, vectors: np.ndarray, ids: np.ndarray) -> None:
    """Append ``vectors`` under explicit int64 ``ids`` (IVF indices only).

    Input may be any float dtype; it is converted chunk by chunk.
    """
    if not is_gpu_index(index) and faiss.try_extract_index_ivf(index) is None:
        raise IndexConfigError("index: explicit ids need an IVF index (kind=ivfpq)")
    if not index.is_trained:
        raise IndexConfigError("index: add_with_ids on an untrained index; call train_index first")
    x, ids = np.asarray(vectors), np.asarray(ids)
    if x.ndim != 2 or x.shape[1] != index.d:
        _as_matrix(x, index.d)  # raises the dimension error
    if ids.shape != (len(x),) or (ids.size and ids.min() < 0):
        raise IndexConfigError(f"index: need one id >= 0 per vector, got ids of shape {ids.shape} for {len(x)} vectors")
    step = max(1, _ADD_CHUNK_BYTES // (4 * index.d))
    for lo in range(0, len(x), step):
        index.add_with_ids(_as_matrix(x[lo : lo + step], index.d), np.ascontiguousarray(ids[lo : lo + step], np.int64))


def is_gpu_index(index: faiss.Index) -> bool:
    """True when ``index`` lives on a GPU."""
    gpu_index = getattr(faiss, "GpuIndex", None)
    return gpu_index is not None and isinstance(index, gpu_index)


def _nlist(index: faiss.Index) -> int | None:
    """Number of inverted lists, or None for a non-IVF index."""
    index = quantised_part(index)
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
        faiss.extract_index_ivf(quantised_part(index)).nprobe = nprobe


def to_cpu(index: faiss.Index) -> faiss.Index:
    """A CPU copy of a GPU index (nprobe kept); a CPU index is returned as is."""
    if not is_gpu_index(index):
        return index
    cpu = faiss.index_gpu_to_cpu(index)
    nprobe = getattr(index, "nprobe", None)
    if nprobe is not None and faiss.try_extract_index_ivf(cpu) is not None:
        faiss.extract_index_ivf(cpu).nprobe = int(nprobe)
    return cpu


def _reason(err: Exception) -> str:
    """The last line of a FAISS error, without its C++ location."""
    text = str(err).strip()
    return text.splitlines()[-1].split("Error: ", 1)[-1] if text else type(err).__name__


def ivfdata_path(path: Path) -> Path:
    """Where the on-disk index ``<name>.faiss`` keeps its inverted lists: ``<name>.ivfdata`` beside it."""
    return Path(path).with_suffix(".ivfdata")


def _on_disk_lists(index: faiss.Index):
    """The ``OnDiskInvertedLists`` of ``index``, or None."""
    index = quantised_part(index)
    ivf = None if is_gpu_index(index) else faiss.try_extract_index_ivf(index)
    if ivf is None:
        return None
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    return lists if isinstance(lists, faiss.OnDiskInvertedLists) else None


def is_on_disk(index: faiss.Index) -> bool:
    """True when the inverted lists of ``index`` live in an ``.ivfdata`` file (memory-mapped)."""
    return _on_disk_lists(index) is not None


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _commit_on_disk(index: faiss.Index, path: Path, lists_tmp: Path) -> None:
    """Write the index file of on-disk ``index``, whose lists are complete in ``lists_tmp``; move both into place.

    The index file records its lists by file name only (read back from its own folder). It is
    removed first and renamed into place last, so a killed run leaves either no index file
    (rebuilt next time) or a complete pair, never an index file over other lists.
    """
    lists, tmp = _on_disk_lists(index), tmp_path_for(path)
    previous, lists.filename = lists.filename, ivfdata_path(path).name
    try:
        faiss.write_index(index, str(tmp))
        _fsync(lists_tmp)
        _fsync(tmp)
        path.unlink(missing_ok=True)
        os.replace(lists_tmp, ivfdata_path(path))
        os.replace(tmp, path)
    finally:
        lists.filename = previous
        discard(tmp)


def write_index(index: faiss.Index, path: Path) -> None:
    """Write ``index`` to ``path`` atomically (temp file, fsync, rename).

    A killed run leaves at most a temporary ``.<name>.tmp-<host>-<pid>``
    (``cache.tmp_path_for``), never a half-written ``path``; the temporaries
    of writers that are gone are swept from the folder first. GPU indices are
    copied to CPU first. An on-disk index is written as its index file plus
    ``<name>.ivfdata`` beside it, a hard link to (or, across file systems, a
    copy of) its current lists.
    """
    path = Path(path)
    if isinstance(index, MappedRefine):
        _write_refined(index, path)
        return
    on_disk = is_on_disk(index)
    tmp = tmp_path_for(ivfdata_path(path) if on_disk else path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_temporaries(path.parent)
        _remove_refine(path)  # the refine codes of a refined index this file replaces
        if on_disk:
            _link_or_copy(_on_disk_lists(index).filename, tmp)
            _commit_on_disk(index, path, lists_tmp=tmp)
            return
        faiss.write_index(to_cpu(index), str(tmp))
        _fsync(tmp)
        os.replace(tmp, path)
        ivfdata_path(path).unlink(missing_ok=True)  # lists of an on-disk index this file replaced
    except (RuntimeError, OSError) as e:  # e.g. no space left on device
        raise IndexConfigError(f"{path}: cannot write index ({_reason(e)}); nothing was replaced") from None
    finally:
        discard(tmp)


def _link_or_copy(source: str | Path, target: Path) -> None:
    """``target`` as a hard link to ``source``, or (across file systems) a copy of it."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def read_index(path: Path, mmap: bool = False) -> faiss.Index:
    """Read an index written by :func:`write_index` (CPU).

    ``mmap=True`` maps the codes and inverted lists from the file instead of
    loading them (``IO_FLAG_MMAP_IFC``): little memory, read-only index.
    An on-disk index (``<name>.ivfdata`` beside ``path``) is always read so:
    its lists are memory-mapped read-only from the index file's own folder,
    so the pair may be moved together. Raises FileNotFoundError for a missing
    file and IndexConfigError naming the file when it is not a readable FAISS
    index (e.g. truncated) or its lists are missing or short. FAISS's mmap
    reader may miss a file short of only its last few bytes; complete files
    are guaranteed by the atomic rename of :func:`write_index`. A refine stage
    beside ``path`` (``<name>.refine.faiss`` + ``<name>.refine.npy``) makes it a
    :class:`MappedRefine`, codes memory-mapped; short codes are an IndexConfigError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such index file")
    index = _read_base(path, mmap)
    return read_refine(path, index) if refine_quantizer_path(path).is_file() else index


def _read_base(path: Path, mmap: bool) -> faiss.Index:
    flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        if ivfdata_path(path).is_file():  # read the quantizers, then map the lists beside them
            index = faiss.read_index(str(path), faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY)
            lists = _on_disk_lists(index)
            if lists is not None:
                _map_lists(path, lists)
                return index
        return faiss.read_index(str(path), flags)
    except RuntimeError as e:
        raise IndexConfigError(f"{path}: not a readable FAISS index ({_reason(e)})") from None


def _map_lists(path: Path, lists) -> None:
    """Memory-map the on-disk ``lists`` of index file ``path`` from the file of their name in ``path``'s folder."""
    data = path.parent / Path(lists.filename).name
    if not data.is_file():
        raise IndexConfigError(f"{path}: its inverted lists {data.name} are missing; move the two files together")
    if data.stat().st_size < lists.totsize:
        raise IndexConfigError(f"{data}: truncated inverted lists ({data.stat().st_size:,} of {lists.totsize:,} bytes)")
    lists.filename = str(data.resolve())
    lists.do_mmap()


def refine_codes_path(path: Path) -> Path:
    """Refine codes of the sharded/on-disk index ``<name>.faiss``: ``<name>.refine.npy``, one row per index id."""
    return Path(path).with_suffix(".refine.npy")


def refine_quantizer_path(path: Path) -> Path:
    """The trained, empty refine index (its scalar quantizer) of ``<name>.faiss``: ``<name>.refine.faiss``."""
    return Path(path).with_suffix(".refine.faiss")


def shard_refine_path(path: Path) -> Path:
    """Refine codes of shard file ``<shard>.faiss``, with the ids they belong to: ``<shard>.refine-shard.npy``."""
    return Path(path).with_suffix(".refine-shard.npy")


class MappedRefine:
    """An IVF-PQ index whose shortlist is re-scored with refine codes read through a memory map.

    FAISS's ``IndexRefine`` does the same re-scoring but keeps its refine index, codes included, in RAM
    (``d`` bytes per patch for SQ8: 11.5 KB per image at 30 patches, 5x the PQ index's), addressed by row
    number, and can be neither merged from shards nor memory-mapped. This is the thinnest layer over FAISS's
    pieces that avoids that: the base index (FAISS, inverted lists on disk or not) returns
    ``int(k * k_factor)`` candidates as ``IndexRefine`` asks of its base; their rows of ``codes``
    (``<name>.refine.npy``, uint8, one row per index id, memory-mapped so only the shortlist's pages are
    read) are decoded by the refine index's own ``sa_decode`` (FAISS's ScalarQuantizer, or raw floats for
    ``Flat``) and scored exactly against the query; the best ``k`` are kept. Same results as ``IndexRefine``
    with the same quantizer (to float rounding). Quacks as a FAISS index for :func:`search.search_images`:
    ``d``, ``ntotal``, ``metric_type``, ``search``.
    """

    def __init__(self, base: faiss.Index, quantizer: faiss.Index, codes: np.ndarray, k_factor: float = 4.0,
                 codes_path: Path | None = None):
        self.base, self.quantizer, self.codes, self.k_factor = base, quantizer, codes, float(k_factor)
        self.codes_path = codes_path

    @property
    def d(self) -> int:
        return int(self.base.d)

    @property
    def ntotal(self) -> int:
        return int(self.base.ntotal)

    @property
    def metric_type(self) -> int:
        return self.base.metric_type

    @property
    def is_trained(self) -> bool:
        return bool(self.base.is_trained)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """FAISS-style ``(distances, ids)``, (nq, k) each: inner products (IP) or squared L2, id -1 for none."""
        x = _as_matrix(queries, self.d)
        k_base = max(int(k), int(k * self.k_factor))
        _, labels = self.base.search(x, k_base)
        found = labels >= 0
        ids = labels[found]
        if ids.size and int(ids.max()) >= len(self.codes):
            raise IndexConfigError(f"{self.codes_path}: holds refine codes for {len(self.codes):,} ids, the index "
                                   f"returned id {int(ids.max()):,}; the two files belong to different indexes")
        ip = self.metric_type == faiss.METRIC_INNER_PRODUCT
        worst = np.float32(-np.finfo(np.float32).max if ip else np.finfo(np.float32).max)
        dist = np.full(labels.shape, worst, dtype=np.float32)
        for i, query in enumerate(x):  # each query its own shortlist: decode each row once, one mat-vec
            if not found[i].any():
                continue
            rows, where = np.unique(labels[i][found[i]], return_inverse=True)  # sorted: file order
            vectors = self.quantizer.sa_decode(np.ascontiguousarray(self.codes[rows]))
            scores = vectors @ query if ip else np.square(vectors - query).sum(axis=1)
            dist[i, found[i]] = scores[where]
        order = np.argsort(-dist if ip else dist, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(dist, order, axis=1), np.take_along_axis(labels, order, axis=1)


def refine_parts(index: faiss.Index) -> tuple[faiss.Index, faiss.Index | None]:
    """``(base, refine index)`` of a trained ``IndexRefine`` (the refine index cloned, empty); ``(index, None)`` else."""
    if not is_refined(index) or isinstance(index, MappedRefine):
        return index, None
    refine = faiss.clone_index(faiss.downcast_index(faiss.downcast_index(index).refine_index))
    refine.reset()
    return faiss.clone_index(quantised_part(index)), refine


def encode_refine_rows(quantizer: faiss.Index, vectors: np.ndarray, ids: np.ndarray, path: Path) -> None:
    """Write the refine codes of ``vectors`` (rows ``ids``) to ``path``: a structured .npy of ``id`` and
    ``code`` per row, encoded chunk by chunk by the refine index's ``sa_encode``; atomic."""
    x, ids = np.asarray(vectors), np.asarray(ids, dtype=np.int64)
    dtype = np.dtype([("id", "<i8"), ("code", "u1", (quantizer.sa_code_size(),))])
    tmp = tmp_path_for(path)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(len(x),))
        step = max(1, _ADD_CHUNK_BYTES // (4 * quantizer.d))
        for lo in range(0, len(x), step):
            out["id"][lo : lo + step] = ids[lo : lo + step]
            out["code"][lo : lo + step] = quantizer.sa_encode(_as_matrix(x[lo : lo + step], quantizer.d))
        out.flush()
        del out
        _fsync(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise IndexConfigError(f"{path}: cannot write refine codes ({_reason(e)}); nothing was replaced") from None
    finally:
        discard(tmp)


def _load_codes(path: Path, dtype: np.dtype | None = None) -> np.ndarray:
    """The .npy ``path``, memory-mapped read-only; IndexConfigError naming it when missing, short or not .npy."""
    if not path.is_file():
        raise IndexConfigError(f"{path}: refine codes missing; move the index files together or rebuild the index")
    try:
        codes = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # e.g. "mmap length is greater than file size"
        raise IndexConfigError(f"{path}: truncated or unreadable refine codes ({_reason(e)}); rebuild the index") from None
    if dtype is not None and codes.dtype != dtype:
        raise IndexConfigError(f"{path}: refine codes of dtype {codes.dtype}, expected {dtype}; rebuild the index")
    return codes


def merge_refine_codes(quantizer: faiss.Index, shard_paths: list[Path], path: Path) -> None:
    """Join the shards' refine codes into ``<path>.refine.npy`` (row = index id, ids without a vector zero)
    and write the quantizer ``<path>.refine.faiss`` last, which marks the refine stage complete."""
    code_size = quantizer.sa_code_size()
    dtype = np.dtype([("id", "<i8"), ("code", "u1", (code_size,))])
    shards = [_load_codes(shard_refine_path(p), dtype) for p in map(Path, shard_paths)]
    rows = max((int(s["id"].max()) + 1 for s in shards if len(s)), default=0)
    tmp = tmp_path_for(refine_codes_path(path))
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(rows, code_size))
        step = max(1, _ADD_CHUNK_BYTES // max(code_size, 1))
        for shard in shards:
            for lo in range(0, len(shard), step):
                chunk = shard[lo : lo + step]
                out[chunk["id"]] = chunk["code"]
        out.flush()
        del out, shards
        _fsync(tmp)
        os.replace(tmp, refine_codes_path(path))
        _write_quantizer(quantizer, path)
    except (RuntimeError, OSError) as e:
        raise IndexConfigError(f"{path}: cannot merge refine codes ({_reason(e)}); nothing was replaced") from None
    finally:
        discard(tmp)


def _write_quantizer(quantizer: faiss.Index, path: Path) -> None:
    tmp = tmp_path_for(refine_quantizer_path(path))
    try:
        faiss.write_index(quantizer, str(tmp))
        _fsync(tmp)
        os.replace(tmp, refine_quantizer_path(path))
    finally:
        discard(tmp)


def _write_refined(index: MappedRefine, path: Path) -> None:
    """The base index at ``path``, then beside it its refine codes (a hard link to, or copy of, the mapped
    file, taken first: ``path`` may be the index's own file) and last the quantizer, whose file marks the
    refine stage complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path_for(refine_codes_path(path))
    try:
        try:
            _link_or_copy(index.codes_path, tmp)
            _fsync(tmp)
        except OSError as e:
            raise IndexConfigError(f"{path}: cannot write refine codes ({_reason(e)}); nothing was replaced") from None
        write_index(index.base, path)
        try:
            os.replace(tmp, refine_codes_path(path))
            _write_quantizer(index.quantizer, path)
        except (RuntimeError, OSError) as e:
            raise IndexConfigError(f"{path}: cannot write refine codes ({_reason(e)})") from None
    finally:
        discard(tmp)


def _remove_refine(path: Path) -> None:
    """Remove the refine stage beside ``path`` (quantizer first: without it the codes are never read)."""
    refine_quantizer_path(path).unlink(missing_ok=True)
    refine_codes_path(path).unlink(missing_ok=True)


def read_refine(path: Path, base: faiss.Index) -> MappedRefine:
    """``base`` (read from ``path``) with the refine stage beside it: codes memory-mapped, checked against it."""
    quantizer_path, codes_path = refine_quantizer_path(path), refine_codes_path(path)
    try:
        quantizer = faiss.read_index(str(quantizer_path))
    except RuntimeError as e:
        raise IndexConfigError(f"{quantizer_path}: not a readable refine quantizer ({_reason(e)})") from None
    codes = _load_codes(codes_path, np.dtype(np.uint8))
    shape = (quantizer.sa_code_size(),)
    if quantizer.d != base.d or quantizer.metric_type != base.metric_type:
        raise IndexConfigError(f"{quantizer_path}: refine quantizer of d={quantizer.d} does not match index {path.name} "
                               f"(d={base.d}); rebuild the index")
    if codes.ndim != 2 or codes.shape[1:] != shape or len(codes) < base.ntotal:
        raise IndexConfigError(f"{codes_path}: refine codes of shape {codes.shape} cannot hold {base.ntotal:,} vectors "
                               f"of {shape[0]} bytes; rebuild the index")
    read_at_random(codes)  # a shortlist row lies in one page
    return MappedRefine(base, quantizer, codes, codes_path=codes_path.resolve())


def _require_empty_ivf(index: faiss.Index, path: Path) -> None:
    if faiss.try_extract_index_ivf(index) is None:
        raise IndexConfigError(f"{path}: not an IVF index; shards and on-disk lists need index=ivfpq")
    if index.ntotal:
        raise IndexConfigError(f"{path}: holds {index.ntotal:,} vectors; expected an empty trained index")


def _trained_state(index: faiss.Index) -> tuple[str, str]:
    """What the codes of an IVF index depend on: its shape, readable, and a hash of its centroids."""
    ivf = faiss.extract_index_ivf(index)
    metric = {v: k for k, v in METRICS.items()}.get(ivf.metric_type, ivf.metric_type)
    shape = f"d={ivf.d} nlist={ivf.nlist} code_size={ivf.code_size} metric={metric}"
    digest = hashlib.sha1(np.ascontiguousarray(ivf.quantizer.reconstruct_n(0, ivf.nlist)).tobytes())
    pq = getattr(ivf, "pq", None)
    if pq is not None:
        digest.update(faiss.vector_to_array(pq.centroids).tobytes())
    return shape, digest.hexdigest()


def populate_shard(trained_path: Path, vectors: np.ndarray, ids: np.ndarray, path: Path,
                   use_gpu: bool = False) -> int:
    """Fill a copy of the empty trained IVF index ``trained_path`` with ``vectors`` under ``ids``; write ``path``.

    A shard needs nothing but the trained index and its own vectors and global
    ids, so separate processes or machines can fill shards independently;
    :func:`merge_shards` joins them. The write is atomic. Returns the number
    of vectors in the shard. A refined index's shard also writes its refine codes, with their ids, to
    ``<shard>.refine-shard.npy`` (first: the shard file marks the shard complete).
    """
    index, refine = refine_parts(read_index(trained_path))
    _require_empty_ivf(index, trained_path)
    if refine is not None:
        encode_refine_rows(refine, vectors, ids, shard_refine_path(path))
    index = to_device(index, use_gpu)
    add_with_ids(index, vectors, ids)
    write_index(index, path)
    return int(index.ntotal)


def shard_is_complete(path: Path, expected: int, refined: bool = False) -> bool:
    """True when shard file ``path`` holds ``expected`` vectors and, when ``refined``, as many refine codes."""
    if read_index(path, mmap=True).ntotal != expected:
        return False
    return not refined or _has_refine_codes(path, expected)


def _has_refine_codes(shard: Path, expected: int) -> bool:
    """True when the refine codes beside shard file ``shard`` are readable and ``expected`` rows long."""
    try:
        return len(_load_codes(shard_refine_path(shard))) == expected
    except IndexConfigError:
        return False


def merge_shards(trained_path: Path, shard_paths: list[Path], path: Path, on_disk: bool = True) -> faiss.Index:
    """Join shard files of :func:`populate_shard` into one index at ``path``; ids are kept. Returns it.

    ``on_disk``: FAISS's ``merge_ondisk`` writes the inverted lists to
    ``<name>.ivfdata`` beside ``path`` (through temporary names, the index
    file renamed last) and the result is read back memory-mapped, so it may
    exceed RAM. Otherwise the lists are merged in memory into an ordinary
    index file. Every shard must have been filled from the same trained index
    (same shape and centroids); otherwise IndexConfigError names the shard.
    A refined trained index (``IndexRefine``) also joins the shards' refine codes into
    ``<name>.refine.npy`` (:func:`merge_refine_codes`); the result is then a :class:`MappedRefine`.
    """
    path, trained_path = Path(path), Path(trained_path)
    trained, refine = refine_parts(read_index(trained_path))
    _require_empty_ivf(trained, trained_path)
    shape, centroids = _trained_state(trained)
    for shard in map(Path, shard_paths):
        if not shard.is_file():
            raise IndexConfigError(f"{shard}: index shard missing; populate it before merging")
        populated = read_index(shard, mmap=True)
        state = _trained_state(populated)
        if state[0] != shape:
            raise IndexConfigError(f"{shard}: shard of an index with {state[0]}, but {trained_path.name} has {shape}")
        if state[1] != centroids:
            raise IndexConfigError(f"{shard}: populated from another trained index than {trained_path.name} "
                                   "(centroids differ); delete the shard to populate it again")
        if refine is not None and not _has_refine_codes(shard, populated.ntotal):
            raise IndexConfigError(f"{shard_refine_path(shard)}: refine codes do not match shard {shard.name}; "
                                   "delete the shard to populate it again")
    if not on_disk:
        for shard in shard_paths:
            trained.merge_from(read_index(shard), 0)
        write_index(trained, path)
    else:
        _merge_on_disk(trained, shard_paths, path)
        trained = read_index(path)
    if refine is None:
        return trained
    merge_refine_codes(refine, shard_paths, path)
    return read_index(path)


def _merge_on_disk(trained: faiss.Index, shard_paths: list[Path], path: Path) -> None:
    """FAISS's ``merge_ondisk`` of the shards into ``path`` + ``<name>.ivfdata``, committed atomically."""
    lists_tmp = tmp_path_for(ivfdata_path(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        sweep_temporaries(path.parent)
        _remove_refine(path)
        merge_ondisk(trained, [str(shard) for shard in shard_paths], str(lists_tmp))
        _commit_on_disk(trained, path, lists_tmp)
    except (RuntimeError, OSError) as e:  # e.g. no space left on device
        raise IndexConfigError(f"{path}: cannot merge index shards ({_reason(e)}); nothing was replaced") from None
    finally:
        del trained  # unmaps the lists written
        discard(lists_tmp)


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
    """``index`` on GPU 0 when asked and possible, else on CPU (always for on-disk and refined indices).

    GPU FAISS has no plain PQ index and limits IVF-PQ (``nbits == 8``, some
    code sizes, lookup tables in shared memory); a failed copy is retried with
    float16 lookup tables, then falls back to the CPU index with a warning.
    """
    if not use_gpu:
        return to_cpu(index)
    if is_gpu_index(index):
        return index
    if is_on_disk(index):
        logger.info("index: on-disk inverted lists are searched memory-mapped, on CPU")
        return index
    if is_refined(index):
        logger.info("index: a refined index (IndexRefine) is searched on CPU (its GPU copy is not supported here)")
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
    """Serialised size in bytes (the file size ``write_index`` would give, plus the ``.ivfdata`` of an on-disk index
    and the refine codes of a :class:`MappedRefine`)."""
    if isinstance(index, MappedRefine):
        return index_nbytes(index.base) + int(index.codes.nbytes) + int(faiss.serialize_index(index.quantizer).nbytes)
    lists = _on_disk_lists(index)
    return int(faiss.serialize_index(to_cpu(index)).nbytes) + (int(lists.totsize) if lists is not None else 0)


def index_spec(cfg) -> IndexSpec:
    """The :class:`IndexSpec` of an ``index`` config group (configs/index/*.yaml)."""
    return IndexSpec(kind=cfg.kind, m=int(cfg.get("m", 16)), nlist=int(cfg.get("nlist", 256)),
                     nbits=int(cfg.get("nbits", 8)), nprobe=int(cfg.get("nprobe", 256)),
                     metric=str(cfg.metric), refine=str(cfg.get("refine", "none")),
                     k_factor=float(cfg.get("k_factor", 4)))
