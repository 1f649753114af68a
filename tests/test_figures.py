"""Tests for src/patchify/figures.py and scripts/figures.py: figures drawn from their data, deterministically."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from patchify.figures import draw, pareto, scale_ap_figure, scale_group_label, svg_bytes

ROOT = Path(__file__).resolve().parent.parent
SCALES = {"0.000-0.069": 12.5, "0.069-0.135": None, "0.135-0.273": 50.0, "0.273-inf": 80.25}


def test_scale_bars_are_the_data():
    fig = scale_ap_figure([{"label": "L3", "mAP": 40.0, "mAP_scale": SCALES},
                           {"label": "L0", "mAP_scale": dict(SCALES, **{"0.000-0.069": 3.0})}])
    ax = fig.axes[0]
    l3, l0 = ax.containers
    assert [bar.get_height() for bar in l3] == [12.5, 0.0, 50.0, 80.25]
    assert [bar.get_height() for bar in l0] == [3.0, 0.0, 50.0, 80.25]
    assert [t.get_text() for t in ax.texts] == ["12.5", "n/a", "50.0", "80.2", "3.0", "n/a", "50.0", "80.2"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["< 6.9 %", "6.9-13.5 %", "13.5-27.3 %", "\u2265 27.3 %"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["L3 (mAP 40.00)", "L0"]


def test_scale_group_label():
    assert scale_group_label("0.135-0.273") == "13.5-27.3 %"


def test_pareto():
    rows = [{"s": 1, "m": 30}, {"s": 2, "m": 35}, {"s": 3, "m": 20}, {"s": 0.5, "m": 40}, {"s": 2.5, "m": 10}]
    assert [r["s"] for r in pareto(rows, "s", "m")] == [0.5, 2, 3]


def test_svg_is_deterministic_and_undated():
    data = {"figure": "scale_ap", "rows": [{"label": "run", "mAP_scale": SCALES}]}
    first = draw(data)
    assert first == draw(data) and first.startswith(b"<?xml")
    assert b"<dc:date>" not in first and b">80.2<" in first  # no timestamp; text kept as text
    assert first != draw({"figure": "scale_ap", "rows": [{"label": "run", "mAP_scale": dict(SCALES, **{"0.273-inf": 80.0})}]})
    fig = scale_ap_figure([{"label": "run", "mAP_scale": SCALES}])
    assert svg_bytes(fig) == svg_bytes(fig)
    with pytest.raises(ValueError, match="figure='pie'"):
        draw({"figure": "pie", "rows": []})


def _figures_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "figures.py"), *args],
                          capture_output=True, text=True, timeout=120)


def test_check_passes_on_the_committed_figures_and_fails_on_a_stale_one(tmp_path):
    assert _figures_script("--check").returncode == 0  # every docs figure is what its JSON draws
    for suffix in (".json", ".svg"):
        shutil.copy(ROOT / "docs" / "figures" / f"scale_ap{suffix}", tmp_path / f"scale_ap{suffix}")
    data_path = tmp_path / "scale_ap.json"
    assert _figures_script("--check", str(data_path)).returncode == 0
    data = json.loads(data_path.read_text())
    data["rows"][0]["mAP_scale"]["0.000-0.069"] += 1.0  # new numbers, figure not redrawn
    data_path.write_text(json.dumps(data))
    stale = _figures_script("--check", str(data_path))
    assert stale.returncode == 1 and "scale_ap.svg: differs" in stale.stdout
    assert _figures_script(str(data_path)).returncode == 0  # redraw
    assert _figures_script("--check", str(data_path)).returncode == 0
