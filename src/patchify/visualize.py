"""Pictures of retrieval results: top-k strips with boxes, and a one-file HTML report.

Pillow + stdlib (the report's AP-per-scale chart: matplotlib, through ``patchify.figures``).
Boxes are ``(x, y, w, h)`` in original pixels (after
EXIF orientation), as everywhere in the project. Colours:

- predicted box: orange (``PRED_COLOUR``); ground-truth box: green (``GT_COLOUR``);
- frame around a result: ``HIT_COLOUR`` (positive of the query's instance),
  ``MISS_COLOUR`` (not a positive) or ``UNKNOWN_COLOUR`` (unlabelled, e.g. a
  user search); the query itself gets ``QUERY_COLOUR``.

A result entry is a dict ``{"record": ImageRecord, "score": float,
"box": (x, y, w, h), "relevant": bool | None, "gt_boxes": ndarray | None,
"verified": bool, "inliers": int}``; every key but ``record`` may be missing
(a verified result's caption shows its inlier count). An unreadable image becomes a grey
placeholder that says so; drawing never raises because of image data.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import math
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from .cache import atomic_write_bytes
from .data import IMAGE_EXTENSIONS, ImageRecord, to_rgb
from .metrics import box_iou
from .tar_images import image_source

Colour = tuple[int, int, int]

PRED_COLOUR: Colour = (255, 140, 0)     # predicted box (orange)
GT_COLOUR: Colour = (0, 200, 80)        # ground-truth box (green)
OUTLINE_COLOUR: Colour = (220, 0, 200)  # verified object outline: the query box through the homography (magenta)
HIT_COLOUR: Colour = (30, 170, 60)      # frame: a positive of the query's instance
MISS_COLOUR: Colour = (215, 40, 40)     # frame: not a positive
UNKNOWN_COLOUR: Colour = (150, 150, 150)  # frame: unlabelled (user search)
QUERY_COLOUR: Colour = (40, 110, 220)   # frame: the query
PLACEHOLDER_COLOUR: Colour = (128, 128, 128)
CELL_COLOUR: Colour = (232, 232, 232)   # letterbox behind a thumbnail
BACKGROUND: Colour = (255, 255, 255)
TEXT_COLOUR: Colour = (20, 20, 20)

JPEG_QUALITY_PICTURE = 90
JPEG_QUALITY_REPORT = 80
_CACHE_SIZE = 256

# ----------------------------------------------------------------------------- drawing


def line_width(size: tuple[int, int]) -> int:
    """Box line width for an image of ``size``: 2 px for thumbnails, ~1/160 of the long side."""
    return max(2, round(max(size) / 160))


def draw_boxes(
    image: Image.Image, boxes: np.ndarray | Sequence, colour: Colour, width: int | None = None
) -> Image.Image:
    """Copy of ``image`` with xywh ``boxes`` outlined in ``colour``.

    The outline lies inside each box (pixels ``x .. x+w-1``), clipped to the
    image; boxes with NaN or non-positive size are skipped. ``width`` defaults
    to ``line_width(image.size)``.
    """
    out = image.copy()
    if boxes is None:
        return out
    array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    width = line_width(out.size) if width is None else max(1, int(width))
    draw = ImageDraw.Draw(out)
    img_w, img_h = out.size
    for x, y, w, h in array:
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            continue
        x0 = min(max(round(x), 0), img_w - 1)
        y0 = min(max(round(y), 0), img_h - 1)
        x1 = min(max(round(x + w) - 1, x0), img_w - 1)
        y1 = min(max(round(y + h) - 1, y0), img_h - 1)
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
    return out


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at ``size`` px (the fixed bitmap font without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # old Pillow or no FreeType
        return ImageFont.load_default()


def _fit(text: str, font, max_width: float) -> str:
    """``text`` shortened from the left with '...' until it fits ``max_width`` pixels."""
    if font.getlength(text) <= max_width:
        return text
    for start in range(1, len(text)):
        candidate = "..." + text[start:]
        if font.getlength(candidate) <= max_width:
            return candidate
    return "..."


# ----------------------------------------------------------------------------- thumbnails


class _ThumbCache:
    """Small LRU of loaded thumbnails (a gallery image recurs across queries)."""

    def __init__(self, size: int = _CACHE_SIZE):
        self.size = size
        self.items: OrderedDict[tuple[str, int], tuple[Image.Image, float, float] | None] = OrderedDict()

    def get(self, path: Path, side: int) -> tuple[Image.Image, float, float] | None:
        key = (str(path), side)
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = _load_thumbnail(path, side)
        self.items[key] = value
        if len(self.items) > self.size:
            self.items.popitem(last=False)
        return value


def _load_thumbnail(path: Path, side: int) -> tuple[Image.Image, float, float] | None:
    """(thumbnail fitting ``side`` x ``side``, x scale, y scale) from original pixels; None if unreadable.

    JPEGs are decoded at reduced size (``draft``); EXIF orientation is applied
    as in ``data.load_image``, and the scales map original (oriented) pixels to
    thumbnail pixels.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with image_source(path) as source, Image.open(source) as opened:  # a file or a tar member
                orig_w, orig_h = opened.size
                if opened.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                    orig_w, orig_h = orig_h, orig_w
                if opened.format == "JPEG":
                    opened.draft("RGB", (side, side))
                image = ImageOps.exif_transpose(opened)
                image.load()
        image = to_rgb(image)
        image.thumbnail((side, side), Image.Resampling.LANCZOS)
    except Exception:  # any unreadable, truncated or oversized file: a placeholder instead
        return None
    if orig_w <= 0 or orig_h <= 0:
        return None
    return image, image.width / orig_w, image.height / orig_h


