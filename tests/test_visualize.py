"""Tests for src/patchify/visualize.py on small synthetic images."""
from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from patchify.data import ImageRecord
from patchify.visualize import (
    GT_COLOUR,
    HIT_COLOUR,
    MISS_COLOUR,
    PRED_COLOUR,
    QUERY_COLOUR,
    UNKNOWN_COLOUR,
    _layout,
    draw_boxes,
    draw_outline,
    metric_rows,
    result_strip,
    safe_name,
    strip_size,
    write_html_report,
    write_query_pictures,
)

BLACK = (0, 0, 0)


def make_image(path: Path, size=(120, 80), colour=(90, 90, 200), **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, **save)
    return path


def record(tmp_path: Path, image_id: str, size=(120, 80), instance=None, boxes=(), colour=(90, 90, 200)) -> ImageRecord:
    path = make_image(tmp_path / "images" / image_id, size, colour)
    return ImageRecord(id=image_id, path=path, instance=instance, boxes=tuple(boxes), width=size[0], height=size[1])


@pytest.fixture
def items(tmp_path):
    """Two queries: a labelled one (hit, miss, unreadable hit) and an unlabelled user search."""
    q1 = record(tmp_path, "inst_a/query/Q0.jpg", instance="inst_a", boxes=[(10, 10, 50, 40)])
    pos = record(tmp_path, "inst_a/pos/P0.jpg", instance="inst_a", boxes=[(20, 10, 60, 50)], colour=(200, 200, 90))
    neg = record(tmp_path, "distractors/D0.jpg", colour=(60, 160, 160))
    broken_path = tmp_path / "images" / "inst_a" / "pos" / "P1.jpg"
    broken_path.write_bytes(b"not a jpeg at all")
    broken = ImageRecord(id="inst_a/pos/P1.jpg", path=broken_path, instance="inst_a", boxes=((0, 0, 5, 5),))
    r1 = [
        {"record": pos, "score": 0.91, "box": (22, 12, 55, 45), "relevant": True, "gt_boxes": pos.boxes_array},
        {"record": neg, "score": 0.52, "box": (0, 0, 30, 30), "relevant": False, "gt_boxes": None},
        {"record": broken, "score": 0.40, "box": (0, 0, 5, 5), "relevant": True, "gt_boxes": broken.boxes_array},
    ]
    q2 = record(tmp_path, "user/<script>alert(1)</script>.png", colour=(10, 120, 10))
    r2 = [{"record": neg, "score": 0.33, "box": (5, 5, 40, 20), "relevant": None, "gt_boxes": None}]
    return [(q1, r1), (q2, r2)]


# ----------------------------------------------------------------------------- boxes

def test_draw_boxes_pixels_on_edge_not_inside():
    image = Image.new("RGB", (100, 100), BLACK)
    out = draw_boxes(image, np.array([[20, 30, 40, 50]]), PRED_COLOUR, width=3)
    assert image.getpixel((20, 30)) == BLACK  # the input is untouched
    px = out.load()
    # left edge x = 20..22, right edge x = 57..59, top y = 30..32, bottom y = 77..79
    for x, y in [(20, 50), (22, 50), (59, 50), (57, 50), (40, 30), (40, 32), (40, 79), (40, 77), (20, 30), (59, 79)]:
        assert px[x, y] == PRED_COLOUR, (x, y)
    for x, y in [(23, 50), (56, 50), (40, 33), (40, 76), (40, 55), (19, 50), (60, 50), (40, 29), (40, 80)]:
        assert px[x, y] == BLACK, (x, y)


def test_draw_boxes_several_colours_clipping_and_bad_boxes():
    image = Image.new("RGB", (50, 40), BLACK)
    out = draw_boxes(image, [(-10, -10, 30, 30), (np.nan, 0, 5, 5), (5, 5, 0, 3)], GT_COLOUR, width=1)
    # a box leaving the image is clipped so its edges stay visible
    assert out.getpixel((0, 10)) == GT_COLOUR and out.getpixel((19, 10)) == GT_COLOUR
    assert out.getpixel((10, 0)) == GT_COLOUR and out.getpixel((10, 10)) == BLACK
    assert out.getpixel((5, 5)) in (GT_COLOUR, BLACK)  # zero-size / NaN boxes are skipped without error
    assert draw_boxes(image, np.zeros((0, 4)), GT_COLOUR).tobytes() == image.tobytes()


