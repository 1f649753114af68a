"""Feature caches identify an image by its bytes: never another image's features, identical files once,
no folder evicting another, chunks checked on write and on read (src/patchify/digests.py, src/patchify/extraction.py)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from conftest import compose_config
from PIL import Image

from patchify.data import ImageRecord
from patchify.digests import DigestMemo, ImageKeys, file_digest
from patchify.extraction import ExtractionError, FeatureStore, warn_old_stores
from patchify.pipeline import run

STAMP = 1_704_110_400  # 2024-01-01 12:00 UTC, as `touch -d` would set it


def _bmp(path, seed):
    """A 400x300 BMP: every such file has the same byte size, whatever its pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    os.utime(path, (STAMP, STAMP))
    return path


def _search(base, folder, query, tmp_path, name):
    out = tmp_path / name
    run(compose_config(base + ["task=search", f"dataset.root={folder}", f"query.path={query}"]), out)
    return json.loads((out / "search.json").read_text())["queries"][0]["results"]


def _index(base, folder, tmp_path, name):
    out = tmp_path / name
    run(compose_config(base + ["task=index", f"dataset.root={folder}"]), out)
    return json.loads((out / "index.json").read_text())


@pytest.fixture
def folder_overrides(tmp_path):
    return ["experiment=smoke", "dataset=folder", "pyramid.level=1", f"paths.features={tmp_path / 'features'}",
            f"paths.indices={tmp_path / 'indices'}", f"paths.logs={tmp_path / 'logs'}"]


def test_same_name_size_and_mtime_in_another_folder_gets_its_own_features(tmp_path, folder_overrides):
    x, y = _bmp(tmp_path / "colX" / "a.bmp", 1), _bmp(tmp_path / "colY" / "a.bmp", 2)
    _bmp(tmp_path / "colX" / "b.bmp", 3), _bmp(tmp_path / "colY" / "b.bmp", 4)
    assert x.stat().st_size == y.stat().st_size and x.stat().st_mtime_ns == y.stat().st_mtime_ns
    _index(folder_overrides, tmp_path / "colX", tmp_path, "ix")
    summary = _index(folder_overrides, tmp_path / "colY", tmp_path, "iy")
    assert summary["extracted"] == 2 and summary["reused"] == 0
    top = _search(folder_overrides, tmp_path / "colY", y, tmp_path, "s")[0]
    assert top["path"] == str(y) and top["score"] == pytest.approx(1.0, abs=1e-4)


def test_identical_files_are_encoded_once_and_folders_do_not_evict_each_other(tmp_path, folder_overrides):
    original = [_bmp(tmp_path / "album" / f"P{i:02d}.bmp", i) for i in range(6)]
    copies = tmp_path / "copies"
    copies.mkdir()
    for i, path in enumerate(original[:3]):
        shutil.copy(path, copies / f"D{i:06d}.bmp")  # same bytes, other names
    shutil.copy(original[0], copies / "again.bmp")
    first = _index(folder_overrides, tmp_path / "album", tmp_path, "a1")
    assert first["extracted"] == 6
    second = _index(folder_overrides, copies, tmp_path, "c")
    assert second["extracted"] == 0 and second["reused"] == 4
    third = _index(folder_overrides, tmp_path / "album", tmp_path, "a2")
    assert third["extracted"] == 0 and third["reused"] == 6


def test_identical_files_in_one_gallery_are_encoded_once_and_both_indexed(tmp_path, folder_overrides):
    a = _bmp(tmp_path / "g" / "a.bmp", 7)
    shutil.copy(a, tmp_path / "g" / "copy_of_a.bmp")
    _bmp(tmp_path / "g" / "c.bmp", 8)
    summary = _index(folder_overrides, tmp_path / "g", tmp_path, "i")
    assert summary["extracted"] == 2 and summary["patches"] == 3 * 5
    scores = {hit["path"]: hit["score"] for hit in _search(folder_overrides, tmp_path / "g", a, tmp_path, "s")}
    assert scores[str(a)] == pytest.approx(scores[str(tmp_path / "g" / "copy_of_a.bmp")])


def test_digest_memo_rehashes_an_edited_file_even_with_its_old_mtime(tmp_path):
    path = _bmp(tmp_path / "a.bmp", 1)
    memo = DigestMemo(tmp_path / "memo", collection="c")
    before = memo.digest(path)
    memo.save()
    _bmp(path, 2)  # new pixels, same size, mtime set back
    again = DigestMemo(tmp_path / "memo", collection="c")
    assert again.digest(path) == file_digest(path) != before


def test_box_region_key_changes_with_the_boxes(tmp_path):
    path = _bmp(tmp_path / "q.bmp", 1)
    keys = ImageKeys()
    a = ImageRecord(id="q", path=path, boxes=((10, 10, 50, 50),))
    b = ImageRecord(id="q", path=path, boxes=((10, 10, 60, 50),))
    assert keys.key(a, "full") == keys.key(b, "full") != keys.key(a, "bbox") != keys.key(b, "bbox")


