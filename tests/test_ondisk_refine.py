"""On-disk refinement: refine codes beside the inverted lists, memory-mapped, re-scoring the PQ shortlist."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_config
from fixtures import random_gallery_patches

import patchify.index as faiss_index
from patchify.bundle import read_bundle, write_bundle
from patchify.cache import CacheError
from patchify.extraction import PatchFeatures
from patchify.index import (IndexConfigError, IndexSpec, MappedRefine, create_index, merge_shards, populate_shard,
                            read_index, refine_codes_path, refine_quantizer_path, set_search_params, shard_refine_path,
                            train_index, write_index)
from patchify.indexing import patch_ids, shard_bounds
from patchify.pipeline import ConfigError, run
from patchify.search import rows_of_ids, search_images

D, LEVELS, IMAGES = 32, [0, 1, 2], 240

pytestmark = pytest.mark.usefixtures("faiss_single_thread")


def spec_of(refine: str, metric: str = "IP") -> IndexSpec:
    return IndexSpec("ivfpq", m=4, nlist=16, nbits=6, nprobe=4, metric=metric, refine=refine, k_factor=3)


def gallery(seed: int = 0, unreadable: tuple[int, ...] = (5, 100, 101)) -> PatchFeatures:
    """Random patches of IMAGES images at LEVELS, some unreadable (gaps in the ids)."""
    return random_gallery_patches(IMAGES, LEVELS, D, seed, unreadable)


def build(folder: Path, spec: IndexSpec, patches: PatchFeatures, shards: int = 3, on_disk: bool = True):
    """The same trained index filled twice: in RAM (FAISS IndexRefine, row ids) and in shards merged (patch ids)."""
    trained = folder / "trained.faiss"
    index = create_index(spec, D)
    train_index(index, gallery(seed=7).vectors, spec, seed=0)
    write_index(index, trained)
    single = read_index(trained)
    faiss_index.add_vectors(single, patches.vectors, 0)
    set_search_params(single, spec)
    ids = patch_ids(patches, LEVELS)
    paths = []
    for shard in range(shards):
        lo, hi = shard_bounds(IMAGES, shard, shards)
        rows = (patches.image >= lo) & (patches.image < hi)
        paths.append(folder / f"shard{shard}.faiss")
        populate_shard(trained, patches.vectors[rows], ids[rows], paths[-1])
    merged = merge_shards(trained, paths, folder / "merged" / "index.faiss", on_disk=on_disk)
    set_search_params(merged, spec)
    return single, merged, ids


def queries_of(patches: PatchFeatures) -> np.ndarray:
    x = patches.vectors[::41] + 0.2 * np.random.default_rng(3).standard_normal((len(patches.vectors[::41]), D))
    return x.astype(np.float32)


@pytest.mark.parametrize("refine, metric", [("SQ8", "IP"), ("SQfp16", "IP"), ("Flat", "IP"), ("SQ8", "L2")])
def test_memory_mapped_refine_equals_faiss_index_refine(tmp_path, refine, metric):
    patches = gallery()
    spec = spec_of(refine, metric)
    single, merged, ids = build(tmp_path, spec, patches)
    assert isinstance(merged, MappedRefine) and faiss_index.is_on_disk(merged) and faiss_index.is_refined(merged)
    assert isinstance(merged.codes, np.memmap) and merged.k_factor == 3 and merged.ntotal == single.ntotal
    row_of_id = rows_of_ids(ids)
    queries = queries_of(patches)
    dist, found = merged.search(queries, 15)
    ref_dist, ref_rows = single.search(queries, 15)
    np.testing.assert_array_equal(row_of_id[found], ref_rows)
    np.testing.assert_allclose(dist, ref_dist, atol=1e-5)
    # and not the PQ-only ranking: the refine stage changes the scores
    pq_dist, _ = faiss_index.quantised_part(merged).search(queries, 15)
    assert np.abs(pq_dist - dist).max() > 1e-3


def test_sharded_refined_index_equals_in_ram_refined_index_through_search_images(tmp_path):
    patches = gallery()
    spec = spec_of("SQ8")
    single, merged, ids = build(tmp_path, spec, patches, shards=4)
    (tmp_path / "b").mkdir()
    _, in_ram_lists, _ = build(tmp_path / "b", spec, patches, shards=2, on_disk=False)
    assert not faiss_index.is_on_disk(in_ram_lists) and isinstance(in_ram_lists, MappedRefine)
    queries = queries_of(patches)
    reference = search_images(single, queries, patches.image, 10)
    for index in (merged, read_index(tmp_path / "merged" / "index.faiss"), in_ram_lists):
        set_search_params(index, spec)
        hits = search_images(index, queries, patches.image, 10, row_of_id=rows_of_ids(ids))
        np.testing.assert_array_equal(hits.images, reference.images)
        np.testing.assert_array_equal(hits.patches, reference.patches)
        np.testing.assert_allclose(hits.scores, reference.scores, atol=1e-5)


def test_refine_codes_are_one_row_per_id_and_travel_with_the_index(tmp_path):
    patches = gallery()
    single, merged, ids = build(tmp_path, spec_of("SQ8"), patches)
    codes = np.load(refine_codes_path(tmp_path / "merged" / "index.faiss"), mmap_mode="r")
    assert codes.shape == (int(ids.max()) + 1, D) and codes.dtype == np.uint8  # SQ8: d bytes per id
    assert not codes[5 * 14 : 6 * 14].any()  # unreadable image 5: its ids hold no codes
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == \
        ["index.faiss", "index.ivfdata", "index.refine.faiss", "index.refine.npy"]  # no temporaries left
    # written elsewhere (as a bundle is): the codes are linked beside the new file, the results unchanged
    write_index(merged, tmp_path / "bundle" / "index.faiss")
    assert (tmp_path / "bundle" / "index.refine.npy").samefile(tmp_path / "merged" / "index.refine.npy")
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "bundle", moved)
    queries = queries_of(patches)
    again = read_index(moved / "index.faiss")
    set_search_params(again, spec_of("SQ8"))
    np.testing.assert_array_equal(again.search(queries, 10)[1], merged.search(queries, 10)[1])
    write_index(again, moved / "index.faiss")  # onto its own files
    rewritten = read_index(moved / "index.faiss")
    set_search_params(rewritten, spec_of("SQ8"))
    np.testing.assert_array_equal(rewritten.search(queries, 10)[1], merged.search(queries, 10)[1])
    assert sorted(p.name for p in moved.iterdir()) == ["index.faiss", "index.ivfdata", "index.refine.faiss",
                                                       "index.refine.npy"]
    # an ordinary index written over it removes the refine stage it no longer has
    write_index(single, moved / "index.faiss")
    assert not refine_codes_path(moved / "index.faiss").exists()
    assert not refine_quantizer_path(moved / "index.faiss").exists()
    assert faiss_index.index_nbytes(merged) > faiss_index.index_nbytes(faiss_index.quantised_part(merged)) + len(ids) * D


def test_truncated_or_foreign_refine_codes_are_one_line_errors(tmp_path):
    patches = gallery()
    _, merged, _ = build(tmp_path, spec_of("SQ8"), patches)
    folder = tmp_path / "copy"
    shutil.copytree(tmp_path / "merged", folder)
    codes = refine_codes_path(folder / "index.faiss")
    data = codes.read_bytes()
    codes.write_bytes(data[: len(data) - D * 3])
    with pytest.raises(IndexConfigError, match=r"^" + re.escape(str(codes)) + r": truncated or unreadable refine codes"):
        read_index(folder / "index.faiss")
    codes.unlink()
    with pytest.raises(IndexConfigError, match=re.escape(f"{codes}: refine codes missing")):
        read_index(folder / "index.faiss")
    np.save(codes, np.zeros((10, D), np.uint8))  # a valid file of another (smaller) index
    with pytest.raises(IndexConfigError, match=r"refine codes of shape \(10, 32\) cannot hold"):
        read_index(folder / "index.faiss")
    np.save(codes, np.zeros((merged.ntotal, D), np.uint8))  # as many rows as vectors, but ids beyond them
    index = read_index(folder / "index.faiss")
    with pytest.raises(IndexConfigError, match="the two files belong to different indexes"):
        index.search(queries_of(patches), 10)
    np.save(codes, np.zeros((len(merged.codes), 2 * D), np.uint8))
    with pytest.raises(IndexConfigError, match="cannot hold .* vectors of 32 bytes"):
        read_index(folder / "index.faiss")


def test_shard_without_its_refine_codes_is_refused(tmp_path):
    patches = gallery()
    build(tmp_path, spec_of("SQ8"), patches)
    shard_refine_path(tmp_path / "shard1.faiss").unlink()
    with pytest.raises(IndexConfigError, match=r"shard1\.refine-shard\.npy: refine codes do not match shard shard1"):
        merge_shards(tmp_path / "trained.faiss", [tmp_path / f"shard{i}.faiss" for i in range(3)],
                     tmp_path / "again.faiss")


@pytest.mark.parametrize("overrides, error, message", [
    (["index=flat", "index.refine=SQ8", "index.on_disk=true"], ConfigError, "index.refine=SQ8: needs a quantised"),
    (["index=pq", "index.refine=SQ8", "index.shards=2"], IndexConfigError, "shards=2 and on_disk=false need kind=ivfpq"),
])
def test_combinations_that_cannot_work_stay_one_line_errors(smoke_overrides, tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        run(compose_config(smoke_overrides + overrides), tmp_path / "run")


def test_pipeline_sharded_on_disk_refined_eval_matches_in_ram_refined(smoke_overrides, ilias_fixture, tmp_path):
    common = smoke_overrides + ["pyramid.level=1", "index=ivfpq", "index.m=8", "index.nbits=4", "index.nlist=4",
                                "index.nprobe=4", "index.refine=SQ8", f"dataset.root={ilias_fixture}",
                                "dataset.generate=null", "dataset.name=fixture", f"paths.features={tmp_path / 'f'}",
                                f"paths.indices={tmp_path / 'indices'}", f"paths.logs={tmp_path / 'logs'}"]
    sharded = run(compose_config(common + ["index.shards=3", "index.on_disk=true"]), tmp_path / "a")
    assert len(list((tmp_path / "indices").glob("*.populated.refine.npy"))) == 1
    one_file = run(compose_config(common), tmp_path / "b")
    assert sharded["mAP"] == pytest.approx(one_file["mAP"]) and sharded["LocScore"] == pytest.approx(one_file["LocScore"])
    a, b = ([json.loads(line) for line in (tmp_path / run_dir / "results.jsonl").read_text().splitlines()]
            for run_dir in ("a", "b"))
    assert [r["ids"] for r in a] == [r["ids"] for r in b] and len(a) == 4
    for ra, rb in zip(a, b):
        assert {k: v for k, v in ra.items() if k != "scores"} == {k: v for k, v in rb.items() if k != "scores"}
        assert ra["scores"] == pytest.approx(rb["scores"], abs=1e-5)


def test_bundle_keeps_the_refine_stage_and_checks_it(tmp_path):
    patches = gallery()
    _, merged, ids = build(tmp_path, spec_of("SQ8"), patches)
    arrays = {"ids": np.asarray([f"img{i}" for i in range(IMAGES)]), "paths": np.asarray([f"img{i}.jpg" for i in range(IMAGES)]),
              "patch_image": patches.image, "boxes": patches.boxes, "patch_ids": ids}
    build_dir = write_bundle(tmp_path / "bundle", merged, arrays)
    parts = read_bundle(tmp_path / "bundle", dim=D).manifest["parts"]
    assert {"index.refine.faiss", "index.refine.npy", "index.ivfdata"} <= set(parts) and "sha256" in parts["index.refine.faiss"]
    bundle = read_bundle(tmp_path / "bundle", dim=D)
    assert isinstance(bundle.index, MappedRefine)
    codes = build_dir / "index.refine.npy"
    codes.unlink()  # a hard link to the merged file: truncate a copy, not the original
    shutil.copyfile(refine_codes_path(tmp_path / "merged" / "index.faiss"), codes)
    with open(codes, "r+b") as f:
        f.truncate(codes.stat().st_size - D)
    with pytest.raises(CacheError, match=re.escape(f"{codes}: ") + ".* the manifest says"):
        read_bundle(tmp_path / "bundle", dim=D)
