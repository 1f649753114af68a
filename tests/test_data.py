"""Tests for src/patchify/data.py: box files, image decoding, the ILIAS layout, folders and manifests."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from conftest import compose_config
from fixtures import make_ilias_fixture
from PIL import Image

from patchify.data import (
    DataError,
    ImageRecord,
    annotation_gaps,
    image_files,
    image_size,
    load_image,
    read_box_file,
    read_folder,
    read_ilias_layout,
    read_manifest,
    write_manifest,
)

# ----------------------------------------------------------------------------- helpers


def _box_file(tmp_path: Path, text: str, name: str = "Q000_00_bbox.txt") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def _starts_with_path(err: pytest.ExceptionInfo, path: Path) -> None:
    assert str(err.value).startswith(str(path)), str(err.value)


@pytest.fixture
def ilias_copy(tmp_path) -> Path:
    """A private ILIAS-layout fixture each test may modify."""
    return make_ilias_fixture(tmp_path / "ilias")


# ----------------------------------------------------------------------------- read_box_file


def test_box_file_single_line(tmp_path):
    assert read_box_file(_box_file(tmp_path, "10 20 30 40\n"), 100, 100) == ((10.0, 20.0, 30.0, 40.0),)


def test_box_file_several_lines_commas_tabs_and_blank_lines(tmp_path):
    text = "\n1 2 3 4\n\n   \n5,6,7,8\r\n9, 10\t11 12\n\n"
    boxes = read_box_file(_box_file(tmp_path, text), 100, 100)
    assert boxes == ((1.0, 2.0, 3.0, 4.0), (5.0, 6.0, 7.0, 8.0), (9.0, 10.0, 11.0, 12.0))
    assert all(isinstance(v, float) for box in boxes for v in box)


def test_box_file_fractional_values(tmp_path):
    assert read_box_file(_box_file(tmp_path, "1.5 2.25 3.5 4\n"), 10, 10) == ((1.5, 2.25, 3.5, 4.0),)


@pytest.mark.parametrize("line", ["1 2 3", "1 2 3 4 5", "a b c d", "10 20 thirty 40"])
def test_box_file_malformed_line_names_file_and_line(tmp_path, line):
    path = _box_file(tmp_path, f"1 1 5 5\n\n{line}\n")
    with pytest.raises(DataError) as err:
        read_box_file(path, 100, 100)
    assert f"{path}:3:" in str(err.value)  # blank line 2 still counts
    assert line in str(err.value)


@pytest.mark.parametrize("line", ["10 10 0 5", "10 10 5 0", "10 10 -5 5", "10 10 5 -1"])
def test_box_file_non_positive_size_is_an_error(tmp_path, line):
    path = _box_file(tmp_path, f"1 1 5 5\n{line}\n")
    with pytest.raises(DataError, match="must be positive") as err:
        read_box_file(path, 100, 100)
    assert f"{path}:2:" in str(err.value)


@pytest.mark.parametrize("line", ["90 10 20 10", "10 95 5 10", "-5 10 20 10", "10 -2 5 5", "0 0 102 50"])
def test_box_file_box_outside_the_image_is_an_error(tmp_path, line):
    path = _box_file(tmp_path, f"{line}\n")
    with pytest.raises(DataError, match="outside the 100x80 image") as err:
        read_box_file(path, 100, 80)
    assert f"{path}:1:" in str(err.value)


def test_box_file_border_touching_boxes_are_accepted_and_clipped(tmp_path):
    text = "0 0 100 80\n-0.5 -1 10.5 11\n95 75 6 6\n"
    boxes = read_box_file(_box_file(tmp_path, text), 100, 80)
    assert boxes[0] == (0.0, 0.0, 100.0, 80.0)
    assert boxes[1] == (0.0, 0.0, 10.0, 10.0)  # clipped at the top-left corner
    assert boxes[2] == (95.0, 75.0, 5.0, 5.0)  # clipped at the bottom-right corner
    for x, y, w, h in boxes:
        assert x >= 0 and y >= 0 and x + w <= 100 and y + h <= 80


def test_box_file_without_any_box_is_an_error(tmp_path):
    path = _box_file(tmp_path, "\n  \n")
    with pytest.raises(DataError) as err:
        read_box_file(path, 100, 100)
    _starts_with_path(err, path)


@pytest.mark.parametrize("line", ["nan 0 10 10", "0 0 nan 10"])
def test_box_file_nan_values_are_an_error(tmp_path, line):
    try:
        boxes = read_box_file(_box_file(tmp_path, line + "\n"), 100, 100)
    except DataError:
        return
    assert all(math.isfinite(v) for box in boxes for v in box), boxes


@pytest.mark.parametrize("line", ["100 10 1 10", "-1 10 1 10"])
def test_box_file_box_wholly_outside_never_yields_an_empty_box(tmp_path, line):
    try:
        boxes = read_box_file(_box_file(tmp_path, line + "\n"), 100, 100)
    except DataError:
        return
    assert all(w > 0 and h > 0 for _, _, w, h in boxes), boxes


# ----------------------------------------------------------------------------- load_image


def test_load_image_rgb_passthrough(tmp_path):
    path = _save(Image.new("RGB", (7, 5), (10, 200, 30)), tmp_path / "rgb.png")
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (7, 5)
    assert image.getpixel((3, 2)) == (10, 200, 30)


def test_load_image_grayscale(tmp_path):
    path = _save(Image.new("L", (6, 4), 77), tmp_path / "gray.png")
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (6, 4)
    assert image.getpixel((0, 0)) == (77, 77, 77)


def _palette_image(transparent: int | None) -> Image.Image:
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (768 - 9))
    image.putpixel((0, 0), 2)
    return image


def test_load_image_palette(tmp_path):
    path = _save(_palette_image(None), tmp_path / "p.png")
    assert Image.open(path).mode == "P"
    image = load_image(path)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (0, 0, 255) and image.getpixel((2, 2)) == (255, 0, 0)


def test_load_image_palette_with_transparency_on_white(tmp_path):
    path = _save(_palette_image(1), tmp_path / "pt.png", transparency=1)
    with Image.open(path) as raw:
        assert raw.mode == "P" and raw.info.get("transparency") == 1
    image = load_image(path)
    assert image.mode == "RGB"
    assert image.getpixel((2, 2)) == (255, 255, 255)  # transparent index -> white, not red
    assert image.getpixel((0, 0)) == (0, 0, 255)


@pytest.mark.parametrize("suffix", [".tif", ".jpg"])
def test_load_image_cmyk(tmp_path, suffix):
    path = _save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / f"cmyk{suffix}")
    assert Image.open(path).mode == "CMYK"
    image = load_image(path)
    assert image.mode == "RGB"
    r, g, b = image.getpixel((4, 4))
    assert r > 240 and g < 15 and b < 15


def test_load_image_16bit_is_scaled_not_clipped(tmp_path):
    array = np.zeros((4, 6), np.uint16)
    array[:, :3], array[:, 3:] = 30000, 60000
    path = _save(Image.fromarray(array), tmp_path / "g16.png")
    assert Image.open(path).mode.startswith("I")
    image = load_image(path)
    assert image.mode == "RGB"
    assert image.getpixel((5, 0)) == (255, 255, 255)
    assert abs(image.getpixel((0, 0))[0] - 127) <= 1  # half of the maximum, not saturated to 255


def test_load_image_rgba_alpha_on_white(tmp_path):
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    image.putpixel((1, 1), (255, 0, 0, 255))
    image.putpixel((2, 2), (255, 0, 0, 128))
    path = _save(image, tmp_path / "rgba.png")
    out = load_image(path)
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)  # fully transparent red -> white
    assert out.getpixel((1, 1)) == (255, 0, 0)
    r, g, b = out.getpixel((2, 2))
    assert r == 255 and 120 <= g <= 135 and 120 <= b <= 135


def test_load_image_la_alpha_on_white(tmp_path):
    image = Image.new("LA", (4, 4), (50, 0))
    image.putpixel((3, 3), (50, 255))
    out = load_image(_save(image, tmp_path / "la.png"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)
    assert out.getpixel((3, 3)) == (50, 50, 50)


def test_load_image_applies_exif_orientation(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(image, tmp_path / "rotated.jpg", exif=exif, quality=95)
    with Image.open(path) as raw:
        assert raw.size == (40, 20) and raw.getexif().get(0x0112) == 6
    out = load_image(path)
    assert out.size == (20, 40)
    assert image_size(path) == (20, 40) == out.size
    top, bottom = out.getpixel((10, 5)), out.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # former left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_image_size_without_orientation(tmp_path):
    path = _save(Image.new("RGB", (33, 17)), tmp_path / "plain.jpg")
    assert image_size(path) == (33, 17)


def test_image_size_unreadable_is_a_data_error(tmp_path):
    path = tmp_path / "text.jpg"
    path.write_text("not an image")
    with pytest.raises(DataError) as err:
        image_size(path)
    _starts_with_path(err, path)


def test_load_image_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(DataError, match="empty") as err:
        load_image(path)
    _starts_with_path(err, path)


def test_load_image_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("these are not pixels\n" * 10)
    with pytest.raises(DataError, match="unreadable") as err:
        load_image(path)
    _starts_with_path(err, path)


def test_load_image_truncated_jpeg(tmp_path):
    rng = np.random.default_rng(0)
    full = _save(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), tmp_path / "full.jpg")
    path = tmp_path / "truncated.jpg"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(DataError) as err:
        load_image(path)
    _starts_with_path(err, path)


def test_load_image_missing_file(tmp_path):
    path = tmp_path / "nowhere.jpg"
    with pytest.raises(DataError, match="not found") as err:
        load_image(path)
    _starts_with_path(err, path)


@pytest.mark.parametrize("side", [12, 20])  # 144 px: warning range (> limit); 400 px: error range (> 2x limit)
def test_load_image_decompression_bomb(tmp_path, monkeypatch, side):
    path = _save(Image.new("RGB", (side, side)), tmp_path / "bomb.png")
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match="too large") as err:
        load_image(path)
    _starts_with_path(err, path)


def test_load_image_below_bomb_limit_is_fine(tmp_path, monkeypatch):
    path = _save(Image.new("RGB", (9, 9)), tmp_path / "small.png")
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)
    assert load_image(path).size == (9, 9)


# ----------------------------------------------------------------------------- ILIAS layout


def test_read_ilias_layout_counts_ids_and_boxes(ilias_fixture):
    dataset = read_ilias_layout(ilias_fixture)
    assert len(dataset.queries) == 4 and len(dataset.gallery) == 12 and dataset.skipped == []
    instances = {f"thing_{i:03d}" for i in range(4)}
    assert {r.instance for r in dataset.queries} == instances
    assert dataset.queries[0].id == "thing_000/query/Q000_00.jpg"
    for record in dataset.queries + dataset.gallery:
        parts = record.id.split("/")
        assert parts[0] == record.instance and parts[1] in ("query", "pos")
        assert record.path == ilias_fixture / "ilias_core" / record.id
        assert record.path.is_file()
        assert len(record.boxes) == 1
        assert (record.width, record.height) == Image.open(record.path).size
    assert dataset.queries[0].boxes == ((40.0, 20.0, 120.0, 120.0),)
    # every positive's box matches its box file
    for record in dataset.gallery:
        x, y, w, h = (float(v) for v in record.path.with_name(record.path.stem + "_bbox.txt").read_text().split())
        assert record.boxes == ((x, y, w, h),)
    assert len({r.id for r in dataset.gallery}) == 12
    assert set(dataset.positives_of("thing_001")) == {r.id for r in dataset.gallery if r.instance == "thing_001"}
    assert dataset.positives_of(None) == {}


def test_read_ilias_layout_with_distractors(ilias_fixture):
    dataset = read_ilias_layout(ilias_fixture, distractors="distractors")
    distractors = [r for r in dataset.gallery if r.instance is None]
    assert len(dataset.gallery) == 16 and len(distractors) == 4
    assert sorted(r.id for r in distractors) == [f"distractors/D{d:06d}.jpg" for d in range(4)]
    assert all(r.boxes == () for r in distractors)
    absolute = read_ilias_layout(ilias_fixture, distractors=str(ilias_fixture / "distractors"))
    assert [r.id for r in absolute.gallery] == [r.id for r in dataset.gallery]


def test_read_ilias_layout_missing_distractor_folder(ilias_fixture):
    with pytest.raises(DataError, match="distractor folder not found"):
        read_ilias_layout(ilias_fixture, distractors="no_such_folder")


def test_read_ilias_layout_missing_root(tmp_path):
    root = tmp_path / "absent"
    with pytest.raises(DataError, match="not found") as err:
        read_ilias_layout(root)
    assert str(root / "ilias_core") in str(err.value)


def test_read_ilias_layout_empty_core(tmp_path):
    (tmp_path / "ilias_core").mkdir()
    with pytest.raises(DataError, match="empty") as err:
        read_ilias_layout(tmp_path)
    _starts_with_path(err, tmp_path / "ilias_core")


def test_read_ilias_layout_without_queries(tmp_path):
    (tmp_path / "ilias_core" / "thing" / "pos").mkdir(parents=True)
    _save(Image.new("RGB", (20, 20)), tmp_path / "ilias_core" / "thing" / "pos" / "P.jpg")
    with pytest.raises(DataError, match="no query images"):
        read_ilias_layout(tmp_path)


def test_read_ilias_layout_bad_box_file_is_fatal_and_named(ilias_copy):
    box = ilias_copy / "ilias_core" / "thing_002" / "pos" / "P002_01_bbox.txt"
    box.write_text("1 2 3 4\n1 2 3\n")
    with pytest.raises(DataError) as err:
        read_ilias_layout(ilias_copy)
    assert f"{box}:2:" in str(err.value)


def test_read_ilias_layout_ignores_hidden_and_non_image_files(ilias_copy):
    pos = ilias_copy / "ilias_core" / "thing_000" / "pos"
    (pos / "notes.txt").write_text("x")
    shutil.copy(pos / "P000_00.jpg", pos / ".hidden.jpg")
    (ilias_copy / "ilias_core" / "README").write_text("not an instance")
    dataset = read_ilias_layout(ilias_copy)
    assert len(dataset.gallery) == 12 and len(dataset.queries) == 4


# ----------------------------------------------------------------------------- folders


def test_read_folder_nested_mixed_extensions_and_skips_unreadable(tmp_path):
    root = tmp_path / "photos"
    formats = {"a.jpg": "JPEG", "sub/b.png": "PNG", "sub/deeper/c.webp": "WEBP", "d.bmp": "BMP",
               "sub/e.tiff": "TIFF", "f.TIF": "TIFF", "g.JPEG": "JPEG"}
    for i, (name, fmt) in enumerate(formats.items()):
        _save(Image.new("RGB", (10 + i, 8)), root / name, format=fmt)
    (root / "broken.jpg").write_text("not an image")
    (root / "empty.png").write_bytes(b"")
    (root / "readme.txt").write_text("ignored")
    dataset = read_folder(root)
    assert sorted(r.id for r in dataset.gallery) == sorted(formats)
    assert all(r.instance is None and r.boxes == () for r in dataset.gallery)
    sizes = {r.id: (r.width, r.height) for r in dataset.gallery}
    assert sizes["sub/deeper/c.webp"] == (12, 8)
    assert len(dataset.skipped) == 2
    assert any(str(root / "broken.jpg") in s for s in dataset.skipped)
    assert any(str(root / "empty.png") in s for s in dataset.skipped)
    assert dataset.queries == []


def test_read_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    with pytest.raises(DataError, match="no readable images") as err:
        read_folder(tmp_path)
    _starts_with_path(err, tmp_path)


def test_read_folder_only_unreadable_images_is_an_error(tmp_path):
    (tmp_path / "x.jpg").write_text("x")
    with pytest.raises(DataError, match="no readable images"):
        read_folder(tmp_path)


def test_read_folder_missing(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_folder(tmp_path / "absent")


def test_image_files_ignores_hidden_files_folders_named_like_images_and_link_loops(tmp_path):
    root = tmp_path / "photos"
    for name in ("a.jpg", "sub/b.PNG", "album.jpg/c.jpg", "._a.jpg", ".thumbs/d.jpg", "notes.txt"):
        _save(Image.new("RGB", (4, 4)), root / name, format="PNG")
    os.symlink("loop.jpg", root / "loop.jpg")  # a file link to itself: listed, unreadable
    os.symlink(".", root / "sub" / "again")  # a folder loop: not followed
    os.symlink(root / "sub", root / "linked.jpg")  # a folder link named like an image: not a file, not followed
    os.symlink(root / "a.jpg", root / "sub" / "link_to_a.jpg")  # a file link: read through it
    assert [p.relative_to(root).as_posix() for p in image_files(root)] == [
        "a.jpg", "album.jpg/c.jpg", "loop.jpg", "sub/b.PNG", "sub/link_to_a.jpg"]


def test_read_folder_lists_a_link_loop_and_a_broken_link(tmp_path):
    root = tmp_path / "photos"
    _save(Image.new("RGB", (12, 10)), root / "a.jpg")
    os.symlink("loop.jpg", root / "loop.jpg")
    os.symlink(root / "absent.jpg", root / "dangling.jpg")
    (root / "album.jpg").mkdir()
    dataset = read_folder(root)
    assert [r.id for r in dataset.gallery] == ["a.jpg"]
    assert [line.split(":")[0] for line in dataset.skipped] == [str(root / "dangling.jpg"), str(root / "loop.jpg")]


def test_distractors_are_scanned_by_the_same_walker(ilias_copy):
    distractors = ilias_copy / "distractors"
    (distractors / "set.jpg").mkdir()
    shutil.copy(distractors / "D000000.jpg", distractors / "._D000000.jpg")
    os.symlink(".", distractors / "set.jpg" / "loop")
    dataset = read_ilias_layout(ilias_copy, distractors="distractors")
    assert sorted(r.id for r in dataset.gallery if r.instance is None) == [f"distractors/D{d:06d}.jpg" for d in range(4)]


# ----------------------------------------------------------------------------- annotation gaps


def _with_gaps(root: Path) -> Path:
    """A fixture copy with a positive lacking its box file and an instance whose pos/ is empty."""
    (root / "ilias_core" / "thing_001" / "pos" / "P001_02_bbox.txt").unlink()
    for path in (root / "ilias_core" / "thing_003" / "pos").iterdir():
        path.unlink()
    return root


def test_annotation_gaps_of_the_layout(ilias_copy):
    assert annotation_gaps(read_ilias_layout(ilias_copy)) == {"positives_without_boxes": [],
                                                              "queries_without_positives": []}
    gaps = annotation_gaps(read_ilias_layout(_with_gaps(ilias_copy)))
    assert gaps == {"positives_without_boxes": ["thing_001/pos/P001_02.jpg"],
                    "queries_without_positives": ["thing_003/query/Q003_00.jpg"]}


def _eval(root: Path, tmp_path: Path, name: str) -> dict:
    from patchify.pipeline import run

    run(compose_config(["experiment=smoke", f"dataset.root={root}", "dataset.generate=null", "dataset.name=fixture",
                        f"paths.features={tmp_path / 'features'}", f"paths.indices={tmp_path / 'indices'}",
                        "pyramid.level=1"]), tmp_path / name)
    return json.loads((tmp_path / name / "metrics.json").read_text())


def test_annotation_gaps_are_warned_and_counted_in_metrics(ilias_copy, tmp_path, warnings_log):
    metrics = _eval(_with_gaps(ilias_copy), tmp_path, "run")
    assert metrics["counts"]["positives_without_boxes"] == 1 and metrics["counts"]["queries_without_positives"] == 1
    assert metrics["annotation_gaps"]["queries_without_positives"] == ["thing_003/query/Q003_00.jpg"]
    gap_lines = [m for m in warnings_log if "metrics.json" in m]
    assert len(gap_lines) == 2 and "thing_001/pos/P001_02.jpg" in gap_lines[0] and "_bbox.txt" in gap_lines[0]
    assert "thing_003/query/Q003_00.jpg" in gap_lines[1] and "AP 0" in gap_lines[1]


# ----------------------------------------------------------------------------- a read-only dataset


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.lstat().st_size, p.lstat().st_mtime_ns) for p in root.rglob("*")} | \
        {".": (0, root.stat().st_mtime_ns)}


def test_eval_never_writes_into_the_dataset_folder(ilias_copy, tmp_path):
    """A read-only ILIAS copy (a shared mount) evaluates: the scanned manifests go to the run folder. As root,
    chmod stops nothing, so the listing and every mtime before and after are compared as well."""
    before = _snapshot(ilias_copy)
    if os.geteuid() != 0:
        for path in [ilias_copy, *ilias_copy.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
    try:
        _eval(ilias_copy, tmp_path, "run")
    finally:
        for path in [ilias_copy, *ilias_copy.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)
    assert _snapshot(ilias_copy) == before
    written = read_manifest(tmp_path / "run" / "gallery.json", ilias_copy)
    assert len(written) == 16 and len(read_manifest(tmp_path / "run" / "query.json", ilias_copy)) == 4


def test_pinned_manifests_are_read_from_the_dataset_root(ilias_copy, tmp_path):
    """To pin a subset: edit the run folder's manifests and place them in the dataset root."""
    _eval(ilias_copy, tmp_path, "scan")
    gallery = json.loads((tmp_path / "scan" / "gallery.json").read_text())
    gallery["images"] = gallery["images"][:9]
    (ilias_copy / "gallery.json").write_text(json.dumps(gallery))
    shutil.copy(tmp_path / "scan" / "query.json", ilias_copy / "query.json")
    from patchify.data import load_dataset

    dataset = load_dataset(compose_config([f"dataset.root={ilias_copy}", "dataset.pin_manifest=true"]).dataset)
    assert len(dataset.gallery) == 9 and len(dataset.queries) == 4