def test_draw_boxes_width_scales_with_image():
    small = draw_boxes(Image.new("RGB", (100, 100)), [(10, 10, 50, 50)], PRED_COLOUR)
    large = draw_boxes(Image.new("RGB", (1600, 1600)), [(100, 100, 800, 800)], PRED_COLOUR)
    small_w = sum(small.getpixel((x, 30)) == PRED_COLOUR for x in range(10, 30))
    large_w = sum(large.getpixel((x, 500)) == PRED_COLOUR for x in range(100, 200))
    assert small_w >= 2 and large_w >= 4 * small_w


# ----------------------------------------------------------------------------- strips

@pytest.mark.parametrize("k", [0, 1, 3])
def test_strip_size(items, k, tmp_path):
    query, results = items[0]
    results = (results * 2)[:k]
    strip = result_strip(query, results, thumb=64)
    assert strip.size == strip_size(k, 64)
    lay = _layout(64)
    assert strip.height >= 64 + 2 * lay["frame"]
    if k:
        assert strip_size(k, 64)[0] - strip_size(k - 1, 64)[0] >= lay["tile_w"]


def test_strip_frames_and_boxes(items):
    query, results = items[0]
    thumb = 96
    strip = result_strip(query, results[:2], thumb=thumb)
    lay = _layout(thumb)
    gap, tile = lay["gap"], lay["tile_w"]
    # frames: query blue, rank 1 hit, rank 2 miss (top-left corner of each tile)
    assert strip.getpixel((gap, gap)) == QUERY_COLOUR
    first = gap + tile + 3 * gap
    assert strip.getpixel((first, gap)) == HIT_COLOUR
    assert strip.getpixel((first + tile + gap, gap)) == MISS_COLOUR
    colours = {c for _, c in strip.getcolors(1 << 20)}
    assert PRED_COLOUR in colours or any(np.abs(np.subtract(c, PRED_COLOUR)).max() < 30 for c in colours)
    assert GT_COLOUR in colours or any(np.abs(np.subtract(c, GT_COLOUR)).max() < 30 for c in colours)


def test_strip_unknown_frame_for_unlabelled(items):
    query, results = items[1]
    strip = result_strip(query, results, thumb=64)
    lay = _layout(64)
    assert strip.getpixel((lay["gap"] + lay["tile_w"] + 3 * lay["gap"], lay["gap"])) == UNKNOWN_COLOUR


