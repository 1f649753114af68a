"""Tests for patchify.search: max-per-image aggregation over patch search results."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

import patchify.search as search_mod
from patchify.index import IndexConfigError
from patchify.search import ImageHits, search_images, similarity_from_distance


class Spy:
    """Wraps a FAISS index, records every search, optionally blanks some ids."""

    def __init__(self, index: faiss.Index, blank_rows: tuple[int, ...] = (), max_k: int | None = None):
        self.index, self.blank_rows, self.max_k = index, blank_rows, max_k
        self.calls: list[tuple[int, int]] = []
        self.d, self.ntotal, self.metric_type = index.d, index.ntotal, index.metric_type

    def search(self, x: np.ndarray, k: int):
        assert self.max_k is None or k <= self.max_k, f"k={k} above {self.max_k}"
        self.calls.append((len(x), k))
        dist, ids = self.index.search(x, k)
        blank = np.isin(ids, self.blank_rows)
        # A blanked result carries a distance that would win if it were used.
        return np.where(blank, np.float32(1e30), dist), np.where(blank, -1, ids)


def scalar_gallery(rows: list[tuple[int, float]], metric: int = faiss.METRIC_INNER_PRODUCT):
    """Index of 2-D patches (s, 0): with query (1, 0) a patch scores exactly s."""
    x = np.array([[s, 0.0] for _, s in rows], dtype=np.float32)
    index = faiss.IndexFlat(2, metric)
    index.add(x)
    return index, np.array([img for img, _ in rows], dtype=np.int64)


Q = np.array([[1.0, 0.0]], dtype=np.float32)

# (image, score) per row, images interleaved so the mapping matters.
GALLERY = [
    (0, 0.2), (3, 0.4), (1, 0.95), (0, 0.9), (2, 0.3),
    (3, 0.85), (0, 0.5), (1, 0.1), (3, 0.86),
]  # best per image: 1 -> 0.95 (row 2), 0 -> 0.9 (row 3), 3 -> 0.86 (row 8), 2 -> 0.3 (row 4)


def test_max_aggregation_and_winning_patch():
    index, patch_image = scalar_gallery(GALLERY)
    hits = search_images(index, Q, patch_image, k=3)
    assert isinstance(hits, ImageHits)
    assert hits.images.tolist() == [[1, 0, 3]]
    assert hits.patches.tolist() == [[2, 3, 8]]
    np.testing.assert_allclose(hits.scores, [[0.95, 0.9, 0.86]], rtol=1e-6)
    assert hits.images.dtype == np.int64 and hits.patches.dtype == np.int64
    assert hits.scores.dtype == np.float32


def test_fewer_images_than_k_pads_with_minus_one():
    index, patch_image = scalar_gallery(GALLERY)
    hits = search_images(index, Q, patch_image, k=6)
    assert hits.images.tolist() == [[1, 0, 3, 2, -1, -1]]
    assert hits.patches.tolist() == [[2, 3, 8, 4, -1, -1]]
    assert np.isneginf(hits.scores[0, 4:]).all()


def test_widens_until_k_distinct_images():
    # Image 0 owns the 20 best patches; images 1..5 have one weaker patch each.
    rows = [(0, 0.99 - 0.01 * i) for i in range(20)] + [(i, 0.7 - 0.1 * i) for i in range(1, 6)]
    index, patch_image = scalar_gallery(rows)
    spy = Spy(index)
    queries = np.array([[1.0, 0.0], [-1.0, 0.0]], dtype=np.float32)  # 2nd query: weakest first
    hits = search_images(spy, queries, patch_image, k=3, initial_factor=1)
    assert hits.images.tolist() == [[0, 1, 2], [5, 4, 3]]
    assert hits.patches.tolist() == [[0, 20, 21], [24, 23, 22]]
    # First pass asks for 3 patches (all image 0 for query 0); only the
    # short query is searched again, with the number of patches doubled.
    assert spy.calls == [(2, 3), (1, 6), (1, 12), (1, 24)]


def test_first_pass_capped_by_largest_image():
    # One patch per image: k patches always hold k distinct images.
    index, patch_image = scalar_gallery([(i, 0.01 * i) for i in range(50)])
    spy = Spy(index)
    hits = search_images(spy, Q, patch_image, k=5, initial_factor=4)
    assert spy.calls == [(1, 5)]
    assert hits.images.tolist() == [[49, 48, 47, 46, 45]]


def test_minus_one_ids_are_ignored():
    index, patch_image = scalar_gallery(GALLERY)
    spy = Spy(index, blank_rows=(2,))  # FAISS "no result" in place of image 1's best patch
    hits = search_images(spy, Q, patch_image, k=4)
    assert hits.images.tolist() == [[0, 3, 2, 1]]
    assert hits.patches.tolist() == [[3, 8, 4, 7]]
    np.testing.assert_allclose(hits.scores, [[0.9, 0.86, 0.3, 0.1]], rtol=1e-6)


def test_ties_keep_lower_row_first():
    rows = [(2, 0.5), (1, 0.5), (0, 0.5), (3, 0.75), (3, 0.75), (4, 0.25)]
    index, patch_image = scalar_gallery(rows)
    hits = search_images(index, Q, patch_image, k=5)
    assert hits.images.tolist() == [[3, 2, 1, 0, 4]]
    assert hits.patches.tolist() == [[3, 0, 1, 2, 5]]


def test_matches_brute_force_on_random_gallery():
    rng = np.random.default_rng(0)
    counts = rng.integers(1, 31, size=60)  # 1..30 patches per image, like L0..L3
    patch_image = rng.permutation(np.repeat(np.arange(60), counts)).astype(np.int64)
    x = rng.standard_normal((len(patch_image), 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = rng.standard_normal((8, 16)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    sims = q @ x.T
    best = np.full((8, 60), -np.inf)
    winner = np.zeros((8, 60), dtype=np.int64)
    for row, img in enumerate(patch_image):
        better = sims[:, row] > best[:, img]
        best[better, img], winner[better, img] = sims[better, row], row
    index = faiss.IndexFlatIP(16)
    index.add(x)
    for k in (1, 10, 60, 75):
        hits = search_images(index, q, patch_image, k=k, metric="IP")
        order = np.argsort(-best, axis=1, kind="stable")[:, :k]
        kk = min(k, 60)
        np.testing.assert_array_equal(hits.images[:, :kk], order)
        np.testing.assert_array_equal(hits.patches[:, :kk], np.take_along_axis(winner, order, 1))
        np.testing.assert_allclose(hits.scores[:, :kk], np.take_along_axis(best, order, 1), atol=1e-5)
        assert (hits.images[:, kk:] == -1).all()


def test_l2_index_gives_same_hits_on_unit_vectors():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[:5] + 0.1 * rng.standard_normal((5, 8)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    patch_image = np.arange(300, dtype=np.int64) // 6
    ip, l2 = faiss.IndexFlatIP(8), faiss.IndexFlatL2(8)
    ip.add(x)
    l2.add(x)
    a = search_images(ip, q, patch_image, k=10)
    b = search_images(l2, q, patch_image, k=10, metric="L2")
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.patches, b.patches)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    with pytest.raises(IndexConfigError, match="metric IP does not match the index's L2"):
        search_images(l2, q, patch_image, k=10, metric="IP")


def test_similarity_from_distance():
    d = np.array([[0.0, 2.0, 4.0]], dtype=np.float32)
    np.testing.assert_array_equal(similarity_from_distance(d, "IP"), d)
    np.testing.assert_array_equal(similarity_from_distance(d, "l2"), [[1.0, 0.0, -1.0]])
    with pytest.raises(IndexConfigError):
        similarity_from_distance(d, "cosine")


def test_ivf_missing_patches_return_what_exists(warnings_log):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((400, 8)).astype(np.float32)
    index = faiss.index_factory(8, "IVF8,Flat", faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = 1
    index.train(x)
    index.add(x)
    index.nprobe = 1  # one list of eight: most rows are never seen
    patch_image = np.arange(400, dtype=np.int64) // 4  # 100 images
    hits = search_images(index, x[:3], patch_image, k=100)
    found = hits.images >= 0
    assert 0 < found.sum(axis=1).max() < 100
    for row, ok in zip(hits.images, found):
        assert len(set(row[ok])) == ok.sum()  # distinct images
        assert (row[~ok] == -1).all() and ok[: ok.sum()].all()  # padding at the end
    assert (np.diff(hits.scores[found[:, 0]][:, :5], axis=1) <= 0).all()
    assert len(warnings_log) == 1 and "nprobe < nlist" in warnings_log[0]


def test_widening_stops_once_the_probed_lists_are_exhausted(warnings_log):
    """When FAISS pads with -1, every patch the probed lists hold was returned: asking for more cannot
    reach more images, so the search stops there instead of doubling up to the whole index."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4000, 8)).astype(np.float32)
    ivf = faiss.index_factory(8, "IVF16,Flat", faiss.METRIC_INNER_PRODUCT)
    ivf.train(x)
    ivf.add(x)
    ivf.nprobe = 1  # about 250 of 4,000 patches reachable per query
    spy = Spy(ivf)
    patch_image = np.arange(4000, dtype=np.int64) // 4  # 1,000 images
    hits = search_images(spy, x[:3], patch_image, k=300)  # asks 1,200 patches: more than one list holds
    assert spy.calls == [(3, 1200)]  # one search, no widening to 2,400, then 4,000
    full = search_images(ivf, x[:3], patch_image, k=1000)  # same images as asking for everything
    for row in range(3):
        found = hits.images[row][hits.images[row] >= 0]
        assert 0 < len(found) < 300 and found.tolist() == full.images[row][: len(found)].tolist()
    assert len(warnings_log) == 2 and all("every patch the index reaches" in w for w in warnings_log)