# ----------------------------------------------------------------------------- manifests


def test_manifest_round_trip(ilias_fixture, tmp_path):
    dataset = read_ilias_layout(ilias_fixture, distractors="distractors")
    records = dataset.queries + dataset.gallery
    manifest = tmp_path / "gallery.json"
    write_manifest(manifest, records, ilias_fixture)
    content = json.loads(manifest.read_text())
    assert content["version"] == 1 and len(content["images"]) == len(records)
    first = content["images"][0]
    assert first["path"] == "ilias_core/thing_000/query/Q000_00.jpg"
    assert set(first) == {"id", "path", "instance", "boxes", "width", "height"}
    assert read_manifest(manifest, ilias_fixture) == records
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_manifest_listing_a_missing_image(ilias_copy, tmp_path):
    dataset = read_ilias_layout(ilias_copy)
    manifest = tmp_path / "query.json"
    write_manifest(manifest, dataset.queries, ilias_copy)
    dataset.queries[2].path.unlink()
    with pytest.raises(DataError, match="missing") as err:
        read_manifest(manifest, ilias_copy)
    _starts_with_path(err, manifest)
    assert str(dataset.queries[2].path) in str(err.value)


def test_manifest_pins_a_subset(ilias_fixture, tmp_path):
    dataset = read_ilias_layout(ilias_fixture)
    manifest = tmp_path / "gallery.json"
    write_manifest(manifest, dataset.gallery, ilias_fixture)
    content = json.loads(manifest.read_text())
    content["images"] = [e for e in content["images"] if e["instance"] != "thing_003"]
    manifest.write_text(json.dumps(content))
    pinned = read_manifest(manifest, ilias_fixture)
    assert len(pinned) == 9
    assert pinned == [r for r in dataset.gallery if r.instance != "thing_003"]


