"""Sharded IVF-PQ: shard files filled independently, merged on disk, searched memory-mapped."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
from conftest import ROOT, compose_config
from fixtures import random_gallery_patches

import patchify.index as faiss_index
from patchify.extraction import PatchFeatures
from patchify.index import (IndexConfigError, IndexSpec, create_index, ivfdata_path, merge_shards, populate_shard,
                       read_index, train_index, write_index)
from patchify.pipeline import ConfigError, run
from patchify.indexing import patch_ids, shard_bounds
from patchify.pyramid import patches_per_image
from patchify.search import rows_of_ids, search_images

D, LEVELS, IMAGES = 32, [0, 1, 2], 300
SPEC = IndexSpec("ivfpq", m=8, nlist=16, nbits=6, nprobe=6)


pytestmark = pytest.mark.usefixtures("faiss_single_thread")


def gallery_patches(seed: int = 0, unreadable: tuple[int, ...] = (3, 150, 151)) -> PatchFeatures:
    """Random patches of IMAGES images at LEVELS, some unreadable (gaps in the ids)."""
    return random_gallery_patches(IMAGES, LEVELS, D, seed, unreadable)


def train(path: Path, seed: int, spec: IndexSpec = SPEC) -> Path:
    index = create_index(spec, D)
    train_index(index, gallery_patches(seed=100 + seed).vectors, spec, seed=seed)
    write_index(index, path)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One trained index; the gallery in one in-memory index (row ids) and in 4 shards merged on disk."""
    folder = tmp_path_factory.mktemp("shards")
    trained = train(folder / "trained.faiss", seed=0)
    patches = gallery_patches()
    ids = patch_ids(patches, LEVELS)
    single = read_index(trained)
    faiss_index.add_vectors(single, patches.vectors, 0)
    write_index(single, folder / "single.faiss")
    shards = []
    for shard in range(4):
        lo, hi = shard_bounds(IMAGES, shard, 4)
        rows = (patches.image >= lo) & (patches.image < hi)
        shards.append(folder / f"shard{shard}.faiss")
        assert populate_shard(trained, patches.vectors[rows], ids[rows], shards[-1]) == rows.sum()
    merged = merge_shards(trained, shards, folder / "merged" / "index.faiss")
    queries = patches.vectors[::97] + 0.1 * np.random.default_rng(1).standard_normal((len(patches.vectors[::97]), D))
    return dict(folder=folder, trained=trained, patches=patches, ids=ids, single=single, shards=shards,
                merged=merged, queries=queries.astype(np.float32))


def assert_same_search(index, built, row_of_id=None):
    """Same rows and scores (to 1e-5) as the in-memory index, for raw FAISS search and through search_images."""
    queries, single = built["queries"], built["single"]
    dist, ids = index.search(queries, 20)
    ref_dist, ref_rows = single.search(queries, 20)
    np.testing.assert_array_equal(ids if row_of_id is None else row_of_id[ids], ref_rows)
    np.testing.assert_allclose(dist, ref_dist, atol=1e-5)
    hits = search_images(index, queries, built["patches"].image, 10, row_of_id=row_of_id)
    ref = search_images(single, queries, built["patches"].image, 10)
    np.testing.assert_array_equal(hits.images, ref.images)
    np.testing.assert_array_equal(hits.patches, ref.patches)
    np.testing.assert_allclose(hits.scores, ref.scores, atol=1e-5)


# ----------------------------------------------------------------------------- ids


def test_patch_ids_need_only_the_images_own_index():
    patches = gallery_patches()
    ids = patch_ids(patches, LEVELS)
    per_image = patches_per_image(LEVELS)
    first_of_level = {0: 0, 1: 1, 2: 5}
    for row in (0, 1, 500, len(ids) - 1):  # slot = level offset + cell (rows of one image and level are consecutive)
        image, level = patches.image[row], int(patches.level[row])
        cell = row - np.flatnonzero((patches.image == image) & (patches.level == level))[0]
        assert ids[row] == image * per_image + first_of_level[level] + cell
    assert len(np.unique(ids)) == len(ids) and not np.isin(np.arange(3 * per_image, 4 * per_image), ids).any()
    # A shard job gathers its slice alone (image indices from 0) and adds its first image's index.
    lo, hi = shard_bounds(IMAGES, 2, 4)
    rows = (patches.image >= lo) & (patches.image < hi)
    alone = PatchFeatures(patches.vectors[rows], patches.image[rows] - lo, patches.boxes[rows], patches.level[rows])
    shifted = PatchFeatures(alone.vectors, alone.image + lo, alone.boxes, alone.level)
    np.testing.assert_array_equal(patch_ids(shifted, LEVELS), ids[rows])
    row_of_id = rows_of_ids(ids)
    np.testing.assert_array_equal(row_of_id[ids], np.arange(len(ids)))