def test_tie_order_equals_lexsort_by_score_then_id():
    rng = np.random.default_rng(5)
    values = np.array([-np.inf, -1.5, -1e-30, 0.0, 1e-30, 0.25, 0.7, np.nextafter(np.float32(0.7), 1), 3.0],
                      np.float32)
    for _ in range(200):
        ids = rng.integers(-1, 1 << 31, (3, int(rng.integers(1, 40))))
        s = np.where(ids >= 0, rng.choice(values, ids.shape), -np.inf).astype(np.float32)
        got = search_mod._score_then_id_order(s, ids)
        ref = np.lexsort((np.where(ids >= 0, ids, np.iinfo(np.int64).max), -s), axis=1)
        np.testing.assert_array_equal(np.take_along_axis(s, got, 1), np.take_along_axis(s, ref, 1))
        np.testing.assert_array_equal(np.take_along_axis(ids, got, 1), np.take_along_axis(ids, ref, 1))


def test_gpu_index_above_2048_patches_searches_a_cpu_copy(monkeypatch):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3000, 8)).astype(np.float32)
    cpu = faiss.IndexFlatIP(8)
    cpu.add(x)
    patch_image = np.arange(3000, dtype=np.int64) // 2
    gpu = Spy(cpu, max_k=2048)  # stands in for a GPU index and its k limit
    monkeypatch.setattr(search_mod, "is_gpu_index", lambda index: index is gpu)
    monkeypatch.setattr(search_mod, "to_cpu", lambda index: index.index)
    small = search_images(gpu, x[:2], patch_image, k=100)  # 400 patches: on the "GPU"
    assert gpu.calls == [(2, 200)]
    big = search_images(gpu, x[:2], patch_image, k=600)  # 1200 <= 2048 patches, still GPU
    assert gpu.calls[-1] == (2, 1200)
    huge = search_images(gpu, x[:2], patch_image, k=1200)  # 2400 > 2048: CPU copy
    assert len(gpu.calls) == 2
    ref = search_images(cpu, x[:2], patch_image, k=1200)
    np.testing.assert_array_equal(huge.images, ref.images)
    assert small.images.shape == (2, 100) and big.images.shape == (2, 600)


