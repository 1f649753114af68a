"""Tests of the mini-ILIAS generator (src/patchify/datasets/mini_ilias.py).

The font and the photos come from registry packages; they download once into
the shared asset cache (the first run takes a while, later runs do not).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np
import PIL
import pytest
from conftest import compose_config
from PIL import Image, ImageDraw, ImageFont, features

import patchify.datasets.mini_ilias as mini
from patchify.assets import AssetError
from patchify.datasets import photo_objects
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
    assert done["parameters"] == TINY.parameters() and done["seed"] == TINY.seed
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


# ----------------------------------------------------------------------------- the photo family

PHOTO_TINY = MiniIliasConfig(instances=3, queries_per_instance=1, positives_per_instance=3, distractors=3, seed=0,
                             objects="photo")
# sha256 over the images and box files of TINY (emoji) as generated before the photo family existed
# (numpy 2.4.6, Pillow 13.0.0, as constraints.txt pins them): the default family must not change by a byte.
TINY_EMOJI_IMAGES_SHA256 = "c937fb192fa17659f22c116c0b12e8625579eee888174f155241f9e3b276f01e"


def image_digest(sums: dict[str, str]) -> str:
    """One sha256 over the images and box files of a checksum list (GENERATED.json left out)."""
    lines = "".join(f"{k} {v}\n" for k, v in sorted(sums.items()) if k != "GENERATED.json")
    return hashlib.sha256(lines.encode()).hexdigest()


@pytest.fixture(scope="module")
def photo_tiny(tmp_path_factory):
    """A tiny photo-family set, drawn in this process while every object paste is watched.

    Returns the folder, generate()'s content (images in drawing order) and the canvas before and after
    each object paste, in drawing order.
    """
    out = tmp_path_factory.mktemp("photo") / "a"
    pastes = []
    real = mini._paste_object

    def watch(canvas, sprite, xy):
        before = np.asarray(canvas).copy()
        real(canvas, sprite, xy)
        pastes.append((before, np.asarray(canvas).copy()))

    mini._paste_object = watch
    try:
        content = generate(out, PHOTO_TINY, workers=1)
    finally:
        mini._paste_object = real
    return out, content, pastes


def test_photo_boxes_are_the_warped_corners_box(photo_tiny):
    out, content, pastes = photo_tiny
    objects = [(rel, obj) for rel, meta in content["images"].items() for obj in meta["objects"]]
    assert len(objects) == len(pastes) >= 6  # 3 queries + 9 positives (some maybe with two copies), decoys
    for (rel, obj), (before, after) in zip(objects, pastes):
        height, width = before.shape[:2]
        box = photo_objects.visible_box(np.array(obj["corners"]), width, height)
        if not rel.startswith("distractors/"):  # the box file holds exactly the corners' visible box
            assert tuple(box) in {tuple(b) for b in read_boxes(out / (rel[:-4] + "_bbox.txt"))}, rel
        x, y, w, h = box
        changed = np.abs(after.astype(int) - before.astype(int)).max(-1) > 0
        ys, xs = np.nonzero(changed)
        margin = 1 + math.ceil(3 * obj.get("blur", 0.0))  # a blurred picture spreads by up to 3 sigma
        assert xs.min() >= x - margin and ys.min() >= y - margin, rel
        assert xs.max() < x + w + margin and ys.max() < y + h + margin, rel
        assert xs.min() <= x + margin and ys.min() <= y + margin, rel  # the box is tight: the picture reaches it
        assert xs.max() >= x + w - 1 - margin and ys.max() >= y + h - 1 - margin, rel
        assert changed[y:y + h, x:x + w].mean() > 0.3, rel  # the pasted region differs from the background


def test_photo_layout_sources_and_distinct_regions(photo_tiny):
    out, content, _ = photo_tiny
    done = json.loads((out / "GENERATED.json").read_text())
    assert done["parameters"]["objects"] == "photo" and done["counts"]["photo_instances"] == 3
    assert done["counts"]["queries"] == 3 and done["counts"]["positives"] == 9 and done["counts"]["distractors"] == 3
    objects = photo_objects.object_photo_names()
    backgrounds = {Path(s["file"]).name for s in done["sources"] if s["role"] == "photos"}
    assert backgrounds and not backgrounds & (objects | photo_objects.SHOWS_AN_OBJECT)
    assert {s["package"] for s in done["sources"]} .isdisjoint({"fonts-noto-color-emoji"})
    for rel, meta in done["images"].items():
        assert meta.get("background", ":x").split(":", 1)[1] not in objects, rel
    regions = [(i["source"], i["region"]) for i in done["instances"]]
    for k, (source, (x, y, w, h)) in enumerate(regions):
        assert w >= photo_objects.MIN_REGION_PX and h >= photo_objects.MIN_REGION_PX
        for other_source, (x2, y2, w2, h2) in regions[k + 1:]:  # no two instances share a pixel
            assert source != other_source or x + w <= x2 or x2 + w2 <= x or y + h <= y2 or y2 + h2 <= y
    for image_path in sorted((out / "ilias_core").glob("*/*/*.jpg")):
        with Image.open(image_path) as im:
            width, height = im.size
        for x, y, w, h in read_boxes(image_path.with_name(image_path.stem + "_bbox.txt")):
            assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= width and y + h <= height


def test_photo_query_shows_the_picture_on_a_plain_background(photo_tiny):
    out, _, _ = photo_tiny
    for query in sorted((out / "ilias_core").glob("*/query/*.jpg")):
        (x, y, w, h), = read_boxes(query.with_name(query.stem + "_bbox.txt"))
        grey = np.asarray(Image.open(query).convert("L"), dtype=float)
        assert 0.25 <= w * h / grey.size <= 0.72
        detail = np.abs(np.diff(grey, axis=1))
        outside = np.ones_like(detail, dtype=bool)
        outside[max(0, y - 3):y + h + 3, max(0, x - 4):x + w + 3] = False
        assert detail[outside].mean() < 1.5 < detail[y:y + h, x:x + w - 1].mean(), query


def test_photo_family_is_deterministic(photo_tiny, tmp_path):
    out, _, _ = photo_tiny
    again = tmp_path / "b"
    generate(again, PHOTO_TINY, workers=2)
    assert checksums(again) == checksums(out)


def test_both_families_half_each(tmp_path):
    out = tmp_path / "both"
    done = generate(out, MiniIliasConfig(instances=4, queries_per_instance=1, positives_per_instance=1,
                                         distractors=4, seed=0, objects="both"))
    kinds = ["glyph_id" in i for i in done["instances"]]
    assert kinds == [True, True, False, False]  # emoji first, then photo
    distractors = [done["images"][f"distractors/D{i:06d}.jpg"] for i in range(4)]
    assert ["decoy_picture" in m for m in distractors] == [False, True, False, True]
    roles = {s["role"] for s in done["sources"]}
    assert roles == {"objects", "photos"} and any(s["package"] == "fonts-noto-color-emoji" for s in done["sources"])
    objects = photo_objects.object_photo_names()
    assert not {Path(s["file"]).name for s in done["sources"] if s["role"] == "photos"} & objects
    assert len(list((out / "ilias_core").iterdir())) == 4


def test_default_family_unchanged(tiny):
    done = json.loads((tiny / "GENERATED.json").read_text())
    assert "objects" not in done["parameters"] and "photo_objects" not in done["transforms"]
    assert "object_photos" not in done["counts"]
    if (np.__version__, PIL.__version__) != ("2.4.6", "13.0.0"):
        pytest.skip("the pinned digest was taken with numpy 2.4.6 and Pillow 13.0.0")
    assert image_digest(checksums(tiny)) == TINY_EMOJI_IMAGES_SHA256


def test_other_family_never_reuses_a_folder(tiny):
    with pytest.raises(MiniIliasError, match=r"other parameters: objects='emoji' \(asked 'photo'\)"):
        generate(tiny, MiniIliasConfig(**{**TINY.__dict__, "objects": "photo"}))


def test_pipeline_refuses_a_root_made_with_other_parameters(tiny):
    from patchify.data import load_dataset

    cfg = compose_config([f"dataset.root={tiny}", "dataset.generate.instances=7"]).dataset
    with pytest.raises(MiniIliasError, match="instances=6 \\(asked 7\\)"):
        load_dataset(cfg)


def test_each_family_has_its_own_folder_and_name():
    import patchify.settings  # noqa: F401 (registers the mini_ilias_name resolver)

    for objects, folder in (("emoji", "mini"), ("photo", "mini_photo"), ("both", "mini_both")):
        cfg = compose_config([f"dataset.generate.objects={objects}"])
        assert Path(cfg.dataset.root).name == folder and cfg.dataset.name == folder


def test_unknown_family_is_one_line():
    from patchify.settings import ConfigError, validate

    with pytest.raises(MiniIliasError, match=r"^objects='poster': unknown object family \(choose from emoji, "
                                             r"photo, both\)$"):
        MiniIliasConfig(objects="poster").validate()
    with pytest.raises(ConfigError, match=r"^dataset\.generate\.objects=poster: must be one of emoji, photo, both$"):
        validate(compose_config(["dataset.generate.objects=poster"]))
    assert tuple(photo_objects_choices()) == mini.OBJECT_FAMILIES


def photo_objects_choices():
    from dataclasses import fields

    from patchify.settings import GenerateSettings

    return next(f for f in fields(GenerateSettings) if f.name == "objects").metadata["rule"].choices


def test_too_many_photo_instances(tmp_path):
    with pytest.raises(MiniIliasError, match=r"^1000 photo instances asked but the object photos give only \d+ "
                                             r"distinct regions$"):
        generate(tmp_path / "big", MiniIliasConfig(instances=1000, objects="photo"))
    assert not (tmp_path / "big").exists()


def test_visible_box_clips_the_quadrilateral():
    diamond = np.array([[50.0, -20.0], [120.0, 50.0], [50.0, 120.0], [-20.0, 50.0]])
    # inside 100 x 100 the clipped diamond reaches x = 0..100 and y = 0..100
    assert photo_objects.visible_box(diamond, 100, 100) == (0, 0, 100, 100)
    # a square turned 45 degrees, centred left of the image: the box of its visible part (a triangle from
    # (0, 20) to (30, 50) to (0, 80)), not the clipped box of its corners (0, 10, 30, 80)
    tilted = np.array([[-10.0, 10.0], [30.0, 50.0], [-10.0, 90.0], [-50.0, 50.0]])
    assert photo_objects.visible_box(tilted, 100, 100) == (0, 20, 30, 60)
    assert photo_objects.visible_box(tilted - [200, 0], 100, 100) is None
    fronto = photo_objects.plane_view(40, 20, 0, 0, 0)
    assert np.allclose(fronto, [[-20, -10], [20, -10], [20, 10], [-20, 10]])
    turned = photo_objects.plane_view(40, 20, 40, 0, 0)  # turned about the vertical axis: one side nearer
    left, right = turned[3, 1] - turned[0, 1], turned[2, 1] - turned[1, 1]
    assert min(left, right) < 20 < max(left, right)  # the far side looks shorter, the near side longer
    assert turned[:, 0].max() - turned[:, 0].min() < 40  # and the width is foreshortened


def test_unreadable_font_is_one_line(tmp_path):
    bogus = tmp_path / "NotoColorEmoji.ttf"
    bogus.write_bytes(b"not a font at all")
    with pytest.raises(MiniIliasError, match=r"NotoColorEmoji\.ttf: not a readable font") as err:
        mini.EmojiFont(bogus)
    assert "\n" not in str(err.value)