# ----------------------------------------------------------------------------- merge and read


def test_four_shards_on_disk_equal_one_in_memory_index(built):
    merged = built["merged"]
    assert faiss_index.is_on_disk(merged) and merged.ntotal == built["single"].ntotal
    assert_same_search(merged, built, rows_of_ids(built["ids"]))
    folder = built["folder"] / "merged"
    assert sorted(p.name for p in folder.iterdir()) == ["index.faiss", "index.ivfdata"]  # no temporaries left
    assert (folder / "index.faiss").stat().st_size < (folder / "index.ivfdata").stat().st_size


def test_memory_mapped_reads_give_the_same_results(built):
    row_of_id = rows_of_ids(built["ids"])
    assert_same_search(read_index(built["folder"] / "merged" / "index.faiss"), built, row_of_id)
    assert_same_search(read_index(built["folder"] / "single.faiss", mmap=True), built)
    in_memory = merge_shards(built["trained"], built["shards"], built["folder"] / "in_memory.faiss", on_disk=False)
    assert not faiss_index.is_on_disk(in_memory)
    assert_same_search(in_memory, built, row_of_id)


def test_ids_the_gallery_table_lacks_are_an_error(built):
    with pytest.raises(IndexConfigError, match="patch ids must be distinct"):
        rows_of_ids(np.array([0, 5, 5]))
    unknown = np.full_like(rows_of_ids(built["ids"]), -1)
    with pytest.raises(IndexConfigError, match="ids no gallery patch has"):
        search_images(built["merged"], built["queries"], built["patches"].image, 10, row_of_id=unknown)