def _store(tmp_path, level=0):
    store = FeatureStore(tmp_path / "f", "m", {"weights": "x"}, level=level, mode="crop", region="full")
    store.open()
    return store


def test_an_inconsistent_chunk_is_never_written(tmp_path):
    record = ImageRecord(id="a", path=_bmp(tmp_path / "a.bmp", 1))
    store = _store(tmp_path, level=1)
    with pytest.raises(ExtractionError, match="inconsistent cache chunk"):  # what batch_size=-1 used to write
        store.write_chunk([record], counts=[4], vectors=np.zeros((0, 8), np.float32),
                          boxes=np.zeros((4, 4), np.float32), errors=[""], dim=8)
    with pytest.raises(ExtractionError, match="patches per image"):
        store.write_chunk([record], counts=[3], vectors=np.zeros((3, 8), np.float32),
                          boxes=np.zeros((3, 4), np.float32), errors=[""], dim=8)
    assert not list(store.folder.glob("chunk-*"))


def _chunk(store):
    (path,) = store.folder.glob("chunk-*.npz")
    return path


def _run_eval(overrides, tmp_path, name):
    out = tmp_path / name
    metrics = run(compose_config(overrides), out)
    return metrics, json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("damage", ["flip_vector_byte", "inconsistent_offsets", "truncate"])
def test_a_damaged_chunk_is_set_aside_and_recomputed(smoke_overrides, tmp_path, damage):
    overrides = smoke_overrides + ["pyramid.level=1", "extract.chunk_size=1000"]
    clean, _ = _run_eval(overrides, tmp_path, "clean")
    (gallery_store,) = [p for p in (tmp_path / "features").glob("test_vit.crop.L1-*")]
    path = _chunk(type("S", (), {"folder": gallery_store})())
    data = bytearray(path.read_bytes())
    if damage == "flip_vector_byte":
        at = data.index(b"vectors.npy") + 4000  # inside the vectors member's data
        data[at] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        arrays = dict(np.load(path))
        arrays["offsets"] = arrays["offsets"] * 0  # what batch_size=-1 left behind: offsets, no vectors
        arrays["vectors"] = arrays["vectors"][:0]
        arrays["boxes"] = arrays["boxes"][:0]
        import io

        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        data = buffer.getvalue()
    path.write_bytes(bytes(data))
    again, written = _run_eval(overrides, tmp_path, "again")
    assert written["counts"]["extracted_images"] > 0
    assert again["mAP"] == pytest.approx(clean["mAP"]) and again["LocScore"] == pytest.approx(clean["LocScore"])
    assert list(gallery_store.glob("*.corrupt"))


def test_unreadable_images_stay_listed_on_every_run(tmp_path, folder_overrides):
    _bmp(tmp_path / "g" / "a.bmp", 1), _bmp(tmp_path / "g" / "b.bmp", 2)
    (tmp_path / "g" / "broken.jpg").write_text("not an image")
    Image.new("RGB", (1, 1)).save(tmp_path / "g" / "dot.png")
    first = _index(folder_overrides, tmp_path / "g", tmp_path, "i1")
    second = _index(folder_overrides, tmp_path / "g", tmp_path, "i2")
    assert second["extracted"] == 0
    assert [line.split(":")[0] for line in first["skipped"]] == [line.split(":")[0] for line in second["skipped"]]
    assert {os.path.basename(line.split(":")[0]) for line in second["skipped"]} == {"broken.jpg", "dot.png"}


def test_old_format_caches_are_named_not_read(tmp_path, warnings_log):
    old = tmp_path / "features" / "m.crop.L0-abc"
    old.mkdir(parents=True)
    (old / "meta.json").write_text(json.dumps({"format": 1}))
    warn_old_stores(tmp_path / "features")
    assert any("not read" in m and str(old) in m for m in warnings_log)


def test_corrupt_store_metadata_is_rewritten_and_chunks_kept(smoke_overrides, tmp_path, warnings_log):
    overrides = smoke_overrides + ["pyramid.level=0"]
    _run_eval(overrides, tmp_path, "first")
    for meta in (tmp_path / "features").glob("test_vit.*/meta.json"):
        meta.write_text("{not json")
    _, written = _run_eval(overrides, tmp_path, "again")
    assert written["counts"]["extracted_images"] == 0
    assert any("rewritten from the settings" in m for m in warnings_log)


def test_a_result_deleted_since_indexing_is_flagged(tmp_path, folder_overrides, warnings_log):
    a, b = _bmp(tmp_path / "g" / "a.bmp", 1), _bmp(tmp_path / "g" / "b.bmp", 2)
    _index(folder_overrides, tmp_path / "g", tmp_path, "i")
    query = tmp_path / "q.bmp"
    shutil.copy(b, query)
    b.unlink()
    hits = {hit["path"]: hit for hit in _search(folder_overrides, tmp_path / "g", query, tmp_path, "s")}
    assert hits[str(b)].get("missing") is True and "missing" not in hits[str(a)]
    assert any("no longer exist on disk" in m for m in warnings_log)
