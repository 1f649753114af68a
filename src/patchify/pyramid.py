"""Pyramid: which patches an image is cut into, and their boxes.

Level ``l`` is a non-overlapping ``(l+1) x (l+1)`` grid over the whole image
(L0 = whole image, L3 = 4x4). Cell edges are rounded to whole pixels as
``round(i * W / n)``, so the cells of one level tile the image exactly, odd
sizes included. Boxes are ``(x, y, w, h)`` in the original image's pixels.
"""

from __future__ import annotations

import numpy as np

MAX_LEVEL = 3
MULTI_SCALE_MODES = ("pyramid", "single")


def levels_for(level: int, multi_scale: str) -> list[int]:
    """Levels indexed for ``pyramid.level`` / ``pyramid.multi_scale``."""
    if not 0 <= level <= MAX_LEVEL:
        raise ValueError(f"pyramid.level must be in 0..{MAX_LEVEL}, got {level}")
    if multi_scale == "pyramid":
        return list(range(level + 1))
    if multi_scale == "single":
        return [level]
    raise ValueError(f"pyramid.multi_scale must be one of {MULTI_SCALE_MODES}, got {multi_scale!r}")


def grid_edges(size: int, cells: int) -> np.ndarray:
    """Integer cell edges 0 = e0 < ... < e_cells = size (cells of near-equal width)."""
    return np.floor(np.arange(cells + 1) * size / cells + 0.5).astype(np.int64)


def level_boxes(width: int, height: int, level: int) -> np.ndarray:
    """Boxes (n, 4) int64 of one level, row-major (top-left cell first)."""
    cells = level + 1
    xs, ys = grid_edges(width, cells), grid_edges(height, cells)
    boxes = [
        (xs[c], ys[r], xs[c + 1] - xs[c], ys[r + 1] - ys[r])
        for r in range(cells)
        for c in range(cells)
    ]
    return np.asarray(boxes, dtype=np.int64).reshape(-1, 4)


def patches_per_image(levels: list[int]) -> int:
    return sum((level + 1) ** 2 for level in levels)