def test_input_validation():
    index, patch_image = scalar_gallery(GALLERY)
    with pytest.raises(IndexConfigError, match="patch_image has 8 entries, index has 9 rows"):
        search_images(index, Q, patch_image[:-1], k=3)
    with pytest.raises(IndexConfigError, match="index dimension 2"):
        search_images(index, np.zeros((1, 3), np.float32), patch_image, k=3)
    with pytest.raises(ValueError, match="k=0"):
        search_images(index, Q, patch_image, k=0)


def test_empty_index_and_no_queries():
    empty = faiss.IndexFlatIP(2)
    hits = search_images(empty, Q, np.zeros(0, np.int64), k=3)
    assert hits.images.tolist() == [[-1, -1, -1]] and np.isneginf(hits.scores).all()
    index, patch_image = scalar_gallery(GALLERY)
    hits = search_images(index, np.zeros((0, 2), np.float32), patch_image, k=3)
    assert hits.images.shape == (0, 3)


def test_patch_owners_built_once_give_the_same_hits_without_per_query_gallery_work(monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 8)).astype(np.float32)
    index = faiss.IndexFlatIP(8)
    index.add(x)
    patch_image = rng.integers(0, 40, 600)
    queries = rng.standard_normal((5, 8)).astype(np.float32)
    expected = search_images(index, queries, patch_image, k=10)
    owners = search_mod.PatchOwners.of(patch_image)
    assert (owners.n_images, owners.most_rows) == (len(np.unique(patch_image)), np.bincount(patch_image).max())

    def gallery_pass(*args, **kwargs):
        raise AssertionError("a search summarised the whole gallery again")

    monkeypatch.setattr(search_mod.np, "bincount", gallery_pass)
    for row in range(len(queries)):  # single queries, as task=search runs them
        hits = search_images(index, queries[row:row + 1], owners, k=10)
        assert np.array_equal(hits.images[0], expected.images[row])
        assert np.array_equal(hits.patches[0], expected.patches[row])
        assert np.allclose(hits.scores[0], expected.scores[row])