def test_moved_folder_and_copies_still_read(built, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(built["folder"] / "merged", moved)
    row_of_id = rows_of_ids(built["ids"])
    index = read_index(moved / "index.faiss")
    assert_same_search(index, built, row_of_id)
    # FAISS's own reader finds the lists too: the index file names them relative to its folder.
    assert_same_search(faiss.read_index(str(moved / "index.faiss"), faiss.IO_FLAG_ONDISK_SAME_DIR), built, row_of_id)
    # Writing an on-disk index elsewhere links (or copies) its lists beside the new file.
    write_index(index, tmp_path / "bundle" / "index.faiss")
    assert (tmp_path / "bundle" / "index.ivfdata").samefile(moved / "index.ivfdata")
    assert_same_search(read_index(tmp_path / "bundle" / "index.faiss"), built, row_of_id)
    # An ordinary index written over it removes the lists it no longer uses.
    write_index(built["single"], tmp_path / "bundle" / "index.faiss")
    assert not ivfdata_path(tmp_path / "bundle" / "index.faiss").exists()


def test_missing_or_truncated_lists_are_one_line_errors(built, tmp_path):
    shutil.copy(built["folder"] / "merged" / "index.faiss", tmp_path / "index.faiss")
    with pytest.raises(IndexConfigError, match=r"index\.faiss: .*not a readable FAISS index .*index\.ivfdata"):
        read_index(tmp_path / "index.faiss")  # lists left behind: FAISS cannot open them
    data = (built["folder"] / "merged" / "index.ivfdata").read_bytes()
    (tmp_path / "index.ivfdata").write_bytes(data[: len(data) // 2])
    with pytest.raises(IndexConfigError, match=r"index\.ivfdata: truncated inverted lists"):
        read_index(tmp_path / "index.faiss")


def test_shard_of_another_trained_index_is_rejected(built, tmp_path):
    patches, ids = built["patches"], built["ids"]
    other = train(tmp_path / "other.faiss", seed=1)
    foreign = tmp_path / "foreign.faiss"
    populate_shard(other, patches.vectors[:100], ids[:100], foreign)
    shards = [built["shards"][0], foreign]
    message = f"{foreign}: populated from another trained index than trained.faiss (centroids differ); " \
              "delete the shard to populate it again"
    with pytest.raises(IndexConfigError, match="^" + re.escape(message) + "$"):
        merge_shards(built["trained"], shards, tmp_path / "merged.faiss")
    smaller = train(tmp_path / "smaller.faiss", seed=0, spec=IndexSpec("ivfpq", m=4, nlist=16, nbits=6, nprobe=6))
    populate_shard(smaller, patches.vectors[:100], ids[:100], foreign)
    message = f"{foreign}: shard of an index with d=32 nlist=16 code_size=3 metric=IP, but trained.faiss has " \
              "d=32 nlist=16 code_size=6 metric=IP"
    with pytest.raises(IndexConfigError, match="^" + re.escape(message) + "$"):
        merge_shards(built["trained"], shards, tmp_path / "merged.faiss")
    with pytest.raises(IndexConfigError, match=re.escape(f"{tmp_path / 'nope.faiss'}: index shard missing")):
        merge_shards(built["trained"], [tmp_path / "nope.faiss"], tmp_path / "merged.faiss")
    write_index(create_index(IndexSpec("flat"), D), tmp_path / "flat.faiss")
    with pytest.raises(IndexConfigError, match="flat.faiss: not an IVF index"):
        populate_shard(tmp_path / "flat.faiss", patches.vectors[:10], ids[:10], tmp_path / "x.faiss")
    with pytest.raises(IndexConfigError, match="shard0.faiss: holds 1,036 vectors; expected an empty trained index"):
        merge_shards(built["shards"][0], built["shards"], tmp_path / "merged.faiss")
    assert not list(tmp_path.glob("merged*"))


# ----------------------------------------------------------------------------- pipeline


def test_index_configs_share_every_key():
    keys = {p.stem: set(compose_config([f"index={p.stem}"]).index) for p in (ROOT / "configs" / "index").glob("*.yaml")}
    assert all(k == keys["ivfpq"] for k in keys.values()) and {"shards", "on_disk", "shard"} <= keys["ivfpq"]


@pytest.mark.parametrize("overrides, error, message", [
    (["index=flat", "index.on_disk=true"], IndexConfigError, "shards=1 and on_disk=true need kind=ivfpq"),
    (["index=pq", "index.shards=4"], IndexConfigError, "shards=4 and on_disk=false need kind=ivfpq"),
    (["index=flat", "index.refine=SQ8"], ConfigError, "index.refine=SQ8: needs a quantised index"),
    (["index=ivfpq", "index.shards=4", "index.shard=1"], ConfigError, "index.shard=1 applies to task=index only"),
    (["index=ivfpq", "task=index", "index.shard=0"], ConfigError, "needs a sharded index"),
    (["index=ivfpq", "task=index", "index.shards=4", "index.shard=4"], ConfigError, r"null, train or 0\.\.3, got 4"),
])
def test_sharding_settings_are_checked(smoke_overrides, tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        run(compose_config(smoke_overrides + overrides), tmp_path / "run")


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    """One feature cache for the runs below: extraction dominates their time, and its keys differ by image."""
    return tmp_path_factory.mktemp("features")


@pytest.fixture
def ivfpq(tmp_path, features) -> list[str]:
    """A small IVF-PQ at levels 0-1 with test_vit; caches in this test's folder, features shared."""
    return ["experiment=smoke", "pyramid.level=1", "index=ivfpq", "index.m=8", "index.nbits=4", "index.nlist=4",
            "index.nprobe=4", f"paths.features={features}", f"paths.indices={tmp_path / 'indices'}",
            f"paths.logs={tmp_path / 'logs'}"]


def test_sharded_eval_resumes_and_matches_one_file(ivfpq, ilias_fixture, tmp_path, monkeypatch):
    shards_done = []
    real = faiss_index.populate_shard

    def dies_on_third_shard(*args, **kwargs):
        shards_done.append(int(re.search(r"shard(\d+)-of-004", args[-1].name)[1]))
        if len(shards_done) == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(faiss_index, "populate_shard", dies_on_third_shard)
    one_file = ivfpq + [f"dataset.root={ilias_fixture}", "dataset.generate=null", "dataset.name=fixture"]
    sharded = one_file + ["index.shards=4", "index.on_disk=true"]
    with pytest.raises(KeyboardInterrupt):
        run(compose_config(sharded), tmp_path / "a")
    resumed = run(compose_config(sharded), tmp_path / "b")
    assert shards_done == [0, 1, 2, 2, 3]  # the resumed build filled only the shards the killed one had not
    reference = run(compose_config(one_file), tmp_path / "c")  # the same trained file, row ids
    assert resumed["mAP"] == pytest.approx(reference["mAP"]) and resumed["LocScore"] == pytest.approx(reference["LocScore"])
    assert len(list((tmp_path / "indices").glob("*.trained.faiss"))) == 1
    assert len(list((tmp_path / "indices").glob("*.populated.ivfdata"))) == 1
    again = run(compose_config(sharded), tmp_path / "d")  # the merged index is reused, memory-mapped
    assert len(shards_done) == 5 and again["mAP"] == pytest.approx(reference["mAP"])


def test_independent_shard_jobs_then_merge_then_search(ivfpq, tmp_path, ilias_fixture, monkeypatch):
    """The README's sequence (each step a separate run, as Hydra multirun jobs would be), then task=search."""
    folder = ivfpq + ["dataset=folder", f"dataset.root={ilias_fixture / 'ilias_core'}"]
    common = folder + ["index.shards=3", "index.on_disk=true"]
    with pytest.raises(ConfigError, match="no trained index yet; run task=index index.shard=train"):
        run(compose_config(common + ["task=index", "index.shard=1"]), tmp_path / "early")
    run(compose_config(common + ["task=index", "index.shard=train"]), tmp_path / "train")
    for shard in (2, 0, 1):
        summary = run(compose_config(common + ["task=index", f"index.shard={shard}"]), tmp_path / f"shard{shard}")
        assert summary["shard"].endswith(f"shard{shard:03d}-of-003.faiss") and summary["patches"] > 0
    monkeypatch.setattr(faiss_index, "populate_shard", lambda *a, **k: pytest.fail("the final run only merges"))
    build = Path(run(compose_config(common + ["task=index"]), tmp_path / "merge")["build"])
    assert {"index.faiss", "index.ivfdata", "gallery"} <= {p.name for p in build.iterdir()}
    query = sorted((ilias_fixture / "ilias_core").glob("*/pos/*.jpg"))[4]
    run(compose_config(common + ["task=search", f"query.path={query}"]), tmp_path / "search")
    (on_disk,) = json.loads((tmp_path / "search" / "search.json").read_text())["queries"]
    # The same settings without shards write an ordinary index into the same bundle; search finds the same.
    one_file_build = Path(run(compose_config(folder + ["task=index"]), tmp_path / "index_one_file")["build"])
    assert not build.exists() and not (one_file_build / "index.ivfdata").exists()  # the on-disk build is gone
    run(compose_config(folder + ["task=search", f"query.path={query}"]), tmp_path / "s1")
    (one_file,) = json.loads((tmp_path / "s1" / "search.json").read_text())["queries"]
    assert [r["path"] for r in on_disk["results"]] == [r["path"] for r in one_file["results"]]
    assert [r["score"] for r in on_disk["results"]] == pytest.approx([r["score"] for r in one_file["results"]], abs=1e-4)
    assert [r["box"] for r in on_disk["results"]] == [r["box"] for r in one_file["results"]]


# ----------------------------------------------------------------------------- memory limit

LIMITED_CHILD = r"""
import resource, sys
import faiss, numpy as np
from patchify.index import read_index
folder, headroom = sys.argv[1], int(sys.argv[2])
faiss.omp_set_num_threads(1)
queries, expected = np.load(f"{folder}/queries.npy"), np.load(f"{folder}/expected.npy")
data = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmData:"))
resource.setrlimit(resource.RLIMIT_DATA, (data + headroom, data + headroom))
try:
    faiss.read_index(f"{folder}/full.faiss")
    print("full index loaded")
except MemoryError:
    print("full index too large")
index = read_index(f"{folder}/index.faiss")
_, ids = index.search(queries, 10)
print("same results" if np.array_equal(ids, expected) else f"different results {ids.tolist()}")
"""


def test_on_disk_index_larger_than_the_memory_limit_serves_queries(tmp_path):
    """A child may allocate only 64 MiB more (RLIMIT_DATA, which file mappings do not count against): loading
    the 144 MB index fails, searching it memory-mapped works and agrees with the parent's in-memory search."""
    headroom, spec, d, n = 64 << 20, IndexSpec("ivfpq", m=16, nlist=4, nbits=8, nprobe=4), 64, 6_000_000
    rng = np.random.default_rng(0)
    index = create_index(spec, d)
    train_index(index, rng.standard_normal((3000, d)).astype(np.float32), spec)
    write_index(index, tmp_path / "trained.faiss")
    shards = []
    for shard in range(2):  # synthetic vectors drawn directly as codes: encoding 6M vectors would take minutes
        index = read_index(tmp_path / "trained.faiss")
        codes = rng.integers(0, 256, (n // 2, index.sa_code_size()), dtype=np.uint8)
        codes[:, 0] = rng.integers(0, spec.nlist, n // 2)  # the inverted list, then the PQ code
        index.add_sa_codes(codes, np.arange(shard * n // 2, (shard + 1) * n // 2))
        shards.append(tmp_path / f"shard{shard}.faiss")
        write_index(index, shards[-1])
    del index, codes
    merge_shards(tmp_path / "trained.faiss", shards, tmp_path / "index.faiss")
    full = merge_shards(tmp_path / "trained.faiss", shards, tmp_path / "full.faiss", on_disk=False)
    queries = rng.standard_normal((4, d)).astype(np.float32)
    np.save(tmp_path / "queries.npy", queries)
    np.save(tmp_path / "expected.npy", full.search(queries, 10)[1])
    del full
    assert (tmp_path / "index.ivfdata").stat().st_size > 2 * headroom
    child = subprocess.run([sys.executable, "-c", LIMITED_CHILD, str(tmp_path), str(headroom)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.split("\n")[:2] == ["full index too large", "same results"], child.stdout
