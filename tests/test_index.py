"""Tests for patchify.index: specs, validation, accuracy against exact search, files."""

from __future__ import annotations

import re
from pathlib import Path

import faiss
import numpy as np
import pytest

from patchify.index import (
    IndexConfigError,
    IndexSpec,
    add_vectors,
    check_training_size,
    create_index,
    gpu_available,
    index_nbytes,
    is_refined,
    quantised_part,
    read_index,
    set_nprobe,
    set_search_params,
    to_device,
    train_index,
    write_index,
)

D = 64


def clustered(seed: int, n: int = 5000, d: int = D, n_clusters: int = 20, nq: int = 500):
    """Unit vectors around ``n_clusters`` random centres, and jittered copies of some."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, d))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = centers[rng.integers(n_clusters, size=n)] + 0.5 * rng.standard_normal((n, d)) / np.sqrt(d)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.choice(n, nq, replace=False)] + 0.05 * rng.standard_normal((nq, d)) / np.sqrt(d)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return x.astype(np.float32), q.astype(np.float32)


def build(spec: IndexSpec, x: np.ndarray) -> faiss.Index:
    index = create_index(spec, x.shape[1])
    train_index(index, x, spec)
    add_vectors(index, x, 0)
    return index


def top1_and_recall(found: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    top1 = float(np.mean(found[:, 0] == truth[:, 0]))
    recall = float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found, truth)]))
    return top1, recall


pytestmark = pytest.mark.usefixtures("faiss_single_thread")


@pytest.fixture(scope="module")
def data():
    x, q = clustered(seed=0)
    flat = build(IndexSpec("flat"), x)
    _, truth = flat.search(q, 10)
    return x, q, flat, truth


@pytest.fixture(scope="module")
def ivfpq(data):
    x = data[0]
    return build(IndexSpec("ivfpq", m=16, nlist=64, nbits=8, nprobe=64), x)


# --- specs and validation -------------------------------------------------


def test_factory_strings_and_slugs():
    assert IndexSpec("flat").factory_string(384) == "Flat"
    assert IndexSpec("pq").factory_string(384) == "PQ16x8"
    assert IndexSpec("ivfpq").factory_string(384) == "IVF256,PQ16x8"
    assert IndexSpec("IVFPQ", m=64, nlist=8192, nbits=8).factory_string(768) == "IVF8192,PQ64x8"
    assert IndexSpec("ivfpq", metric="ip").slug(384) == "IVF256_PQ16x8.d384.IP"
    assert IndexSpec("pq", nbits=10, metric="L2").slug(64) == "PQ16x10.d64.L2"
    assert IndexSpec("flat").slug(512) == "Flat.d512.IP"
    assert IndexSpec("ivfpq", refine="sq8").factory_string(384) == "IVF256,PQ16x8,Refine(SQ8)"
    assert IndexSpec("pq", refine="flat").factory_string(64) == "PQ16x8,Refine(Flat)"
    assert IndexSpec("ivfpq", refine="SQfp16", k_factor=8).slug(384) == "IVF256_PQ16x8_RefineSQfp16.d384.IP"
    assert IndexSpec("flat", refine=None).refine == "none"
    assert not IndexSpec("flat").needs_training()
    assert IndexSpec("pq").needs_training() and IndexSpec("ivfpq").needs_training()


def test_factory_strings_build_matching_faiss_indices():
    assert isinstance(create_index(IndexSpec("flat"), 8), faiss.IndexFlat)
    pq = create_index(IndexSpec("pq", m=4, nbits=6, metric="L2"), 8)
    assert isinstance(pq, faiss.IndexPQ) and pq.pq.M == 4 and pq.pq.nbits == 6
    assert pq.metric_type == faiss.METRIC_L2
    ivf = create_index(IndexSpec("ivfpq", m=4, nlist=32, nprobe=8), 8)
    assert isinstance(ivf, faiss.IndexIVFPQ) and ivf.nlist == 32 and ivf.nprobe == 8
    assert ivf.metric_type == faiss.METRIC_INNER_PRODUCT


def test_m_not_dividing_d_names_both_numbers():
    with pytest.raises(IndexConfigError, match=r"m=48 does not divide feature dimension 100"):
        IndexSpec("pq", m=48).factory_string(100)
    with pytest.raises(IndexConfigError, match=r"m=7 .* 64"):
        create_index(IndexSpec("ivfpq", m=7), 64)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(kind="hnsw"), "unknown kind 'hnsw'"),
        (dict(kind="pq", metric="cosine"), "unknown metric 'cosine'"),
        (dict(kind="pq", nbits=0), "nbits=0"),
        (dict(kind="pq", nbits=17), "nbits=17"),
        (dict(kind="ivfpq", nlist=0), "nlist=0"),
        (dict(kind="ivfpq", nprobe=0), "nprobe=0"),
        (dict(kind="ivfpq", refine="SQ4x"), "unknown refine 'SQ4x'"),
        (dict(kind="flat", refine="SQ8"), "refine=SQ8 needs a quantised index"),
        (dict(kind="pq", refine="Flat", k_factor=0.5), "k_factor=0.5 must be >= 1"),
    ],
)
def test_invalid_specs(kwargs, pattern):
    with pytest.raises(IndexConfigError, match=pattern):
        IndexSpec(**kwargs)


def test_training_size_checks(warnings_log):
    with pytest.raises(IndexConfigError, match=r"nlist=256 .* 256 .*got 100"):
        check_training_size(IndexSpec("ivfpq", nlist=256), 100)
    with pytest.raises(IndexConfigError, match=r"2\*\*nbits=256 .*got 200"):
        check_training_size(IndexSpec("pq", nbits=8), 200)
    check_training_size(IndexSpec("ivfpq", nlist=16, nbits=3), 39 * 16)
    assert warnings_log == []
    check_training_size(IndexSpec("ivfpq", nlist=16, nbits=3), 39 * 16 - 1)
    assert len(warnings_log) == 1 and "nlist=16" in warnings_log[0] and "624" in warnings_log[0]
    check_training_size(IndexSpec("flat", nlist=10**6), 1)  # flat needs no training


def test_train_rejects_nlist_above_training_size():
    x = np.random.default_rng(0).standard_normal((100, 16)).astype(np.float32)
    spec = IndexSpec("ivfpq", m=4, nlist=128, nbits=4)
    with pytest.raises(IndexConfigError, match=r"nlist=128 .*got 100"):
        train_index(create_index(spec, 16), x, spec)


def test_wrong_dimension_in_train_and_add():
    rng = np.random.default_rng(1)
    spec = IndexSpec("pq", m=4, nbits=4)
    index = create_index(spec, 16)
    with pytest.raises(IndexConfigError, match="feature dimension 32 does not match index dimension 16"):
        train_index(index, rng.standard_normal((500, 32)).astype(np.float32), spec)
    train_index(index, rng.standard_normal((500, 16)).astype(np.float32), spec)
    with pytest.raises(IndexConfigError, match="feature dimension 8 does not match index dimension 16"):
        add_vectors(index, rng.standard_normal((10, 8)).astype(np.float32), 0)
    with pytest.raises(IndexConfigError, match="2-D"):
        add_vectors(index, rng.standard_normal(16).astype(np.float32), 0)
    with pytest.raises(IndexConfigError, match="NaN"):
        train_index(index, np.full((500, 16), np.nan, np.float32), spec)


def test_add_requires_training_and_consecutive_ids():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    spec = IndexSpec("pq", m=4, nbits=4)
    index = create_index(spec, 16)
    with pytest.raises(IndexConfigError, match="untrained"):
        add_vectors(index, x, 0)
    train_index(index, x, spec)
    add_vectors(index, x[:100], 0)
    with pytest.raises(IndexConfigError, match="start_id 0 does not follow the 100 rows"):
        add_vectors(index, x[100:], 0)
    add_vectors(index, x[100:].astype(np.float16), 100)  # any float dtype, converted
    assert index.ntotal == 300


def test_training_is_deterministic():
    x = np.random.default_rng(3).standard_normal((2000, 32)).astype(np.float32)
    spec = IndexSpec("ivfpq", m=8, nlist=16, nbits=5, nprobe=4)
    blobs = []
    for _ in range(2):
        index = create_index(spec, 32)
        train_index(index, x, spec)
        blobs.append(faiss.serialize_index(index).tobytes())
    assert blobs[0] == blobs[1]


def test_set_nprobe_clamps_and_ignores_non_ivf(warnings_log):
    ivf = create_index(IndexSpec("ivfpq", m=4, nlist=32, nprobe=4), 16)
    set_nprobe(ivf, 16)
    assert ivf.nprobe == 16 and warnings_log == []
    set_nprobe(ivf, 1000)
    assert ivf.nprobe == 32 and "nlist=32" in warnings_log[0]
    set_nprobe(create_index(IndexSpec("flat"), 16), 7)  # no-op, no error
    set_nprobe(create_index(IndexSpec("pq", m=4), 16), 7)


# --- accuracy against exact search ----------------------------------------


def test_ivfpq_exhaustive_matches_flat(data, ivfpq):
    _, q, _, truth = data
    _, found = ivfpq.search(q, 10)
    top1, recall = top1_and_recall(found, truth)
    # Measured on seeds 0-3: top-1 1.000, recall@10 0.572-0.581 (dense
    # clusters: the 10 nearest lie within PQ16x8's quantisation error).
    assert top1 >= 0.99
    assert recall >= 0.50


def test_ivfpq_fewer_probes_cannot_beat_exhaustive(data, ivfpq):
    _, q, _, truth = data
    _, full = ivfpq.search(q, 10)
    set_nprobe(ivfpq, 1)
    try:
        _, one = ivfpq.search(q, 10)
    finally:
        set_nprobe(ivfpq, 64)
    assert top1_and_recall(one, truth)[1] <= top1_and_recall(full, truth)[1]


@pytest.mark.parametrize(
    "metric, top1_floor, recall_floor",
    [
        # Measured on seeds 0-3: IP top-1 0.988-0.992, recall@10 0.401-0.405;
        # L2 top-1 1.000, recall@10 0.542-0.564.
        ("IP", 0.97, 0.35),
        ("L2", 0.99, 0.48),
    ],
)
def test_pq_matches_flat(data, metric, top1_floor, recall_floor):
    x, q, _, truth = data
    pq = build(IndexSpec("pq", m=16, nbits=8, metric=metric), x)
    _, found = pq.search(q, 10)
    top1, recall = top1_and_recall(found, truth)
    assert top1 >= top1_floor
    assert recall >= recall_floor


@pytest.mark.parametrize("kind", ["pq", "ivfpq"])
def test_flat_refine_over_the_whole_shortlist_is_exact(data, kind):
    """Refine(Flat) re-scores with the float vectors: when the shortlist is every vector, it is exact search."""
    x, q, flat, _ = data
    spec = IndexSpec(kind, m=16, nlist=64, nprobe=64, refine="Flat", k_factor=len(x) / 10)
    index = build(spec, x)
    assert is_refined(index) and isinstance(quantised_part(index), (faiss.IndexPQ, faiss.IndexIVFPQ))
    assert faiss.downcast_index(index).k_factor == len(x) / 10
    d_exact, i_exact = flat.search(q, 10)
    d_refined, i_refined = index.search(q, 10)
    np.testing.assert_array_equal(i_refined, i_exact)
    np.testing.assert_allclose(d_refined, d_exact, atol=1e-5)


def test_sq8_refine_buys_back_recall_and_k_factor_is_a_search_setting(data):
    x, q, _, truth = data
    plain = build(IndexSpec("ivfpq", m=16, nlist=64, nprobe=64), x)
    refined = build(IndexSpec("ivfpq", m=16, nlist=64, nprobe=64, refine="SQ8", k_factor=1), x)
    _, i_plain = plain.search(q, 10)
    _, i_k1 = refined.search(q, 10)
    # k_factor 1: the shortlist is PQ's own top 10, only reordered
    np.testing.assert_array_equal(np.sort(i_k1, axis=1), np.sort(i_plain, axis=1))
    set_search_params(refined, IndexSpec("ivfpq", m=16, nlist=64, nprobe=64, refine="SQ8", k_factor=8))
    _, i_k8 = refined.search(q, 10)
    # Measured (seed 0): recall@10 0.579 without refine; with SQ8 0.788 / 0.916 / 0.966 at k_factor 2 / 4 / 8.
    recall_plain, recall_k8 = top1_and_recall(i_plain, truth)[1], top1_and_recall(i_k8, truth)[1]
    assert recall_k8 >= 0.95 and recall_k8 > recall_plain + 0.3
    assert index_nbytes(refined) - index_nbytes(plain) >= len(x) * D  # d bytes per vector for SQ8


def test_ip_and_l2_rank_alike_on_unit_vectors(data):
    x, q, flat_ip, _ = data
    flat_l2 = build(IndexSpec("flat", metric="L2"), x)
    sim, ip_ids = flat_ip.search(q, 20)
    dist, l2_ids = flat_l2.search(q, 20)
    np.testing.assert_array_equal(ip_ids, l2_ids)
    np.testing.assert_allclose(1 - dist / 2, sim, atol=1e-5)


# --- files ------------------------------------------------------------------


@pytest.mark.parametrize("mmap", [False, True])
def test_write_read_round_trip(data, ivfpq, tmp_path: Path, mmap):
    _, q, flat, _ = data
    for name, index in [("ivfpq.faiss", ivfpq), ("flat.faiss", flat)]:
        path = tmp_path / "sub" / name
        write_index(index, path)
        back = read_index(path, mmap=mmap)
        assert isinstance(back, type(index)) and back.ntotal == index.ntotal
        d0, i0 = index.search(q, 10)
        d1, i1 = back.search(q, 10)
        np.testing.assert_array_equal(i0, i1)
        np.testing.assert_array_equal(d0, d1)
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["flat.faiss", "ivfpq.faiss"]


def test_refined_index_round_trip_and_stays_on_cpu(data, tmp_path: Path):
    x, q, _, _ = data
    spec = IndexSpec("ivfpq", m=16, nlist=64, nprobe=16, refine="SQ8", k_factor=4)
    index = build(spec, x)
    write_index(index, tmp_path / "refined.faiss")
    back = read_index(tmp_path / "refined.faiss")
    set_search_params(back, spec)
    assert is_refined(back) and faiss.extract_index_ivf(back).nprobe == 16
    np.testing.assert_array_equal(back.search(q, 10)[1], index.search(q, 10)[1])
    assert to_device(back, use_gpu=True) is back


def test_write_replaces_existing_file_and_keeps_nprobe(tmp_path: Path):
    x = np.random.default_rng(4).standard_normal((1000, 16)).astype(np.float32)
    spec = IndexSpec("ivfpq", m=4, nlist=8, nbits=4, nprobe=3)
    path = tmp_path / "trained.faiss"
    path.write_bytes(b"old")
    index = create_index(spec, 16)
    train_index(index, x, spec)
    write_index(index, path)
    back = read_index(path)
    assert back.is_trained and back.ntotal == 0 and back.nprobe == 3
    assert [p.name for p in tmp_path.iterdir()] == ["trained.faiss"]


def test_truncated_or_missing_file_is_a_clear_error(tmp_path: Path):
    x = np.random.default_rng(5).standard_normal((500, 16)).astype(np.float32)
    path = tmp_path / "full.faiss"
    write_index(build(IndexSpec("pq", m=4, nbits=4), x), path)
    blob = path.read_bytes()
    for cut in (10, len(blob) // 2, len(blob) - 1):
        broken = tmp_path / f"cut{cut}.faiss"
        broken.write_bytes(blob[:cut])
        with pytest.raises(IndexConfigError, match="^" + re.escape(f"{broken}: not a readable FAISS index (")):
            read_index(broken)
    with pytest.raises(IndexConfigError, match="cut10.faiss"):
        read_index(tmp_path / "cut10.faiss", mmap=True)
    with pytest.raises(FileNotFoundError, match="nope.faiss"):
        read_index(tmp_path / "nope.faiss")


def test_failed_write_leaves_no_temp_file(tmp_path: Path):
    path = tmp_path / "a.faiss"
    with pytest.raises(Exception):
        write_index(object(), path)  # not an index
    assert list(tmp_path.iterdir()) == []


def test_index_nbytes_reflects_compression(data, ivfpq):
    x, _, flat, _ = data
    n = len(x)
    assert index_nbytes(flat) >= n * D * 4
    per_vector = index_nbytes(ivfpq) / n
    # 16 bytes of PQ code + 8 bytes of id per vector, plus centroids and tables.
    assert 24 <= per_vector < 24 + 40
    assert index_nbytes(flat) / index_nbytes(ivfpq) > 4


def test_to_device_without_gpu_stays_on_cpu(data, warnings_log):
    flat = data[2]
    assert to_device(flat, use_gpu=False) is flat
    if gpu_available():
        pytest.skip("a GPU is present; the CPU fallback is not exercised")
    assert to_device(flat, use_gpu=True) is flat
    assert any("GPU" in m for m in warnings_log)


def test_write_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    """A full disk while writing an index: one-line error, the old file intact, no temp file."""
    path = tmp_path / "flat.faiss"
    index = create_index(IndexSpec("flat"), 8)
    write_index(index, path)
    before = path.read_bytes()

    def full_disk(idx, name):
        Path(name).write_bytes(b"partial")
        raise RuntimeError("Error in faiss::FileIOWriter: write error: No space left on device")

    monkeypatch.setattr(faiss, "write_index", full_disk)
    with pytest.raises(IndexConfigError, match="cannot write index.*No space left"):
        write_index(index, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flat.faiss"]
