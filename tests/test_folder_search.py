"""A user's folder: task=index, then task=search with a picture (timm test ViT)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from conftest import compose_config
from PIL import Image

from patchify.data import DataError
from patchify.pipeline import run


@pytest.fixture
def photo_folder(tmp_path, ilias_fixture):
    folder = tmp_path / "photos"
    (folder / "trip" / "day1").mkdir(parents=True)
    for i, path in enumerate(sorted((ilias_fixture / "ilias_core").glob("*/pos/*.jpg"))[:6]):
        shutil.copy(path, folder / ("trip/day1" if i % 2 else "") / path.name)
    (folder / "broken.jpg").write_text("not an image")
    return folder


def _overrides(tmp_path, folder, *extra):
    return ["experiment=smoke", "dataset=folder", f"dataset.root={folder}", f"paths.features={tmp_path / 'f'}",
            f"paths.indices={tmp_path / 'i'}", "pyramid.level=1", *extra]


def test_index_then_search_finds_the_same_photo(tmp_path, photo_folder):
    summary = run(compose_config(_overrides(tmp_path, photo_folder, "task=index")), tmp_path / "run_index")
    assert summary["images"] == 6 and summary["patches"] == 6 * 5
    assert any("broken.jpg" in line for line in summary["skipped"])

    query = next(photo_folder.glob("trip/day1/*.jpg"))
    run(compose_config(_overrides(tmp_path, photo_folder, "task=search", f"query.path={query}")), tmp_path / "run_search")
    written = json.loads((tmp_path / "run_search" / "search.json").read_text())
    assert written["skipped"] == []
    (result,) = written["queries"]
    best = result["results"][0]
    assert best["path"] == str(query) and best["score"] == pytest.approx(1.0, abs=1e-4)
    assert len(result["results"]) == 6  # k=10 asked, 6 images exist: all of them, each once
    assert list((tmp_path / "run_search").glob("search_*.jpg"))


def test_adding_photos_encodes_only_the_new_ones(tmp_path, photo_folder, ilias_fixture):
    run(compose_config(_overrides(tmp_path, photo_folder, "task=index")), tmp_path / "a")
    new = sorted((ilias_fixture / "ilias_core").glob("*/pos/*.jpg"))[-1]
    shutil.copy(new, photo_folder / "new.jpg")
    summary = run(compose_config(_overrides(tmp_path, photo_folder, "task=index")), tmp_path / "b")
    assert summary["images"] == 7
    assert summary["extracted"] == 1  # the new photo (levels 0 and 1 in one pass)


def test_search_errors_are_one_line(tmp_path, photo_folder):
    with pytest.raises(DataError, match="run task=index first"):
        run(compose_config(_overrides(tmp_path, photo_folder, "task=search", f"query.path={photo_folder / 'broken.jpg'}")),
            tmp_path / "a")
    run(compose_config(_overrides(tmp_path, photo_folder, "task=index")), tmp_path / "b")
    with pytest.raises(DataError, match="query image not found"):
        run(compose_config(_overrides(tmp_path, photo_folder, "task=search", f"query.path={tmp_path / 'nope.jpg'}")),
            tmp_path / "c")
    with pytest.raises(DataError, match="unreadable image"):
        run(compose_config(_overrides(tmp_path, photo_folder, "task=search", f"query.path={photo_folder / 'broken.jpg'}")),
            tmp_path / "d")


def test_empty_folder_is_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no readable images"):
        run(compose_config(_overrides(tmp_path, tmp_path / "empty", "task=index")), tmp_path / "a")


# ----------------------------------------------------------------------------- query folders


def _search(tmp_path, folder, query, name):
    run(compose_config(_overrides(tmp_path, folder, "task=search", f"query.path={query}")), tmp_path / name)
    return json.loads((tmp_path / name / "search.json").read_text())


def test_bad_files_in_a_query_folder_are_skipped_and_listed(tmp_path, photo_folder, warnings_log):
    """One unreadable query never stops the others: each is skipped and listed, the rest searched, search.json
    written; hidden files (macOS's ._*), folders named like images and looping links never hang the scan."""
    run(compose_config(_overrides(tmp_path, photo_folder, "task=index")), tmp_path / "index")
    photos = sorted(photo_folder.rglob("P*.jpg"))
    queries = tmp_path / "queries"
    (queries / "album.jpg").mkdir(parents=True)  # a folder, not an image
    shutil.copy(photos[0], queries / "a_ok.jpg")
    (queries / "b_broken.jpg").write_text("not an image")
    shutil.copy(photos[1], queries / "c_ok.jpg")
    (queries / "._a.jpg").write_bytes(b"\x00\x05\x16\x07" + bytes(80))  # AppleDouble resource fork
    (queries / "d_empty.jpg").write_bytes(b"")
    os.symlink("e_loop.jpg", queries / "e_loop.jpg")  # a link to itself
    os.symlink("..", queries / "album.jpg" / "up")  # a folder loop: never followed
    written = _search(tmp_path, photo_folder, queries, "search")
    assert [q["query"] for q in written["queries"]] == [str(queries / "a_ok.jpg"), str(queries / "c_ok.jpg")]
    for query, photo in zip(written["queries"], photos):
        assert query["results"][0]["path"] == str(photo) and query["results"][0]["score"] == pytest.approx(1, abs=1e-4)
    assert [line.split(":")[0] for line in written["skipped"]] == [
        str(queries / name) for name in ("b_broken.jpg", "d_empty.jpg", "e_loop.jpg")]
    assert all("\n" not in line for line in written["skipped"])
    assert sum("skipped query" in message for message in warnings_log) == 3
    assert len(list((tmp_path / "search").glob("search_*.jpg"))) == 2


def test_a_query_folder_without_one_readable_image_is_one_line_after_listing(tmp_path, photo_folder):
    run(compose_config(_overrides(tmp_path, photo_folder, "task=index")), tmp_path / "index")
    queries = tmp_path / "queries"
    queries.mkdir()
    (queries / "a.jpg").write_text("text")
    (queries / "b.png").write_bytes(b"")
    with pytest.raises(DataError, match="none of the 2 query images is readable") as err:
        _search(tmp_path, photo_folder, queries, "search")
    assert "\n" not in str(err.value)
    written = json.loads((tmp_path / "search" / "search.json").read_text())
    assert written["queries"] == [] and len(written["skipped"]) == 2


# ----------------------------------------------------------------------------- skipped images


def test_undecodable_images_are_skipped_and_listed_on_every_run(tmp_path, photo_folder):
    """A truncated JPEG and a 1x1 PNG (too small for level 1) pass the header scan but fail to decode: they are
    listed by every run, also when their failure comes from the cache, and never counted as indexed."""
    full = photo_folder / "trip" / "day1" / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full)
    (photo_folder / "truncated.jpg").write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    full.unlink()
    Image.new("RGB", (1, 1)).save(photo_folder / "tiny.png")
    first = run(compose_config(_overrides(tmp_path, photo_folder, "task=index")), tmp_path / "a")
    second = run(compose_config(_overrides(tmp_path, photo_folder, "task=index")), tmp_path / "b")
    named = {line.split(":")[0] for line in first["skipped"]}
    assert named == {str(photo_folder / name) for name in ("broken.jpg", "truncated.jpg", "tiny.png")}
    assert second["extracted"] == 0 and second["skipped"] == first["skipped"]
    assert first["images"] == second["images"] == 6 and first["patches"] == second["patches"] == 6 * 5
