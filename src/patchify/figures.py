"""Figures for the docs and the run report (matplotlib, drawn off-screen with Agg; pyplot is never used).

A docs figure is drawn from a JSON file of rows in ``docs/figures/``::

    {"figure": KIND, "title": ..., "commands": [...], "note": ..., "rows": [{...}, ...]}

written by the script that measured the rows (``write_figure_data``) and redrawn from it by
``scripts/figures.py``; the SVG beside it is never edited by hand. KIND is one of ``KINDS``:

- ``scale_ap``: AP per ILIAS object-scale group (rows: ``label``, ``mAP``, ``mAP_scale`` as in
  a run's metrics.json), grouped bars; the run report draws the same chart for one run;
- ``pool_frontier``: images/s against mAP@1k, one labelled point per gallery setting (rows:
  ``label``, ``family``, ``images_per_s``, ``mAP``), with the settings no other beats in both;
- ``index_bytes``: mAP@1k against bytes per image, one labelled point per index setting
  (rows: ``label``, ``family``, ``bytes_per_image``, ``mAP``).

A row may carry ``label_offset`` ([dx, dy] in points) to move its label off a neighbour's.
Output is deterministic: fixed figure sizes, a fixed hash salt for the SVG's ids, no date in its
metadata, text kept as text (``svg.fonttype=none``), so the same rows give the same bytes.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Callable, Sequence

from matplotlib import rc_context
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from .metrics import SCALE_GROUPS

STYLE = {
    "svg.hashsalt": "patchify",   # ids of clip paths etc. from a fixed salt, not a random one
    "svg.fonttype": "none",       # text as <text>: small files, numbers readable in the SVG
    "font.family": "sans-serif",  # laid out with matplotlib's own DejaVu Sans (the same on every machine);
    "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica"],  # the SVG names the rest as fallbacks
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
}
METADATA = {"Date": None}  # no timestamp: redrawing gives the same file
COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")
MARKERS = ("o", "s", "^", "D", "v", "P")
SCALE_KEYS = [f"{lo:.3f}-{hi:.3f}" for lo, hi in SCALE_GROUPS]  # the keys of metrics.json's mAP_scale


def _figure(size: tuple[float, float]) -> tuple[Figure, Axes]:
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def scale_group_label(key: str) -> str:
    """'0.069-0.135' (object area / image area, as in metrics.json) -> '6.9-13.5 %'."""
    lo, _, hi = key.partition("-")
    lo, hi = float(lo), float(hi)
    if lo == 0:
        return f"< {100 * hi:.1f} %"
    if math.isinf(hi):
        return f"\u2265 {100 * lo:.1f} %"
    return f"{100 * lo:.1f}-{100 * hi:.1f} %"


@rc_context(STYLE)
def scale_ap_figure(rows: Sequence[dict], title: str = "AP per object scale") -> Figure:
    """Grouped bars: for each ILIAS scale group, one bar per row (its ``mAP_scale`` value,
    labelled; a group without positives gets a zero bar labelled 'n/a')."""
    keys = SCALE_KEYS
    fig, ax = _figure((6.4, 3.2))
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        values = [(row.get("mAP_scale") or {}).get(key) for key in keys]
        label = row["label"] + (f" (mAP {row['mAP']:.2f})" if row.get("mAP") is not None else "")
        bars = ax.bar([g + (i - (len(rows) - 1) / 2) * width for g in range(len(keys))],
                      [0.0 if v is None else v for v in values], width, label=label, color=COLOURS[i % len(COLOURS)])
        ax.bar_label(bars, ["n/a" if v is None else f"{v:.1f}" for v in values], padding=2, fontsize=8)
    ax.set_xticks(range(len(keys)), [scale_group_label(key) for key in keys])
    ax.set_xlabel("object area / image area (ILIAS scale groups)")
    ax.set_ylabel("AP (%)")
    ax.set_ylim(0, 105)
    ax.grid(axis="x", visible=False)
    ax.set_title(title)
    ax.legend(loc="upper left", frameon=False)
    return fig


def _labelled_points(ax, rows: Sequence[dict], x: str, y: str) -> None:
    """One marker per row (colour and shape by ``family``, in order of first appearance), each labelled."""
    families = list(dict.fromkeys(row["family"] for row in rows))
    for i, family in enumerate(families):
        members = [row for row in rows if row["family"] == family]
        ax.scatter([row[x] for row in members], [row[y] for row in members], s=36, zorder=3, label=family,
                   color=COLOURS[i % len(COLOURS)], marker=MARKERS[i % len(MARKERS)])
    for row in rows:
        dx, dy = row.get("label_offset", (6, 0))
        leader = {"arrowstyle": "-", "color": "0.55", "lw": 0.6} if abs(dy) > 10 else None
        ax.annotate(row["label"], (row[x], row[y]), xytext=(dx, dy), textcoords="offset points", fontsize=7,
                    ha="left" if dx > 0 else "right" if dx < 0 else "center", va="center", arrowprops=leader)


def _log_x(ax, label: str, fmt: str) -> None:
    """Log-scaled x axis with plain-number ticks at 1, 2 and 5 times powers of ten."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: format(value, fmt)))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(label)


