"""The task=index/task=search bundle (src/patchify/bundle.py): written and read as one unit, every part checked."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
from conftest import compose_config

import patchify.bundle as bundle_module
from patchify.bundle import POINTER, read_bundle, write_bundle
from patchify.cache import CacheError, save_arrays
from patchify.data import DataError
from patchify.pipeline import run


def _parts(rows: int = 12, images: int = 4, dim: int = 8, seed: int = 0):
    """A flat index of ``rows`` random unit vectors and its gallery arrays (``rows // images`` patches each)."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((rows, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(dim)
    index.add(vectors)
    gallery = {"ids": np.asarray([f"img{i}.jpg" for i in range(images)]),
               "paths": np.asarray([f"/photos/img{i}.jpg" for i in range(images)]),
               "patch_image": np.repeat(np.arange(images), rows // images).astype(np.int64),
               "boxes": rng.uniform(0, 100, (rows, 4)).astype(np.float32), "levels": np.asarray([0, 1])}
    return index, gallery, vectors


def _builds(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("build-*"))


def test_round_trip_and_manifest(tmp_path):
    index, gallery, vectors = _parts()
    build = write_bundle(tmp_path / "b", index, gallery)
    read = read_bundle(tmp_path / "b", dim=8)
    assert read.build == build and _builds(tmp_path / "b") == [build.name]
    assert read.index.ntotal == 12 and np.array_equal(read.index.reconstruct_n(0, 12), vectors)
    assert all(np.array_equal(read.gallery[name], gallery[name]) for name in gallery)
    assert read.manifest["counts"] == {"images": 4, "indexed_images": 4, "patches": 12, "ntotal": 12, "dim": 8,
                                       "rows_by_image": True}
    assert set(read.manifest["parts"]) == {"index.faiss", *(f"gallery/{name}.npy" for name in gallery)}
    pointer = json.loads((tmp_path / "b" / POINTER).read_text())
    assert pointer["build"] == build.name


def test_nothing_written_is_no_bundle_and_leftover_builds_are_not_read(tmp_path):
    assert read_bundle(tmp_path / "absent", dim=8) is None
    index, gallery, _ = _parts()
    build = write_bundle(tmp_path / "b", index, gallery)
    (tmp_path / "b" / POINTER).unlink()  # as if the writer was killed before its commit
    assert read_bundle(tmp_path / "b", dim=8) is None
    assert build.is_dir()
    second = write_bundle(tmp_path / "b", *_parts(seed=1)[:2])  # the next write cleans the leftover
    assert _builds(tmp_path / "b") == [second.name]


def test_a_writer_killed_between_the_parts_leaves_the_previous_bundle(tmp_path, monkeypatch):
    old_index, old_gallery, old_vectors = _parts(seed=0)
    first = write_bundle(tmp_path / "b", old_index, old_gallery)
    new_index, new_gallery, _ = _parts(rows=16, seed=1)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # after index.faiss was written, before the gallery arrays

    monkeypatch.setattr(bundle_module, "_save_gallery", killed)
    with pytest.raises(KeyboardInterrupt):
        write_bundle(tmp_path / "b", new_index, new_gallery)
    read = read_bundle(tmp_path / "b", dim=8)
    assert read.build == first and _builds(tmp_path / "b") == [first.name]  # the half build was removed
    assert np.array_equal(read.index.reconstruct_n(0, 12), old_vectors)
    assert np.array_equal(read.gallery["patch_image"], old_gallery["patch_image"])


def test_a_kill_in_every_step_of_a_write_leaves_a_whole_bundle(tmp_path, monkeypatch):
    """Each file operation of a write fails in turn (the N-th atomic replace raises): the bundle read is
    always the previous one or the new one, never a mix; the next write succeeds and cleans up."""
    old_index, old_gallery, _ = _parts(seed=0)
    new_index, new_gallery, _ = _parts(rows=16, seed=1)
    real_replace = os.replace
    for fail_at in range(1, 10):
        folder = tmp_path / f"b{fail_at}"
        write_bundle(folder, old_index, old_gallery)
        calls = []

        def replace(src, dst, *args, **kwargs):
            calls.append(dst)
            if len(calls) == fail_at:
                raise KeyboardInterrupt
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(os, "replace", replace)
        try:
            write_bundle(folder, new_index, new_gallery)
            finished = True
        except KeyboardInterrupt:
            finished = False
        monkeypatch.setattr(os, "replace", real_replace)
        read = read_bundle(folder, dim=8)
        assert read.index.ntotal == len(read.gallery["patch_image"]) == (16 if finished else 12)
        if finished:
            break
    else:
        pytest.fail("the write never finished")
    assert fail_at > 3  # index, gallery, manifest and pointer were each interrupted once


def test_a_reader_whose_build_is_replaced_while_it_opens_it_reads_the_new_one(tmp_path, monkeypatch):
    """Readers take no lock: a build removed between reading current.json and its files is read again."""
    first = write_bundle(tmp_path / "b", *_parts(seed=0)[:2])
    real_read_build, builds = bundle_module._read_build, []

    def read_build(folder, pointer, dim):
        if not builds:  # a writer commits and removes the build this reader is about to open
            builds.append(write_bundle(tmp_path / "b", *_parts(rows=16, seed=1)[:2]))
        return real_read_build(folder, pointer, dim)

    monkeypatch.setattr(bundle_module, "_read_build", read_build)
    read = read_bundle(tmp_path / "b", dim=8)
    assert not first.exists() and read.build == builds[0] and read.index.ntotal == 16


@pytest.mark.parametrize("part", ["gallery/boxes.npy", "index.faiss", "manifest.json"])
def test_a_swapped_or_edited_part_is_refused_in_one_line(tmp_path, part):
    index, gallery, _ = _parts(seed=0)
    build = write_bundle(tmp_path / "b", index, gallery)
    other = write_bundle(tmp_path / "other", *_parts(seed=1)[:2])  # same sizes, other content
    shutil.copy(other / part, build / part)
    with pytest.raises(CacheError, match="re-run task=index") as err:
        read_bundle(tmp_path / "b", dim=8)
    assert "\n" not in str(err.value) and str(build) in str(err.value)


def test_parts_that_disagree_with_each_other_are_refused(tmp_path):
    """A manifest consistent with its parts, but parts that disagree (as a buggy writer would leave)."""
    index, gallery, _ = _parts()
    build = write_bundle(tmp_path / "b", index, gallery)
    manifest = json.loads((build / "manifest.json").read_text())
    for name in ("patch_image", "boxes"):
        part = f"gallery/{name}.npy"
        np.save(build / part, gallery[name][:-1])
        manifest["parts"][part] = {"size": (build / part).stat().st_size, "sha256": bundle_module.sha256_of(build / part)}
    text = json.dumps(manifest, indent=1, sort_keys=True)
    (build / "manifest.json").write_text(text)
    pointer = json.loads((tmp_path / "b" / POINTER).read_text())
    pointer["manifest_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    (tmp_path / "b" / POINTER).write_text(json.dumps(pointer))
    with pytest.raises(CacheError, match="patches is 11, the manifest says 12; re-run task=index"):
        read_bundle(tmp_path / "b", dim=8)


def test_a_model_of_another_dimension_is_refused(tmp_path):
    write_bundle(tmp_path / "b", *_parts()[:2])
    with pytest.raises(CacheError, match="index dimension 8 does not match the model's 16; re-run task=index"):
        read_bundle(tmp_path / "b", dim=16)


@pytest.mark.parametrize("text", ["{", "[]", '{"format": 99, "build": "build-x"}', '{"format": 2, "build": "../x"}'])
def test_a_bad_pointer_is_refused(tmp_path, text):
    write_bundle(tmp_path / "b", *_parts()[:2])
    (tmp_path / "b" / POINTER).write_text(text)
    with pytest.raises(CacheError, match="re-run task=index"):
        read_bundle(tmp_path / "b", dim=8)


def test_a_format_1_bundle_is_refused_in_one_line(tmp_path):
    """Format 1 kept the gallery in one gallery.npz: re-running task=index rebuilds it (features are cached)."""
    build = write_bundle(tmp_path / "b", *_parts()[:2])
    pointer = json.loads((tmp_path / "b" / POINTER).read_text())
    (tmp_path / "b" / POINTER).write_text(json.dumps({**pointer, "format": 1}))
    with pytest.raises(CacheError, match=r"bundle format 1 \(expected 2\); re-run task=index") as err:
        read_bundle(tmp_path / "b", dim=8)
    assert str(tmp_path / "b") in str(err.value) and build.exists()


def test_large_gallery_arrays_are_mapped_not_read(tmp_path, monkeypatch):
    """A serving process maps the gallery table: reading a bundle reads no array into memory (>= MAPPED_BYTES)."""
    index, gallery, _ = _parts()
    write_bundle(tmp_path / "b", index, gallery)
    monkeypatch.setattr(bundle_module, "MAPPED_BYTES", 0)
    read = read_bundle(tmp_path / "b", dim=8)
    assert all(isinstance(read.gallery[name], np.memmap) for name in ("ids", "paths", "patch_image", "boxes"))
    assert all(np.array_equal(read.gallery[name], gallery[name]) for name in gallery)


def test_ids_image_times_p_plus_slot_are_recorded_and_checked(tmp_path):
    """Sharded builds number patches image * P + slot: the manifest says P, so search needs no table; ids that
    are not that (or not increasing) are refused when written."""
    index, gallery, _ = _parts(rows=15, images=3)  # 3 images x 5 patches at levels 0, 1
    gallery = {**gallery, "patch_image": np.array([0] * 5 + [2] * 5 + [3] * 5), "ids": np.asarray(list("abcd")),
               "paths": np.asarray(list("abcd")), "patch_ids": np.r_[0:5, 10:15, 15:20]}  # image 1 unreadable
    read = read_bundle(write_bundle(tmp_path / "b", index, gallery).parent, dim=8)
    assert read.manifest["counts"]["patches_per_image"] == 5 and read.manifest["counts"]["indexed_images"] == 3
    for wrong in (np.r_[0:5, 15:20, 10:15], np.r_[0:5, 11:16, 15:20]):
        with pytest.raises(ValueError, match="not increasing image"):
            write_bundle(tmp_path / "c", index, {**gallery, "patch_ids": wrong})


def test_a_pointer_to_a_missing_build_is_refused(tmp_path):
    build = write_bundle(tmp_path / "b", *_parts()[:2])
    shutil.rmtree(build)
    with pytest.raises(CacheError, match="missing part of the search index; re-run task=index"):
        read_bundle(tmp_path / "b", dim=8)


def test_a_legacy_bundle_is_refused_and_replaced_by_the_next_write(tmp_path):
    index, gallery, _ = _parts()
    folder = tmp_path / "b"
    folder.mkdir()
    faiss.write_index(index, str(folder / "index.faiss"))
    save_arrays(folder / "gallery.npz", **gallery)
    with pytest.raises(CacheError, match="predates the atomic bundle format; re-run task=index") as err:
        read_bundle(folder, dim=8)
    assert "features are reused" in str(err.value)
    build = write_bundle(folder, index, gallery)
    assert {p.name for p in folder.iterdir() if p.name != ".lock"} == {POINTER, build.name}
    assert read_bundle(folder, dim=8).build == build


def test_a_writer_gives_inconsistent_parts_no_chance(tmp_path):
    index, gallery, _ = _parts()
    with pytest.raises(ValueError, match="11 patch rows for 12 index rows"):
        write_bundle(tmp_path / "b", index, {**gallery, "patch_image": gallery["patch_image"][:-1]})
    assert not (tmp_path / "b" / POINTER).exists()


# ----------------------------------------------------------------------------- through task=index / task=search


@pytest.fixture
def photos(tmp_path, ilias_fixture):
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in sorted((ilias_fixture / "ilias_core").glob("*/pos/*.jpg"))[:5]:
        shutil.copy(path, folder / path.name)
    return folder


def _config(tmp_path, folder, *extra):
    return compose_config(["experiment=smoke", "dataset=folder", f"dataset.root={folder}",
                           f"paths.features={tmp_path / 'f'}", f"paths.indices={tmp_path / 'i'}", "pyramid.level=1",
                           *extra])


def _top(tmp_path, folder, query, name) -> dict:
    run(_config(tmp_path, folder, "task=search", f"query.path={query}"), tmp_path / name)
    (result,) = json.loads((tmp_path / name / "search.json").read_text())["queries"]
    return result["results"][0]


def test_task_index_killed_after_the_index_file_keeps_answering_right(tmp_path, photos, monkeypatch):
    """The issue's case: an image renamed and re-extracted, task=index killed between index.faiss and
    the gallery arrays. Search still answers from the previous bundle, whole: the right file with its own box."""
    first = run(_config(tmp_path, photos, "task=index"), tmp_path / "index")
    query = sorted(photos.glob("*.jpg"))[2]
    before = _top(tmp_path, photos, query, "s1")
    assert before["path"] == str(query) and before["score"] == pytest.approx(1, abs=1e-4)
    renamed = photos / "Z_renamed.jpg"
    query.rename(renamed)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle_module, "_save_gallery", killed)
    with pytest.raises(KeyboardInterrupt):
        run(_config(tmp_path, photos, "task=index"), tmp_path / "killed")
    monkeypatch.undo()
    after = _top(tmp_path, photos, renamed, "s2")  # the old bundle: the old name, its own box, nothing mixed
    assert after == {**before, "missing": True}  # and it says the old name is gone from disk
    second = run(_config(tmp_path, photos, "task=index"), tmp_path / "index2")
    assert second["extracted"] == 0 and Path(second["build"]) != Path(first["build"])
    assert not Path(first["build"]).exists()
    fresh = _top(tmp_path, photos, renamed, "s3")
    assert fresh["path"] == str(renamed) and fresh["box"] == before["box"]


def test_task_search_on_a_tampered_or_legacy_bundle_is_one_line(tmp_path, photos):
    summary = run(_config(tmp_path, photos, "task=index"), tmp_path / "index")
    build, query = Path(summary["build"]), sorted(photos.glob("*.jpg"))[0]
    part = build / "gallery" / "patch_image.npy"
    np.save(part, np.load(part)[::-1].copy())
    with pytest.raises(CacheError, match="patch_image.npy: content differs from the manifest.*re-run task=index"):
        _top(tmp_path, photos, query, "s1")
    folder = Path(summary["bundle"])  # a bundle of the first layout: loose files, no current.json
    shutil.copy(build / "index.faiss", folder / "index.faiss")
    save_arrays(folder / "gallery.npz", ids=np.load(build / "gallery" / "ids.npy"))
    shutil.rmtree(build)
    (folder / POINTER).unlink()
    with pytest.raises(CacheError, match="predates the atomic bundle format; re-run task=index"):
        _top(tmp_path, photos, query, "s2")
    run(_config(tmp_path, photos, "task=index"), tmp_path / "index2")
    assert _top(tmp_path, photos, query, "s3")["path"] == str(query)


def test_search_without_a_bundle_says_to_index_first(tmp_path, photos):
    with pytest.raises(DataError, match="run task=index first"):
        _top(tmp_path, photos, sorted(photos.glob("*.jpg"))[0], "s")


def test_bundle_search_maps_ids_to_rows_and_refuses_foreign_ids(tmp_path):
    """task=search over a sharded bundle: results come back as gallery rows (rows are stored in id order),
    equal to the row-table search; an id the gallery table lacks is one line, never a wrong row."""
    from patchify.search import rows_of_ids, search_images
    from patchify.tasks.search import BundleSearch

    rng = np.random.default_rng(5)
    images, per_image = np.array([0, 2, 3]), 5  # image 1 unreadable
    ids = (images[:, None] * per_image + np.arange(per_image)).ravel()
    vectors = rng.standard_normal((15, 8)).astype(np.float32)
    order = rng.permutation(15)  # the index holds the rows in another order than the table
    index = faiss.IndexIDMap(faiss.IndexFlatIP(8))
    index.add_with_ids(vectors[order], ids[order])
    gallery = {"ids": np.asarray(list("abcd")), "paths": np.asarray(list("abcd")), "levels": np.asarray([0, 1]),
               "patch_image": np.repeat(images, per_image)[order], "patch_ids": ids[order],
               "boxes": np.arange(60, dtype=np.float32).reshape(15, 4)[order]}
    read = read_bundle(write_bundle(tmp_path / "b", index, gallery).parent, dim=8)
    assert np.array_equal(read.gallery["patch_ids"], ids)  # stored in id order
    search = BundleSearch(read)
    assert search.owners.image is None
    queries = rng.standard_normal((4, 8)).astype(np.float32)
    hits = search(queries, 3, "IP")
    expected = search_images(index, queries, gallery["patch_image"], 3, row_of_id=rows_of_ids(gallery["patch_ids"]))
    assert np.array_equal(hits.images, expected.images)
    assert np.array_equal(read.gallery["boxes"][hits.patches], gallery["boxes"][expected.patches])
    foreign = faiss.IndexIDMap(faiss.IndexFlatIP(8))
    foreign.add_with_ids(vectors, ids + 1)  # ids 1..20: 5, 10, 20 are no gallery patch's
    read.index = foreign
    with pytest.raises(bundle_module.faiss_index.IndexConfigError, match="ids no gallery patch has.*re-run task=index"):
        BundleSearch(read)(vectors[[4, 9, 14]], 3, "IP")