def _scale_boxes(boxes, sx: float, sy: float) -> np.ndarray:
    array = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return array * np.array([sx, sy, sx, sy])


def _placeholder(side: int, text: str = "unreadable") -> Image.Image:
    image = Image.new("RGB", (side, side), PLACEHOLDER_COLOUR)
    draw = ImageDraw.Draw(image)
    font = _font(max(10, side // 10))
    text = _fit(text, font, side - 8)
    draw.text((side / 2, side / 2), text, fill=(255, 255, 255), font=font, anchor="mm")
    return image


def _has_boxes(boxes) -> bool:
    return boxes is not None and np.size(boxes) > 0


def draw_outline(image: Image.Image, corners: np.ndarray | Sequence, colour: Colour,
                 width: int | None = None) -> Image.Image:
    """Copy of ``image`` with the closed polygon ``corners`` ((n, 2) pixels) drawn in ``colour``; PIL clips what
    lies outside. Non-finite corners draw nothing."""
    out = image.copy()
    points = np.asarray(corners, dtype=np.float64).reshape(-1, 2)
    if len(points) < 3 or not np.isfinite(points).all():
        return out
    width = line_width(out.size) if width is None else max(1, int(width))
    ImageDraw.Draw(out).line([tuple(p) for p in points] + [tuple(points[0])], fill=colour, width=width, joint="curve")
    return out


def _thumbnail(
    record: ImageRecord, side: int, pred=None, gt=None, cache: _ThumbCache | None = None, outline=None
) -> tuple[Image.Image, bool]:
    """(thumbnail with gt (green) then predicted (orange) boxes, readable?). ``outline``: a verified object's
    projected corners, drawn over its box (thin orange box, thick outline)."""
    loaded = (cache or _ThumbCache(1)).get(record.path, side)
    if loaded is None:
        return _placeholder(side), False
    image, sx, sy = loaded
    if _has_boxes(gt):
        image = draw_boxes(image, _scale_boxes(gt, sx, sy), GT_COLOUR)
    if _has_boxes(pred):
        image = draw_boxes(image, _scale_boxes(pred, sx, sy), PRED_COLOUR, width=1 if outline is not None else None)
    if outline is not None:
        image = draw_outline(image, np.asarray(outline, np.float64).reshape(-1, 2) * np.array([sx, sy]), OUTLINE_COLOUR)
    return image, True


def result_iou(result: dict) -> float | None:
    """Best IoU of the predicted box with the result's gt boxes; None when either is missing."""
    box, gt = result.get("box"), result.get("gt_boxes")
    if not _has_boxes(box) or not _has_boxes(gt):
        return None
    box = np.asarray(box, dtype=np.float64).reshape(-1, 4)
    if not np.isfinite(box).all():
        return 0.0
    return float(box_iou(box[:1], gt).max())


def _frame_colour(relevant: bool | None) -> Colour:
    if relevant is None:
        return UNKNOWN_COLOUR
    return HIT_COLOUR if relevant else MISS_COLOUR


def _status(relevant: bool | None) -> str:
    return "unknown" if relevant is None else ("hit" if relevant else "miss")


def _caption(rank: int, result: dict) -> str:
    """'#rank score' plus 'IoU x.xx' when the ground truth is known."""
    parts = [f"#{rank}"]
    score = result.get("score")
    if score is not None:
        try:
            parts.append(f"{float(score):.3f}")
        except (TypeError, ValueError):
            pass
    iou = result_iou(result)
    if iou is not None:
        parts.append(f"IoU {iou:.2f}")
    if result.get("verified"):  # geometric verification (src/patchify/rerank.py): its box is the projected query
        parts.append(f"{int(result.get('inliers', 0))} inl")
    return "  ".join(parts)


# ----------------------------------------------------------------------------- strips


def _layout(thumb: int) -> dict[str, int]:
    """Pixel sizes of a strip built from ``thumb``-sized thumbnails."""
    font_size = max(11, thumb // 14)
    line = font_size + 4
    frame = max(3, thumb // 40)
    gap = max(4, thumb // 28)
    return {"font": font_size, "line": line, "frame": frame, "gap": gap,
            "tile_w": thumb + 2 * frame, "tile_h": thumb + 2 * frame + 2 * line + 4}


def strip_size(k: int, thumb: int = 224) -> tuple[int, int]:
    """(width, height) of ``result_strip`` with ``k`` results: query, a wider gap, then k tiles."""
    lay = _layout(thumb)
    width = 2 * lay["gap"] + (k + 1) * lay["tile_w"] + k * lay["gap"] + (2 * lay["gap"] if k else 0)
    return width, lay["tile_h"] + 2 * lay["gap"]


def _tile(
    canvas: Image.Image, left: int, top: int, image: Image.Image, frame: Colour, lines: list[str], lay: dict, font
) -> None:
    """Paste one framed, letterboxed thumbnail with its caption lines at (left, top)."""
    draw = ImageDraw.Draw(canvas)
    f, side = lay["frame"], lay["tile_w"] - 2 * lay["frame"]
    draw.rectangle((left, top, left + lay["tile_w"] - 1, top + lay["tile_w"] - 1), fill=frame)
    draw.rectangle((left + f, top + f, left + f + side - 1, top + f + side - 1), fill=CELL_COLOUR)
    canvas.paste(image, (left + f + (side - image.width) // 2, top + f + (side - image.height) // 2))
    y = top + lay["tile_w"] + 2
    for text in lines:
        draw.text((left + 2, y), _fit(text, font, lay["tile_w"] - 4), fill=TEXT_COLOUR, font=font)
        y += lay["line"]


def result_strip(
    query: ImageRecord, results: list[dict], thumb: int = 224, cache: _ThumbCache | None = None
) -> Image.Image:
    """The query (with its gt boxes) beside its results, each framed hit/miss/unknown and captioned.

    Every result thumbnail shows its predicted box (orange) and, when given,
    its gt boxes (green); the caption is '#rank score [IoU x.xx]' over the id.
    The size is ``strip_size(len(results), thumb)``.
    """
    cache = cache or _ThumbCache()
    lay = _layout(thumb)
    font = _font(lay["font"])
    canvas = Image.new("RGB", strip_size(len(results), thumb), BACKGROUND)
    gap = lay["gap"]
    image, readable = _thumbnail(query, thumb, gt=query.boxes_array, cache=cache)
    label = f"query {query.instance}" if query.instance else "query"
    _tile(canvas, gap, gap, image, QUERY_COLOUR, [label, query.id], lay, font)
    left = gap + lay["tile_w"] + 3 * gap
    for rank, result in enumerate(results, start=1):
        record: ImageRecord = result["record"]
        image, _ = _thumbnail(record, thumb, pred=result.get("box"), gt=result.get("gt_boxes"), cache=cache,
                              outline=result.get("outline"))
        _tile(canvas, left, gap, image, _frame_colour(result.get("relevant")),
              [_caption(rank, result), record.id], lay, font)
        left += lay["tile_w"] + gap
    return canvas


# ----------------------------------------------------------------------------- files

def _written(path: Path, data: bytes) -> Path:
    """``data`` written to ``path`` atomically (``cache.atomic_write_bytes``); returns ``path``."""
    atomic_write_bytes(path, data, what="picture or report")
    return path



def _jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def safe_name(image_id: str, max_len: int = 150) -> str:
    """File-name stem from an image id: extension dropped, '/' -> '__', other odd characters -> '_'."""
    stem = image_id
    for ext in IMAGE_EXTENSIONS:
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    stem = stem.replace("\\", "/").strip("/").replace("/", "__")
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip(".")
    if len(stem) > max_len:
        stem = stem[: max_len - 9] + "-" + hashlib.sha1(image_id.encode()).hexdigest()[:8]
    return stem or "query"


def write_query_pictures(
    out_dir: Path, items: Iterable[tuple[ImageRecord, list[dict]]], top: int = 10, thumb: int = 224
) -> list[Path]:
    """One JPEG strip per query (``result_strip`` of its first ``top`` results) in ``out_dir``.

    Names come from ``safe_name(query.id)``; a clash gets '-2', '-3', ...
    Returns the written paths in order.
    """
    out_dir = Path(out_dir)
    cache = _ThumbCache()
    written: list[Path] = []
    used: set[str] = set()
    for query, results in items:
        stem = base = safe_name(query.id)
        n = 1
        while stem.lower() in used:
            n += 1
            stem = f"{base}-{n}"
        used.add(stem.lower())
        strip = result_strip(query, list(results)[:top], thumb=thumb, cache=cache)
        written.append(_written(out_dir / f"{stem}.jpg", _jpeg_bytes(strip, JPEG_QUALITY_PICTURE)))
    return written


# ----------------------------------------------------------------------------- HTML report

_MAIN_KEYS = ("mAP", "LocScore", "R@1", "R@5", "R@10", "P@10")
_PER_QUERY_KEYS = ("AP", "LocScore", "R@1", "P@10")
_SKIP_KEYS = {"per_query", "mAP_scale", "num_queries", "k", "iou_thresholds"}


def _fmt(value) -> str:
    """Numbers with 2 decimals (ints as ints), None as 'n/a', anything else as text."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "n/a" if math.isnan(value) else f"{float(value):.2f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def metric_rows(metrics: dict) -> list[tuple[str, str]]:
    """(label, formatted value) pairs for the report's metrics table, in reading order."""
    rows: list[tuple[str, str]] = []
    loc_keys = sorted(k for k in metrics if k.startswith("LocScore@"))
    for key in ("mAP", *loc_keys, *_MAIN_KEYS[1:]):
        if key in metrics:
            rows.append((key, _fmt(metrics[key])))
    for group, value in (metrics.get("mAP_scale") or {}).items():
        lo, _, hi = str(group).partition("-")
        rows.append((f"mAP scale [{lo}, {hi})", _fmt(value)))
    return rows


def _detail_rows(metrics: dict) -> list[tuple[str, str]]:
    """Counts, thresholds and any other scalar (one level of nesting flattened)."""
    rows = [(k, _fmt(metrics[k])) for k in ("num_queries", "k", "iou_thresholds") if k in metrics]
    shown = {label for label, _ in metric_rows(metrics)} | set(_MAIN_KEYS) | _SKIP_KEYS
    for key, value in metrics.items():
        if key in shown or key.startswith("LocScore@"):
            continue
        if isinstance(value, dict):
            rows += [(f"{key}.{k}", _fmt(v)) for k, v in value.items() if not isinstance(v, (dict, list))]
        elif not isinstance(value, list) or len(value) <= 8:
            rows.append((key, _fmt(value)))
    return rows


def _css_rgb(colour: Colour) -> str:
    return "rgb({}, {}, {})".format(*colour)


def _style(thumb: int) -> str:
    return f"""
body {{ font-family: sans-serif; margin: 1.5em; color: #222; background: #fafafa; }}
h1 {{ font-size: 1.4em; }}
h2 {{ font-size: 1em; margin: 0.2em 0; font-family: monospace; word-break: break-all; }}
table.metrics {{ border-collapse: collapse; margin: 0.5em 0 1em 0; }}
table.metrics th, table.metrics td {{ border: 1px solid #ccc; padding: 0.25em 0.7em; text-align: right; }}
table.metrics th {{ background: #eee; text-align: left; font-weight: normal; }}
.legend {{ margin: 0.5em 0 1.5em 0; }}
.legend span.item {{ margin-right: 1.5em; white-space: nowrap; }}
.swatch {{ display: inline-block; width: 1.6em; height: 0.9em; vertical-align: middle; margin-right: 0.3em; }}
.swatch-line {{ height: 0; border-top: 3px solid; }}
.swatch-frame {{ border: 3px solid; background: #eee; }}
section.row {{ border-top: 1px solid #ddd; padding: 0.6em 0; }}
.row-metrics {{ font-size: 0.85em; color: #555; }}
.tiles {{ display: flex; flex-wrap: nowrap; overflow-x: auto; gap: 6px; align-items: flex-start; }}
figure.tile {{ margin: 0; width: {thumb + 8}px; flex: none; }}
figure.tile .cell {{ width: {thumb}px; height: {thumb}px; border: 4px solid; background: #e8e8e8;
  display: flex; align-items: center; justify-content: center; }}
figure.tile img {{ display: block; max-width: {thumb}px; max-height: {thumb}px; }}
figure.tile figcaption {{ font-size: 0.78em; line-height: 1.25em; overflow-wrap: anywhere; }}
figure.tile figcaption .id {{ color: #666; font-family: monospace; font-size: 0.9em; }}
figure.query {{ margin-right: 14px; }}
figure.query .cell {{ border-color: {_css_rgb(QUERY_COLOUR)}; }}
figure.hit .cell {{ border-color: {_css_rgb(HIT_COLOUR)}; }}
figure.miss .cell {{ border-color: {_css_rgb(MISS_COLOUR)}; }}
figure.unknown .cell {{ border-color: {_css_rgb(UNKNOWN_COLOUR)}; }}
.unreadable {{ color: {_css_rgb(MISS_COLOUR)}; }}
figure.chart {{ margin: 0 0 1em 0; }}
figure.chart img {{ max-width: 100%; height: auto; }}
"""


def _legend() -> str:
    def line(colour: Colour, text: str) -> str:
        return (f'<span class="item"><span class="swatch swatch-line" style="border-color: {_css_rgb(colour)}">'
                f"</span>{text}</span>")

    def frame(colour: Colour, text: str) -> str:
        return (f'<span class="item"><span class="swatch swatch-frame" style="border-color: {_css_rgb(colour)}">'
                f"</span>{text}</span>")

    return ('<div class="legend"><strong>Legend:</strong> '
            + line(PRED_COLOUR, "predicted box")
            + line(GT_COLOUR, "ground-truth box")
            + line(OUTLINE_COLOUR, "verified outline")
            + frame(QUERY_COLOUR, "query")
            + frame(HIT_COLOUR, "hit (positive)")
            + frame(MISS_COLOUR, "miss (not a positive)")
            + frame(UNKNOWN_COLOUR, "unlabelled")
            + "</div>")


def _scale_chart(metrics: dict) -> str:
    """The run's AP per object-scale group (``metrics["mAP_scale"]``) as a bar chart, an inline SVG
    drawn by ``patchify.figures`` (as the docs' scale figure); '' when no group has a value."""
    scales = metrics.get("mAP_scale") or {}
    if all(value is None for value in scales.values()):
        return ""
    from .figures import scale_ap_figure, scale_group_label, svg_bytes

    svg = svg_bytes(scale_ap_figure([{"label": "this run", "mAP": metrics.get("mAP"), "mAP_scale": scales}]))
    alt = "AP per object scale (object area / image area): " + ", ".join(
        f"{scale_group_label(group)} {_fmt(value)}" for group, value in scales.items())
    return (f'<figure class="chart"><img class="chart" src="data:image/svg+xml;base64,'
            f'{base64.b64encode(svg).decode("ascii")}" alt="{html.escape(alt)}"></figure>')


def _figure(kind: str, image: Image.Image, readable: bool, caption: str, image_id: str) -> str:
    """One ``<figure class="tile KIND">`` with an embedded JPEG and an escaped caption."""
    data = base64.b64encode(_jpeg_bytes(image, JPEG_QUALITY_REPORT)).decode("ascii")
    esc_id = html.escape(image_id)
    note = "" if readable else ' <span class="unreadable">(unreadable)</span>'
    return (f'<figure class="tile {kind}"><div class="cell"><img src="data:image/jpeg;base64,{data}" '
            f'alt="{esc_id}" title="{esc_id}"></div>'
            f'<figcaption>{html.escape(caption)}{note}<br><span class="id">{esc_id}</span></figcaption></figure>')


def _query_section(
    query: ImageRecord, results: list[dict], thumb: int, cache: _ThumbCache, per_query: dict | None
) -> str:
    parts = [f'<section class="row"><h2>{html.escape(query.id)}</h2>']
    info = []
    if query.instance:
        info.append(f"instance {html.escape(query.instance)}")
    if per_query:
        info += [f"{html.escape(k)} {_fmt(per_query[k])}" for k in _PER_QUERY_KEYS if k in per_query]
        if "num_positives" in per_query:
            info.append(f"positives {_fmt(per_query['num_positives'])}")
    if info:
        parts.append(f'<div class="row-metrics">{" &middot; ".join(info)}</div>')
    parts.append('<div class="tiles">')
    image, readable = _thumbnail(query, thumb, gt=query.boxes_array, cache=cache)
    parts.append(_figure("query", image, readable, "query", query.id))
    for rank, result in enumerate(results, start=1):
        record: ImageRecord = result["record"]
        image, readable = _thumbnail(record, thumb, pred=result.get("box"), gt=result.get("gt_boxes"), cache=cache)
        parts.append(_figure(_status(result.get("relevant")), image, readable, _caption(rank, result), record.id))
    parts.append("</div></section>")
    return "\n".join(parts)


def write_html_report(
    path: Path,
    title: str,
    metrics: dict,
    items: list[tuple[ImageRecord, list[dict]]],
    top: int = 10,
    thumb: int = 160,
) -> Path:
    """Write ONE self-contained HTML file: metrics table, legend, one row of tiles per query.

    Images are embedded as base64 JPEG data URIs (``thumb`` px, quality 80), and the AP per
    object scale, when the metrics have it, as a base64 SVG chart (``_scale_chart``);
    CSS is inline; no script and no external reference. All text is escaped.
    Per-query values are shown when ``metrics["per_query"]`` is present.
    The file is written atomically. Returns ``path``.
    """
    cache = _ThumbCache()
    per_query = {q.get("query_id"): q for q in (metrics.get("per_query") or []) if isinstance(q, dict)}
    esc_title = html.escape(title)
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in metric_rows(metrics))
    details = _detail_rows(metrics)
    detail_html = ", ".join(f"{html.escape(k)} {html.escape(v)}" for k, v in details)
    body = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc_title}</title><style>{_style(thumb)}</style></head><body>",
        f"<h1>{esc_title}</h1>",
        f'<table class="metrics">{rows}</table>' if rows else "<p>No metrics (unlabelled search).</p>",
        f'<p class="row-metrics">{detail_html}</p>' if detail_html else "",
        _scale_chart(metrics),
        _legend(),
    ]
    for query, results in items:
        body.append(_query_section(query, list(results)[:top], thumb, cache, per_query.get(query.id)))
    body.append("</body></html>\n")
    return _written(Path(path), "\n".join(body).encode("utf-8"))