def pareto(rows: Sequence[dict], x: str, y: str) -> list[dict]:
    """The rows no other row beats in both ``x`` and ``y`` (higher is better for both), by ``x``."""
    best = -math.inf
    kept = []
    for row in sorted(rows, key=lambda r: (-r[x], -r[y])):
        if row[y] > best:
            kept.append(row)
            best = row[y]
    return kept[::-1]


@rc_context(STYLE)
def frontier_figure(rows: Sequence[dict], title: str = "Speed against accuracy") -> Figure:
    """images/s (log scale) against mAP@1k, one labelled point per setting, the frontier dashed."""
    fig, ax = _figure((7.2, 4.6))
    front = pareto(rows, "images_per_s", "mAP")
    ax.plot([r["images_per_s"] for r in front], [r["mAP"] for r in front], "--", color="0.6", lw=1,
            zorder=2, label="frontier (no setting both faster and better)")
    _labelled_points(ax, rows, "images_per_s", "mAP")
    _log_x(ax, "gallery images / s (log scale)", "g")
    ax.set_ylabel("mAP@1k (%)")
    ax.set_title(title)
    ax.legend(loc="lower left", frameon=False, fontsize=8)
    ax.margins(x=0.25, y=0.08)
    return fig


@rc_context(STYLE)
def index_bytes_figure(rows: Sequence[dict], title: str = "Accuracy against index size") -> Figure:
    """Bytes per image (log scale) against mAP@1k, one labelled point per index setting."""
    fig, ax = _figure((7.2, 5.0))
    _labelled_points(ax, rows, "bytes_per_image", "mAP")
    _log_x(ax, "bytes per image (log scale)", ",.0f")
    ax.set_ylabel("mAP@1k (%)")
    ax.set_title(title)
    ax.legend(loc="lower right", frameon=False, fontsize=8)
    ax.margins(x=0.3, y=0.12)
    return fig


KINDS: dict[str, Callable[..., Figure]] = {
    "scale_ap": scale_ap_figure,
    "pool_frontier": frontier_figure,
    "index_bytes": index_bytes_figure,
}


def svg_bytes(fig: Figure) -> bytes:
    """The figure as SVG bytes (deterministic: ``STYLE``'s hash salt, no date)."""
    buffer = io.BytesIO()
    with rc_context(STYLE):
        fig.savefig(buffer, format="svg", metadata=METADATA)
    return buffer.getvalue()


def draw(data: dict) -> bytes:
    """SVG of one figure's saved data (the contents of a ``docs/figures/*.json``)."""
    kind = data.get("figure")
    if kind not in KINDS:
        raise ValueError(f"figure={kind!r}: unknown kind; choose from {sorted(KINDS)}")
    return svg_bytes(KINDS[kind](data["rows"], **({"title": data["title"]} if data.get("title") else {})))


def redraw(json_path: Path, out_dir: Path | None = None) -> Path:
    """Draw ``json_path``'s figure into ``out_dir`` (default: beside it) as ``<stem>.svg``; its path."""
    json_path = Path(json_path)
    out = Path(out_dir or json_path.parent) / f"{json_path.stem}.svg"
    out.write_bytes(draw(json.loads(json_path.read_text(encoding="utf-8"))))
    return out


def write_figure_data(json_path: Path, kind: str, rows: list[dict], commands: Sequence[str],
                      title: str | None = None, note: str | None = None) -> Path:
    """Save ``rows`` (with the commands that measured them) as ``json_path`` and draw its SVG
    beside it; returns the SVG's path."""
    data = {"figure": kind, "title": title, "commands": list(commands), "note": note, "rows": rows}
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({k: v for k, v in data.items() if v is not None}, indent=1,
                                    ensure_ascii=False) + "\n", encoding="utf-8")
    return redraw(json_path)
