"""Image search over a patch index: nearest patches, then max per image.

The index holds one row per patch; ``patch_image[row]`` says which image a
row belongs to. An image's score is the max over its patches of the
similarity to the query, and the patch giving that max is its winner. The
index's ids are the row numbers, or (sharded indices) ``image * P + slot``:
``row_of_id`` maps those back to rows, or :meth:`PatchOwners.by_id` reads
the image from the id itself (no per-patch table in RAM).
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
from loguru import logger

from .index import IndexConfigError, is_gpu_index, to_cpu

#: Largest k a GPU FAISS search accepts (``GPU_MAX_SELECTION_K``).
GPU_MAX_K = 2048


@dataclass
class ImageHits:
    """Top-k images per query, best first.

    Rows past the images that exist hold image -1, patch -1 and score -inf.
    """

    images: np.ndarray  #: (nq, k) int64 image index
    scores: np.ndarray  #: (nq, k) float32 similarity, higher is better, descending
    patches: np.ndarray  #: (nq, k) int64 row id of the winning patch
    boxes: np.ndarray | None = None  #: (nq, k, 4) predicted boxes when a stage replaced the patches' (src/patchify/rerank.py)


@dataclass(frozen=True)
class PatchOwners:
    """Which image each index id belongs to, and what search needs to know of that, computed once per
    gallery: a search then costs what FAISS costs plus O(queries x patches asked for), whatever the
    gallery's size. Build it when the index is loaded and pass it to every search.

    Two forms: :meth:`of` a table of each row's image (int32 below 2**31 images: 4 B per patch), or
    :meth:`by_id` no table at all, for indexes whose ids are ``image * per_image + slot`` (sharded and
    on-disk builds, ``indexing.patch_ids``): the image is ``id // per_image``. At 1M L3 images the table
    is 120 MB next to the PQ index's 2.2 GB; the second form keeps a serving process at the index's size.
    """

    image: np.ndarray | None  #: (ntotal,) image index of every row; None for the by-id form
    n_images: int      #: images with at least one row
    most_rows: int     #: rows of the image with the most
    per_image: int = 0  #: by-id form: ids are ``image * per_image + slot``

    @classmethod
    def of(cls, patch_image: np.ndarray) -> PatchOwners:
        image = np.asarray(patch_image)
        if image.ndim != 1:
            raise IndexConfigError(f"search: patch_image must be one image index per row, got shape {image.shape}")
        if image.size and image.min() < 0:
            raise IndexConfigError("search: patch_image holds negative image indices")
        counts = np.bincount(image) if image.size else np.zeros(0, np.int64)
        dtype = np.int32 if counts.size < np.iinfo(np.int32).max else np.int64
        return cls(np.ascontiguousarray(image, dtype=dtype), int(np.count_nonzero(counts)),
                   int(counts.max()) if counts.size else 0)

    @classmethod
    def by_id(cls, per_image: int, n_images: int) -> PatchOwners:
        """Owners of an index whose ids are ``image * per_image + slot`` (``n_images`` of them indexed)."""
        if per_image < 1 or n_images < 0:
            raise IndexConfigError(f"search: {per_image} patches per image and {n_images} images: both must be >= 1")
        return cls(None, int(n_images), int(per_image), int(per_image))

    def image_of(self, ids: np.ndarray) -> np.ndarray:
        """The image (int64) of every id >= 0 in ``ids``; -1 where the id is -1."""
        valid = ids >= 0
        if self.image is None:
            return np.where(valid, ids // self.per_image, -1)
        return np.where(valid, self.image[np.where(valid, ids, 0)], -1).astype(np.int64, copy=False)


def metric_of(index: faiss.Index) -> str:
    """``"IP"`` or ``"L2"`` from the index's FAISS metric."""
    if index.metric_type == faiss.METRIC_INNER_PRODUCT:
        return "IP"
    if index.metric_type == faiss.METRIC_L2:
        return "L2"
    raise IndexConfigError(f"search: unsupported FAISS metric type {index.metric_type}")


def similarity_from_distance(distances: np.ndarray, metric: str) -> np.ndarray:
    """FAISS distances as similarities (higher is better), float32.

    ``IP``: unchanged. ``L2``: FAISS returns the *squared* distance, and for
    unit vectors ``|q - x|^2 = 2 - 2 <q, x>``, so ``1 - d / 2`` is the inner
    product (exact for exact search; approximate codes need not be unit).
    """
    d = np.asarray(distances, dtype=np.float32)
    metric = metric.upper()
    if metric == "IP":
        return d
    if metric == "L2":
        return (1.0 - d / 2.0).astype(np.float32)
    raise IndexConfigError(f"search: unknown metric {metric!r} (choose IP or L2)")