@pytest.mark.parametrize("text", ["{not json", "[]", '{"version": 1}', '{"version": 1, "images": [{"id": "a"}]}'])
def test_manifest_malformed(tmp_path, text):
    manifest = tmp_path / "query.json"
    manifest.write_text(text)
    with pytest.raises(DataError, match="not a valid manifest") as err:
        read_manifest(manifest, tmp_path)
    _starts_with_path(err, manifest)


def test_manifest_wrong_version_and_missing_file(tmp_path):
    manifest = tmp_path / "query.json"
    manifest.write_text(json.dumps({"version": 2, "images": []}))
    with pytest.raises(DataError, match="version 2"):
        read_manifest(manifest, tmp_path)
    with pytest.raises(DataError, match="manifest not found"):
        read_manifest(tmp_path / "absent.json", tmp_path)


# ----------------------------------------------------------------------------- ImageRecord


def test_object_scale_uses_largest_box():
    record = ImageRecord(id="a", path=Path("a.jpg"), instance="x",
                         boxes=((0, 0, 10, 10), (5, 5, 20, 30)), width=100, height=200)
    assert record.object_scale == pytest.approx(600 / 20000)
    assert record.boxes_array.shape == (2, 4)


@pytest.mark.parametrize("boxes,width,height", [((), 100, 100), (((0, 0, 5, 5),), 0, 100), (((0, 0, 5, 5),), 100, 0)])
def test_object_scale_undefined_is_nan(boxes, width, height):
    record = ImageRecord(id="a", path=Path("a.jpg"), boxes=boxes, width=width, height=height)
    assert math.isnan(record.object_scale)
    assert record.boxes_array.shape == (len(boxes), 4)


def test_an_unreadable_distractor_is_skipped_and_listed_not_fatal(tmp_path):
    root = make_ilias_fixture(tmp_path / "ilias")
    (root / "distractors" / "broken.jpg").write_text("not an image")
    dataset = read_ilias_layout(root, distractors="distractors")
    assert len(dataset.skipped) == 1 and "broken.jpg" in dataset.skipped[0]
    assert all(r.path.name != "broken.jpg" for r in dataset.gallery) and len(dataset.gallery) == 4 * 3 + 4