def test_unreadable_image_gives_placeholder(tmp_path):
    missing = ImageRecord(id="gone.jpg", path=tmp_path / "gone.jpg")
    empty_path = tmp_path / "empty.jpg"
    empty_path.write_bytes(b"")
    empty = ImageRecord(id="empty.jpg", path=empty_path)
    results = [{"record": empty, "score": 0.5, "box": (0, 0, 10, 10), "relevant": None, "gt_boxes": None}]
    strip = result_strip(missing, results, thumb=64)
    assert strip.size == strip_size(1, 64)
    lay = _layout(64)
    centre = (lay["gap"] + lay["tile_w"] // 2, lay["gap"] + lay["frame"] + 2)
    assert strip.getpixel(centre) == (128, 128, 128)  # grey placeholder where the query thumbnail goes


@pytest.mark.parametrize("stored", [(200, 100), (1600, 800)])  # the large one is decoded with JPEG draft
def test_exif_rotated_image_boxes_follow_orientation(tmp_path, stored):
    """A JPEG stored landscape with EXIF orientation 6 is shown portrait; boxes are in the shown frame."""
    path = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", stored, (0, 0, 0)).save(path, exif=exif, quality=95)
    shown_w, shown_h = stored[1], stored[0]
    s = shown_w / 50  # the portrait thumbnail is 50x100
    box = (10 * s, 25 * s, 30 * s, 50 * s)  # -> thumbnail box x 10..39, y 25..74
    rec = ImageRecord(id="rot.jpg", path=path, width=shown_w, height=shown_h, boxes=(box,))
    strip = result_strip(rec, [], thumb=100)
    lay = _layout(100)
    f, g = lay["frame"], lay["gap"]
    ox, oy = g + f + 25, g + f  # the 50x100 thumbnail is centred in the 100x100 cell

    def near(xy, colour):
        return np.abs(np.subtract(strip.getpixel(xy), colour)).max() < 40

    assert near((ox + 10, oy + 50), GT_COLOUR) and near((ox + 39, oy + 50), GT_COLOUR)
    assert near((ox + 20, oy + 25), GT_COLOUR) and near((ox + 20, oy + 74), GT_COLOUR)
    assert near((ox + 20, oy + 50), BLACK) and near((ox + 8, oy + 50), BLACK) and near((ox + 41, oy + 50), BLACK)
    assert strip.getpixel((g + f + 5, oy + 50)) == (232, 232, 232)  # letterbox, not image


# ----------------------------------------------------------------------------- query pictures

def test_safe_name():
    assert safe_name("bold_bimp_000/query/Q000_00.jpg") == "bold_bimp_000__query__Q000_00"
    assert "/" not in safe_name("../../etc/passwd") and not safe_name("../../etc/passwd").startswith(".")
    assert safe_name("") == "query"
    assert re.fullmatch(r"[A-Za-z0-9._-]+", safe_name('a b/<c>:"d|e?.png'))
    long = safe_name("x" * 400)
    assert len(long) <= 150 and long == safe_name("x" * 400)


def test_write_query_pictures(items, tmp_path):
    out = tmp_path / "pictures"
    paths = write_query_pictures(out, items + [items[0]], top=2)
    names = [p.name for p in paths]
    assert names[0] == "inst_a__query__Q0.jpg"
    assert names[2] == "inst_a__query__Q0-2.jpg"  # a repeated id does not overwrite
    assert all(p.parent == out and p.exists() for p in paths)
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+\.jpg", n) for n in names)
    with Image.open(paths[0]) as image:
        assert image.format == "JPEG" and image.size == strip_size(2, 224)
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # no temp files left


# ----------------------------------------------------------------------------- HTML report

class TagCollector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


METRICS = {
    "num_queries": 2, "k": 1000, "mAP": 53.2149, "LocScore@0.4": 41.0, "LocScore": 41.0,
    "R@1": 100.0, "R@5": 100.0, "R@10": 100.0, "P@10": 12.5, "iou_thresholds": [0.4],
    "mAP_scale": {"0.000-0.069": 12.345, "0.069-0.135": None, "0.135-0.273": 50.0, "0.273-inf": 77.777},
    "per_query": [{"query_id": "inst_a/query/Q0.jpg", "num_positives": 2, "AP": 53.2149}],
    "timings": {"search_s": 1.5},
}


def test_metric_rows_order_and_format():
    rows = dict(metric_rows(METRICS))
    labels = [label for label, _ in metric_rows(METRICS)]
    assert labels[:7] == ["mAP", "LocScore@0.4", "LocScore", "R@1", "R@5", "R@10", "P@10"]
    assert rows["mAP"] == "53.21" and rows["P@10"] == "12.50"
    assert rows["mAP scale [0.000, 0.069)"] == "12.35" and rows["mAP scale [0.069, 0.135)"] == "n/a"


def test_html_report(items, tmp_path):
    path = write_html_report(tmp_path / "run" / "report.html", "Run <b>1</b>", METRICS, items, top=10, thumb=64)
    text = path.read_text(encoding="utf-8")
    parser = TagCollector()
    parser.feed(text)
    parser.close()
    tags = parser.tags
    names = [t for t, _ in tags]
    assert names.count("html") == 1 and "table" in names and "style" in names
    assert "script" not in names and "link" not in names
    # self-contained: only data: URIs
    assert "http://" not in text and "https://" not in text and 'src="/' not in text
    srcs = [a["src"] for t, a in tags if t == "img" and a.get("class") != "chart"]
    assert len(srcs) == 2 + 3 + 1  # two query tiles + four result tiles
    assert all(s.startswith("data:image/jpeg;base64,") for s in srcs)
    assert not [a for t, a in tags for k, v in a.items() if k in ("href", "src") and not str(v).startswith("data:")]
    # every query id (escaped) and the metric values
    body = "".join(parser.text)
    assert "inst_a/query/Q0.jpg" in body and "user/<script>alert(1)</script>.png" in body
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "Run &lt;b&gt;1&lt;/b&gt;" in text
    for value in ("53.21", "41.00", "100.00", "12.50", "12.35", "77.78"):
        assert value in body, value
    # hits and misses marked with CSS classes
    classes = [set(a.get("class", "").split()) for t, a in tags if t == "figure"]
    assert sum("hit" in c for c in classes) == 2
    assert sum("miss" in c for c in classes) == 1
    assert sum("unknown" in c for c in classes) == 1
    assert sum("query" in c for c in classes) == 2
    # captions: rank, score, IoU when gt known
    assert "#1  0.910  IoU" in body and "#2  0.520" in body and "(unreadable)" in body
    # legend names all colours
    legend = [a for t, a in tags if t == "div" and "legend" in a.get("class", "")]
    assert legend
    for word in ("predicted box", "ground-truth box", "hit", "miss", "unlabelled"):
        assert word in body
    assert list(path.parent.iterdir()) == [path]  # atomic write leaves no temp file


def test_html_report_top_and_size(items, tmp_path):
    path = write_html_report(tmp_path / "r.html", "t", {}, items, top=1, thumb=64)
    text = path.read_text()
    assert text.count("<img ") == 2 + 1 + 1
    assert len(text) < 60_000


def test_html_report_scale_chart_shows_the_runs_numbers(items, tmp_path):
    """The AP per object scale is an inline SVG chart drawn from the run's own mAP_scale."""
    import base64

    from patchify.figures import scale_ap_figure, svg_bytes

    text = write_html_report(tmp_path / "r.html", "t", METRICS, items, thumb=64).read_text()
    parser = TagCollector()
    parser.feed(text)
    charts = [a for t, a in parser.tags if t == "img" and a.get("class") == "chart"]
    assert len(charts) == 1 and charts[0]["src"].startswith("data:image/svg+xml;base64,")
    svg = base64.b64decode(charts[0]["src"].split(",", 1)[1])
    expected = svg_bytes(scale_ap_figure([{"label": "this run", "mAP": METRICS["mAP"], "mAP_scale": METRICS["mAP_scale"]}]))
    assert svg == expected  # the same drawing as from these numbers (deterministic)
    for label in (">12.3<", ">n/a<", ">50.0<", ">77.8<", "mAP 53.21"):  # bar labels are SVG text
        assert label.encode() in svg, label
    assert "< 6.9 % 12.35" in charts[0]["alt"]  # the values also as text, for readers without images
    other = dict(METRICS, mAP_scale={k: 1.0 for k in METRICS["mAP_scale"]})
    assert write_html_report(tmp_path / "o.html", "t", other, items, thumb=64).read_text() != text
    no_scales = write_html_report(tmp_path / "n.html", "t", dict(METRICS, mAP_scale={"0.000-0.069": None}), items)
    assert 'class="chart"' not in no_scales.read_text()


def test_draw_outline_draws_a_tilted_quadrilateral_and_skips_bad_corners():
    image = Image.new("RGB", (100, 100), (0, 0, 0))
    corners = [(20, 10), (80, 20), (70, 90), (10, 80)]
    out = np.asarray(draw_outline(image, corners, (255, 0, 255), width=1))
    assert tuple(out[10, 20]) == (255, 0, 255) and tuple(out[90, 70]) == (255, 0, 255)  # corners
    assert tuple(out[15, 50]) == (255, 0, 255)  # on the top edge (20,10)-(80,20)
    assert tuple(out[50, 50]) == (0, 0, 0)  # inside: not filled
    assert tuple(out[5, 20]) == (0, 0, 0)  # outside
    nan = np.asarray(draw_outline(image, [(0, 0), (np.nan, 5), (5, 5), (0, 5)], (255, 0, 255)))
    assert not nan.any()