def rows_of_ids(ids: np.ndarray) -> np.ndarray:
    """Inverse of the index id of every row: ``row_of_id[id]`` is the row holding ``id``, -1 for none."""
    ids = np.asarray(ids, dtype=np.int64)
    if ids.size and ids.min() < 0:
        raise IndexConfigError("search: patch ids must be distinct and >= 0")
    row_of_id = np.full(int(ids.max()) + 1 if ids.size else 0, -1, dtype=np.int64)
    row_of_id[ids] = np.arange(len(ids))
    if np.count_nonzero(row_of_id >= 0) != len(ids):
        raise IndexConfigError("search: patch ids must be distinct and >= 0")
    return row_of_id


def _score_then_id_order(s: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Per row, the positions sorted by score descending, then id ascending, missing results (id -1) last.

    One argsort of an int64 key (the float32 score mapped to an order-preserving integer in the high
    32 bits, the id in the low 32), several times faster than ``np.lexsort`` on the short rows a search
    returns; ids of 2**32 or more (over 143M images at 30 patches) take the lexsort."""
    if ids.size and int(ids.max()) >= (1 << 32) - 1:
        return np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int64).max), -s), axis=1)
    bits = np.ascontiguousarray(s, dtype=np.float32).view(np.int32).astype(np.int64)
    ordered = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # IEEE-754 float order as signed 32-bit integers
    descending = ((1 << 31) - 1 - ordered).astype(np.uint64)  # 0 .. 2**32 - 1, best score first
    key = (descending << np.uint64(32)) | np.where(ids >= 0, ids, (1 << 32) - 1).astype(np.uint64)
    return np.argsort(key, axis=1)


def _aggregate(
    sims: np.ndarray, ids: np.ndarray, owners: PatchOwners, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Max per image over each row of patch results -> (images, scores, patches).

    Rows are re-sorted by (similarity desc, row id asc), so the first
    occurrence of an image is its max, ties going to the lower row id; ids
    of -1 (no result) are ignored.
    """
    nq, kp = ids.shape
    valid = ids >= 0
    s = np.where(valid, sims, -np.inf).astype(np.float32)
    # FAISS already sorts by score; re-sort only rows with ties, or with
    # missing results before valid ones.
    in_order = ((s[:, 1:] < s[:, :-1]) | ~valid[:, 1:]).all(axis=1)
    in_order &= (valid[:, 1:] <= valid[:, :-1]).all(axis=1)
    redo = np.flatnonzero(~in_order)
    if redo.size:
        order = _score_then_id_order(s[redo], np.where(valid[redo], ids[redo], -1))
        ids, s, valid = ids.copy(), s.copy(), valid.copy()
        ids[redo] = np.take_along_axis(ids[redo], order, axis=1)
        s[redo] = np.take_along_axis(s[redo], order, axis=1)
        valid[redo] = np.take_along_axis(valid[redo], order, axis=1)
    img = owners.image_of(np.where(valid, ids, -1))

    # First occurrence of each image in a row: sort by (image, position),
    # keep the head of each run, scatter the flags back to ranked positions.
    by_img = np.argsort(img * kp + np.arange(kp), axis=1)
    img_sorted = np.take_along_axis(img, by_img, axis=1)
    head = np.ones_like(img_sorted, dtype=bool)
    head[:, 1:] = img_sorted[:, 1:] != img_sorted[:, :-1]
    first = np.empty_like(head)
    np.put_along_axis(first, by_img, head, axis=1)
    first &= valid

    rank = np.cumsum(first, axis=1) - 1
    r, c = np.nonzero(first & (rank < k))
    out_img = np.full((nq, k), -1, dtype=np.int64)
    out_score = np.full((nq, k), -np.inf, dtype=np.float32)
    out_patch = np.full((nq, k), -1, dtype=np.int64)
    slot = rank[r, c]
    out_img[r, slot] = img[r, c]
    out_score[r, slot] = s[r, c]
    out_patch[r, slot] = ids[r, c]
    return out_img, out_score, out_patch


def search_images(
    index: faiss.Index,
    queries: np.ndarray,
    patch_image: np.ndarray | PatchOwners,
    k: int,
    metric: str | None = None,
    initial_factor: int = 4,
    row_of_id: np.ndarray | None = None,
) -> ImageHits:
    """Top-``k`` images for each query (nq, d), scored by their best patch.

    Asks FAISS for ``kp = min(ntotal, k * initial_factor)`` patches (and no
    more than ``k`` times the most patches any image has), takes the max
    per image, and searches again with ``kp`` doubled for the queries that
    hold fewer than ``min(k, n_images)`` distinct images, until they are full
    or ``kp == ntotal``. An IVF index with ``nprobe < nlist`` may then still
    return fewer images than exist; those are returned with a warning.

    ``patch_image``: the image of every row, best as :class:`PatchOwners` built once per gallery (an
    array is summarised on every call, O(gallery)); with :meth:`PatchOwners.by_id` the returned
    ``patches`` are the index's ids, not rows. ``metric`` defaults to the index's own; a different
    one is an error.
    ``row_of_id`` (from :func:`rows_of_ids`) maps the index's ids to rows
    when they are not the row numbers. Ties keep the lower row first. On a
    GPU index, searches with ``kp > 2048`` (the GPU limit) run on a CPU copy
    of the index.
    """
    index_metric = metric_of(index)
    if metric is not None and metric.upper() != index_metric:
        raise IndexConfigError(f"search: metric {metric} does not match the index's {index_metric}")
    if k < 1 or initial_factor < 1:
        raise ValueError(f"search: k={k} and initial_factor={initial_factor} must be >= 1")
    q = np.asarray(queries)
    if q.ndim != 2 or q.shape[1] != index.d:
        raise IndexConfigError(
            f"search: query shape {q.shape} does not match index dimension {index.d}"
        )
    q = np.ascontiguousarray(q, dtype=np.float32)
    owners = patch_image if isinstance(patch_image, PatchOwners) else PatchOwners.of(patch_image)
    ntotal = int(index.ntotal)
    if owners.image is not None and owners.image.shape != (ntotal,):
        raise IndexConfigError(
            f"search: patch_image has {owners.image.size} entries, index has {ntotal} rows"
        )
    if owners.image is None and row_of_id is not None:
        raise IndexConfigError("search: owners by id (PatchOwners.by_id) read the index's ids; give no row_of_id")

    nq = len(q)
    images = np.full((nq, k), -1, dtype=np.int64)
    scores = np.full((nq, k), -np.inf, dtype=np.float32)
    patches = np.full((nq, k), -1, dtype=np.int64)
    if nq == 0 or ntotal == 0:
        return ImageHits(images, scores, patches)

    target = min(k, owners.n_images)
    kp = min(ntotal, k * initial_factor, k * owners.most_rows)
    todo = np.arange(nq)
    cpu_copy: list[faiss.Index] = []

    def knn(x: np.ndarray, kk: int) -> tuple[np.ndarray, np.ndarray]:
        if is_gpu_index(index) and kk > GPU_MAX_K:
            if not cpu_copy:
                logger.info("search: k={} patches exceeds the GPU limit {}; using a CPU copy", kk, GPU_MAX_K)
                cpu_copy.append(to_cpu(index))
            dist, ids = cpu_copy[0].search(x, kk)
        else:
            dist, ids = index.search(x, kk)
        if row_of_id is None:
            return dist, ids
        known = (ids >= 0) & (ids < len(row_of_id))
        rows = np.where(known, row_of_id[np.where(known, ids, 0)], -1)
        if (rows[ids >= 0] < 0).any():
            raise IndexConfigError("search: the index returned ids no gallery patch has; index and gallery table differ")
        return dist, rows

    unreachable = 0  # queries whose probed lists hold fewer than k images
    while True:
        dist, ids = knn(q[todo], kp)
        sims = similarity_from_distance(dist, index_metric)
        images[todo], scores[todo], patches[todo] = _aggregate(sims, ids, owners, k)
        short = (images[todo] >= 0).sum(axis=1) < target
        # FAISS pads with -1 once every patch it can reach (an IVF's probed lists) is returned: asking for
        # more patches cannot find more images for those queries
        exhausted = short & (ids[:, -1] < 0)
        unreachable += int(exhausted.sum())
        short &= ~exhausted
        if not short.any() or kp >= ntotal:
            unreachable += int(short.sum())
            break
        todo = todo[short]
        kp = min(ntotal, 2 * kp)
        logger.debug("search: widening to {} patches for {} queries", kp, len(todo))
    if unreachable:
        logger.warning("search: {} of {} queries found fewer than {} images: every patch the index reaches for "
                       "them was returned (approximate index, e.g. nprobe < nlist); returning what was found",
                       unreachable, nq, target)
    return ImageHits(images, scores, patches)