def test_patch_owners_refuse_negative_or_misshapen_tables():
    with pytest.raises(IndexConfigError, match="negative"):
        search_mod.PatchOwners.of(np.array([0, -1]))
    with pytest.raises(IndexConfigError, match="one image index per row"):
        search_mod.PatchOwners.of(np.zeros((2, 2), np.int64))


def test_owners_by_id_equal_the_table_with_no_table_in_ram():
    """Ids image * P + slot (sharded builds, unreadable images leaving gaps): reading the image from the id
    gives the hits of the row table, patches returned as ids, and holds no per-patch array."""
    rng = np.random.default_rng(3)
    per_image, images = 5, np.array([0, 1, 3, 4, 7, 8, 9])  # images 2, 5, 6 unreadable: no rows
    ids = (images[:, None] * per_image + np.arange(per_image)).ravel()
    x = rng.standard_normal((len(ids), 8)).astype(np.float32)
    x[::7] = x[1]  # ties across images: the lower id wins both ways
    index = faiss.IndexIDMap(faiss.IndexFlatIP(8))
    index.add_with_ids(x, ids)
    queries = rng.standard_normal((6, 8)).astype(np.float32)
    queries[0] = x[1]
    owners = search_mod.PatchOwners.by_id(per_image, len(images))
    assert owners.image is None
    for k in (1, 3, 7, 10):
        by_id = search_images(index, queries, owners, k)
        by_row = search_images(index, queries, np.repeat(images, per_image), k, row_of_id=search_mod.rows_of_ids(ids))
        assert np.array_equal(by_id.images, by_row.images) and np.allclose(by_id.scores, by_row.scores)
        found = by_row.patches >= 0
        assert np.array_equal(by_id.patches[found], ids[by_row.patches[found]]) and (by_id.patches[~found] == -1).all()
    with pytest.raises(IndexConfigError, match="give no row_of_id"):
        search_images(index, queries, owners, 3, row_of_id=search_mod.rows_of_ids(ids))


def test_the_row_table_is_int32_below_two_billion_images():
    owners = search_mod.PatchOwners.of(np.repeat(np.arange(1000), 30))
    assert owners.image.dtype == np.int32 and (owners.n_images, owners.most_rows) == (1000, 30)
