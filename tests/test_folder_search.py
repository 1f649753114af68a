"""A user's folder: task=index, then task=search with a picture (timm test ViT)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import compose_config

from src.data import DataError
from src.pipeline import run


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
    (result,) = json.loads((tmp_path / "run_search" / "search.json").read_text())
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
