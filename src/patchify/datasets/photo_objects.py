"""Real-photo objects for the mini-ILIAS: planar pictures cut from registry-packaged photographs.

The photo family's objects are rectangles cut from real photographs (a painting,
a graffiti wall, a cereal box, a circuit board, a cat, textures...), pasted into
*other* photographs as if they were pictures, posters or covers seen from an
angle. This module holds what is specific to them and needs no drawing code:

- which photos are object sources and which are backgrounds (disjoint lists, so
  that no background or clutter patch can show an instance's pixels);
- the catalogue of candidate regions: each object photo is cut into a grid of
  cells separated by a gap, and cells with too little detail (sky, a blank
  wall) are dropped, so that any two regions, instances or not, share no pixel;
- the instance selection (round-robin over the photos, so they are spread);
- the geometry: a rectangle seen by a pinhole camera after a 3D rotation, and
  the box of the part of a quadrilateral that lies inside the image.

``mini_ilias.py`` draws the images with these pieces.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

# Object sources: photos with distinct content in most parts (so not apple.jpg or orange.jpg,
# whose crops are smooth skin, nor the dark ela_original.jpg; those stay backgrounds). The
# three textures give one region each (any two crops of a stationary texture look alike).
OBJECT_PHOTO_SETS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("deb", "opencv-doc", "usr/share/doc/opencv-doc/examples/data", (
        "baboon.jpg", "board.jpg", "box.png", "butterfly.jpg", "chicky_512.png", "fruits.jpg", "graf1.png",
        "smarties.png", "squirrel_cls.jpg", "starry_night.jpg")),
    ("pip", "scikit-image", "skimage/data", (
        "astronaut.png", "brick.png", "chelsea.png", "coffee.png", "coins.png", "grass.png", "gravel.png",
        "hubble_deep_field.jpg", "ihc.png")),
)
TEXTURES = frozenset({"brick.png", "grass.png", "gravel.png"})
# Background photos that show an object source: box_in_scene.png holds the box of box.png.
SHOWS_AN_OBJECT = frozenset({"box_in_scene.png"})

CELL_PX = 160  # nominal side of a catalogue cell, in the source photo's pixels
CELL_GAP = 4  # pixels trimmed off each side of a cell: regions of one photo are >= 8 px apart
MIN_REGION_PX = 64
# a cell is kept when its grey levels vary (std) and it has edges (mean absolute gradient)
MIN_CELL_STD = 20.0
MIN_CELL_GRADIENT = 4.0


def object_photo_names() -> frozenset[str]:
    """File names of every object source photo."""
    return frozenset(name for *_, names in OBJECT_PHOTO_SETS for name in names)


def is_background(file_name: str) -> bool:
    """Whether a photo of the shared photo list may be a background in the photo family."""
    return file_name not in object_photo_names() and file_name not in SHOWS_AN_OBJECT


@dataclass(frozen=True)
class PhotoRegion:
    """A cell of an object photo: where an instance (or look-alike clutter) is cut.

    ``cell`` and ``rect`` are (left, top, right, bottom) in the source photo's
    own pixels; ``rect`` is the instance's picture, a rectangle inside the
    cell fixed once for all its images (None for a cell that is no instance).
    """

    path: Path  # the photo in the asset cache (not written out)
    source: str  # "package:path inside the package"
    cell: tuple[int, int, int, int]
    row: int
    col: int
    rect: Optional[tuple[int, int, int, int]] = None

    @property
    def family(self) -> str:
        """Look-alike group: every region of one photo."""
        return "photo:" + Path(self.source).name

    @property
    def name(self) -> str:
        """Readable slug, e.g. ``starry_night_r1c2``."""
        stem = re.sub(r"[^a-z0-9]+", "_", Path(self.source).stem.lower()).strip("_")
        return f"{stem}_r{self.row}c{self.col}"


def load_object_photo(path: Path) -> Image.Image:
    """An object photo as RGB at its own resolution (a transparent part becomes white)."""
    with Image.open(path) as im:
        if im.mode in ("RGBA", "LA", "P"):
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return im.convert("RGB")


def _detailed(cell: np.ndarray) -> bool:
    grey = cell.astype(np.float32)
    gradient = (np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean()) / 2
    return float(grey.std()) >= MIN_CELL_STD and float(gradient) >= MIN_CELL_GRADIENT


def photo_cells(photo: Image.Image, texture: bool = False) -> list[tuple[int, int, tuple[int, int, int, int]]]:
    """(row, col, cell box) of the detailed cells of a photo, in row-major order.

    The photo is split into ``W // CELL_PX`` x ``H // CELL_PX`` equal cells (one
    cell for a texture), each trimmed by :data:`CELL_GAP` on every side.
    """
    width, height = photo.size
    cols, rows = (1, 1) if texture else (max(1, width // CELL_PX), max(1, height // CELL_PX))
    grey = np.asarray(photo.convert("L"))
    out = []
    for r in range(rows):
        for c in range(cols):
            box = (c * width // cols + CELL_GAP, r * height // rows + CELL_GAP,
                   (c + 1) * width // cols - CELL_GAP, (r + 1) * height // rows - CELL_GAP)
            if min(box[2] - box[0], box[3] - box[1]) < MIN_REGION_PX:
                continue
            if _detailed(grey[box[1]:box[3], box[0]:box[2]]):
                out.append((r, c, box))
    return out


def select_regions(catalogue: Sequence[Sequence[PhotoRegion]], count: int,
                   rng: np.random.Generator) -> list[PhotoRegion]:
    """``count`` regions, round-robin over the photos in a random order, a random free cell each time.

    ``catalogue`` holds one list of regions per photo. Raises ``ValueError``
    when there are fewer regions than ``count``.
    """
    total = sum(len(cells) for cells in catalogue)
    if count > total:
        raise ValueError(f"{count} photo instances asked but the object photos give only {total} distinct regions")
    free = [list(cells) for cells in catalogue]
    order = rng.permutation(len(free))
    chosen: list[PhotoRegion] = []
    while len(chosen) < count:
        for k in order:
            if len(chosen) >= count:
                break
            if free[k]:
                chosen.append(free[k].pop(int(rng.integers(len(free[k])))))
    return chosen


def sub_rectangle(rng: np.random.Generator, cell: tuple[int, int, int, int], area: Sequence[float],
                  aspect: Sequence[float]) -> tuple[int, int, int, int]:
    """A random rectangle inside ``cell``: ``area`` share of it, aspect log-uniform in ``aspect``."""
    cw, ch = cell[2] - cell[0], cell[3] - cell[1]
    share = rng.uniform(*area)
    ratio = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
    w = min(cw, max(MIN_REGION_PX, round(math.sqrt(share * cw * ch * ratio))))
    h = min(ch, max(MIN_REGION_PX, round(share * cw * ch / w)))
    x = cell[0] + int(rng.integers(0, cw - w + 1))
    y = cell[1] + int(rng.integers(0, ch - h + 1))
    return x, y, x + w, y + h


# --------------------------------------------------------------------------- geometry


def plane_view(width: float, height: float, yaw_deg: float, pitch_deg: float, roll_deg: float,
               focal: float = 2.0) -> np.ndarray:
    """Image corners of a ``width`` x ``height`` rectangle seen after a 3D rotation.

    The rectangle lies in the plane z = 0, centred on the optical axis, at a
    distance of ``focal * max(width, height)`` from a pinhole camera of that
    focal length (so a fronto-parallel view keeps its size); it turns by
    ``yaw`` (about the vertical axis), ``pitch`` (horizontal axis), then
    ``roll`` (in the image plane). Returns the 4 x 2 corners (top-left,
    top-right, bottom-right, bottom-left), centred on the origin.
    """
    y, p, r = (math.radians(a) for a in (yaw_deg, pitch_deg, roll_deg))
    rot_y = np.array([[math.cos(y), 0, math.sin(y)], [0, 1, 0], [-math.sin(y), 0, math.cos(y)]])
    rot_x = np.array([[1, 0, 0], [0, math.cos(p), -math.sin(p)], [0, math.sin(p), math.cos(p)]])
    rot_z = np.array([[math.cos(r), -math.sin(r), 0], [math.sin(r), math.cos(r), 0], [0, 0, 1]])
    corners = np.array([[-width / 2, -height / 2, 0], [width / 2, -height / 2, 0],
                        [width / 2, height / 2, 0], [-width / 2, height / 2, 0]])
    distance = focal * max(width, height)
    points = corners @ (rot_z @ rot_x @ rot_y).T + [0, 0, distance]
    projected = distance * points[:, :2] / points[:, 2:3]
    return projected - projected.mean(0)


def clip_polygon(points: np.ndarray, width: float, height: float) -> np.ndarray:
    """The part of a convex polygon inside [0, width] x [0, height] (Sutherland-Hodgman)."""
    poly = [tuple(p) for p in np.asarray(points, dtype=np.float64)]
    for axis, limit, keep_below in ((0, 0.0, False), (0, float(width), True), (1, 0.0, False),
                                    (1, float(height), True)):
        def inside(q: tuple[float, float]) -> bool:
            return q[axis] <= limit if keep_below else q[axis] >= limit

        out: list[tuple[float, float]] = []
        for k, current in enumerate(poly):
            previous = poly[k - 1]
            if inside(current) != inside(previous):
                t = (limit - previous[axis]) / (current[axis] - previous[axis])
                out.append((previous[0] + t * (current[0] - previous[0]), previous[1] + t * (current[1] - previous[1])))
            if inside(current):
                out.append(current)
        poly = out
        if not poly:
            break
    return np.array(poly, dtype=np.float64).reshape(-1, 2)


def visible_box(corners: np.ndarray, width: int, height: int) -> Optional[tuple[int, int, int, int]]:
    """``(x, y, w, h)`` in whole pixels of the part of a quadrilateral inside a ``width`` x ``height`` image.

    The box of the clipped polygon, widened to whole pixels (floor of the
    smallest, ceiling of the largest coordinate); None when nothing is inside.
    """
    inside = clip_polygon(corners, width, height)
    if len(inside) < 3:
        return None
    x0, y0 = (max(0, math.floor(v + 1e-6)) for v in inside.min(0))
    x1, y1 = min(width, math.ceil(inside[:, 0].max() - 1e-6)), min(height, math.ceil(inside[:, 1].max() - 1e-6))
    if x1 <= x0 or y1 <= y0:
        return None
    return x0, y0, x1 - x0, y1 - y0
