"""Generate a *mini-ILIAS*: a small instance-retrieval data set in ILIAS's native layout.

Two object families (``MiniIliasConfig.objects``): ``emoji``, colour glyphs of
Noto Color Emoji (Debian ``fonts-noto-color-emoji``), and ``photo``, planar
pictures cut from real photographs and seen in perspective (``photo_objects.py``);
``both`` makes half the instances of each. Backgrounds and clutter are real
photographs that registry packages ship (Debian ``opencv-doc`` and
``mate-backgrounds``, the images bundled in the ``scikit-image`` wheel). Every
glyph has a true alpha mask and every picture known corners, so every box is
exact. Layout written under ``out``::

    ilias_core/<instance>/query/Q{iii}_{qq}.jpg  + Q{iii}_{qq}_bbox.txt
    ilias_core/<instance>/pos/P{iii}_{pp}.jpg    + P{iii}_{pp}_bbox.txt
    distractors/D{nnnnnn}.jpg
    GENERATED.json

A box file holds one line ``x y w h`` (integer pixels, top-left corner, width,
height) per copy of the object: its full extent, parts hidden by an occluder
included (for a picture: the box of its warped corners' quadrilateral, clipped
to the image). ``ilias/README.md`` lists every transform and its range; the
numbers live in :data:`TRANSFORMS` and :data:`PHOTO_TRANSFORMS` below and are
copied into GENERATED.json.

Glyphs are read from the font's tables with fontTools (``cmap`` and ``GSUB``
give each glyph's code point sequence, ``CBLC``/``CBDT`` its PNG bitmap). That
is the very bitmap that ``ImageFont.truetype(font, 109)`` plus
``draw.text(..., embedded_color=True)`` draws, without needing libraqm to
shape multi-code-point sequences (skin tones, ZWJ sequences, flags).

Determinism: instance selection uses one ``numpy`` Generator seeded with
``config.seed``; every image is drawn by its own Generator derived from
``SeedSequence(seed, spawn_key=(kind, i, j))``, so an image's bytes depend on
the seed and its index only, not on the order or the number of worker
processes. Nothing else is random, and no time, pid or absolute path is
written.
"""

from __future__ import annotations

import argparse
import colorsys
import gzip
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import unicodedata
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import PIL
from fontTools.ttLib import TTFont, TTLibError
from loguru import logger
from PIL import Image, ImageFilter

from ..assets import AssetError, debian_package, pip_package, sha256_of
from . import photo_objects
from .photo_objects import PhotoRegion

GENERATOR_VERSION = "1"

FONT_PACKAGE = "fonts-noto-color-emoji"
FONT_FILE = "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
SKIMAGE_REQUIREMENT = "scikit-image==0.25.2"

# Real photographs only: drawings, logos, renders, charts, text pages,
# chessboards and near-duplicate stereo/sequence partners are left out.
OPENCV_PHOTOS = (
    "aero1.jpg", "aero3.jpg", "aloeL.jpg", "apple.jpg", "baboon.jpg", "basketball1.png",
    "board.jpg", "box_in_scene.png", "building.jpg", "butterfly.jpg",
    "chicky_512.png", "ela_original.jpg", "fruits.jpg", "graf1.png", "home.jpg", "left.jpg",
    "leuvenA.jpg", "licenseplate_motion.jpg", "messi5.jpg", "orange.jpg", "rubberwhale1.png",
    "smarties.png", "squirrel_cls.jpg", "starry_night.jpg", "stuff.jpg",
)
# Only the bundled images whose docstring (skimage/data/_fetchers.py) states CC0, public
# domain or "no known copyright restrictions" (so not moon.png, nor the Middlebury motorcycle).
SKIMAGE_PHOTOS = (
    "astronaut.png", "brick.png", "camera.png", "chelsea.png", "coffee.png", "coins.png",
    "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "rocket.jpg",
)
# (package kind, package, folder inside the package, allow-list or None = every *.jpg)
PHOTO_SETS: tuple[tuple[str, str, str, Optional[tuple[str, ...]]], ...] = (
    ("deb", "opencv-doc", "usr/share/doc/opencv-doc/examples/data", OPENCV_PHOTOS),
    ("deb", "mate-backgrounds", "usr/share/backgrounds/mate/nature", None),
    ("pip", SKIMAGE_REQUIREMENT, "skimage/data", SKIMAGE_PHOTOS),
)
MIN_PHOTO_SIDE = 256  # smaller files are skipped
MAX_PHOTO_SIDE = 1024  # photos are downscaled to this longer side once, on load

# Every random range the generator uses (uniform unless said otherwise).
TRANSFORMS: dict[str, Any] = {
    "jpeg_quality": 90,
    "alpha_threshold": 24,  # a pixel belongs to an object's box when its alpha > this (of 255)
    "query": {
        "side_px": [320, 512],  # width and height drawn independently
        "area": [0.30, 0.70],  # object box area / image area
        "rotation_deg": 15.0,
        "perspective": 0.03,  # corner jitter, fraction of the object's size
        "aspect": 1.05,  # anisotropic scale factor in [1/a, a] (log-uniform)
        "gradient_p": 0.5,  # else a solid colour
        "bg_saturation": [0.0, 0.35],
        "bg_value": [0.35, 0.97],
        "gradient_value_delta": 0.25,
    },
    "positive": {
        "side_px": [400, 900],  # width and height drawn independently
        "crop_scale": [0.35, 1.0],  # area of the photo crop / largest crop of that aspect
        "flip_p": 0.5,
        "rotation_deg": 45.0,
        "perspective": 0.12,
        "aspect": 1.25,
        "brightness": [0.75, 1.25],
        "contrast": [0.75, 1.25],
        "saturation": [0.7, 1.3],
        "hue_deg": 12.0,
        "object_blur_p": 0.2,
        "object_blur_radius": [0.5, 2.0],
        "image_blur_p": 0.1,
        "image_blur_radius": [0.4, 1.0],
        "occlusion_p": 0.3,
        "occlusion_cover": [0.05, 0.30],  # share of the object's opaque pixels hidden
        "occluder_area": [0.15, 0.6],  # occluder area / object box area
        "occluder_emoji_p": 0.5,  # else a photo patch
        "two_copies_p": 0.1,
        "clutter_emoji": [1, 4],  # integer range, inclusive
        "clutter_photo": [0, 3],
        "clutter_area": [0.01, 0.12],  # log-uniform
    },
    "photo_patch": {  # clutter and occluders cut from a photo
        "crop_scale": [0.05, 0.6],
        "aspect": [0.6, 1.6],  # log-uniform
        "ellipse_p": 0.5,  # else a rectangle
        "flip_p": 0.5,
        "rotation_deg": 30.0,
        "perspective": 0.05,
        "scale_aspect": 1.1,
    },
    "distractor": {
        "clutter_emoji": [2, 6],
        "clutter_photo": [0, 3],
        "decoy_p": 0.3,  # a non-instance look-alike of an instance, pasted like an object
    },
}

# The photo family (``objects=photo``; ``both`` uses it for half the instances): how a
# picture cut from an object photo is drawn. Backgrounds, photo patches and query
# backgrounds follow TRANSFORMS above, with backgrounds taken from the photos that are
# no object source (photo_objects.is_background).
PHOTO_TRANSFORMS: dict[str, Any] = {
    "region": {  # an instance's picture: a rectangle inside its catalogue cell, fixed per instance
        "area": [0.5, 1.0],  # share of the cell
        "aspect": [0.6, 1.6],  # log-uniform
    },
    "query": {  # the picture nearly fronto-parallel on a plain background (TRANSFORMS["query"])
        "area": [0.30, 0.70],  # box area / image area
        "yaw_deg": 10.0,  # out-of-plane turns, uniform in [-v, v]
        "pitch_deg": 10.0,
        "roll_deg": 5.0,  # in-plane rotation
    },
    "positive": {
        "yaw_deg": 50.0,
        "pitch_deg": 50.0,
        "roll_deg": 30.0,
        "focal": 2.0,  # camera distance and focal length, in units of the picture's longer side
        "frame_cut_p": 0.2,  # the picture may reach out of the image ...
        "frame_cut": 0.25,  # ... by up to this share of its box on each side
        "brightness": [0.85, 1.15],
        "contrast": [0.85, 1.15],
        "saturation": [0.85, 1.15],
        "hue_deg": 5.0,
        "object_blur_p": 0.2,
        "object_blur_radius": [0.5, 1.5],
        "image_blur_p": 0.1,
        "image_blur_radius": [0.4, 1.0],
        "occlusion_p": 0.3,
        "occlusion_cover": [0.05, 0.30],
        "occluder_area": [0.15, 0.6],
        "occluder_emoji_p": 0.0,  # occluders are photo patches
        "two_copies_p": 0.1,
        "clutter_pictures": [0, 2],  # pictures cut from object-photo cells that are no instance
        "clutter_photo": [1, 4],  # photo patches (TRANSFORMS["photo_patch"]) of background photos
        "clutter_area": [0.01, 0.12],  # log-uniform
    },
    "distractor": {
        "clutter_pictures": [1, 3],
        "clutter_photo": [1, 4],
        "decoy_p": 0.3,  # a free cell of an instance's photo, pasted like an object
    },
}
OBJECT_FAMILIES = ("emoji", "photo", "both")

_KIND_CODE = {"query": 0, "pos": 1, "distractor": 2}
_SKIN_TONES = {0x1F3FB: "light", 0x1F3FC: "medium light", 0x1F3FD: "medium", 0x1F3FE: "medium dark",
               0x1F3FF: "dark"}
_ZWJ, _VS16, _KEYCAP = 0x200D, 0xFE0F, 0x20E3
_PEOPLE = {0x1F468, 0x1F469, 0x1F9D1, 0x1F466, 0x1F467, 0x1FAF1}  # lead element of a ZWJ sequence
_SUFFIXES = {0x2640, 0x2642, 0x27A1}  # gender signs and "facing right" never lead
_STRIP_WORDS = frozenset(
    "BLACK WHITE RED ORANGE YELLOW GREEN BLUE PURPLE BROWN LARGE SMALL MEDIUM HEAVY LIGHT DARK "
    "ONE TWO THREE FOUR FIVE SIX SEVEN EIGHT NINE TEN ELEVEN TWELVE THIRTY OCLOCK "
    "NEW FULL FIRST LAST QUARTER WAXING WANING CRESCENT GIBBOUS".split())
# yellow round faces (the person gestures 1F645-1F64F and face palm 1F926 are not in)
_SMILEY_BLOCKS = ((0x1F600, 0x1F644), (0x1F910, 0x1F925), (0x1F927, 0x1F92F), (0x1F970, 0x1F97F),
                  (0x1FAE0, 0x1FAEF), (0x2639, 0x263A))


class MiniIliasError(RuntimeError):
    """The data set cannot be generated as asked (one-line message)."""


@dataclass(frozen=True)
class MiniIliasConfig:
    """Everything that changes a mini-ILIAS's content.

    ``hard_negative_fraction`` is the share of emoji instances that come with a
    look-alike instance among the others (a skin-tone variant, a differently
    coloured heart, another flag...). ``min_area``/``max_area`` bound a
    positive's object box area as a fraction of the image (log-uniform).
    ``objects``: ``emoji``, ``photo`` or ``both`` (the first half of the
    instances emoji, the rest photo; distractors alternate).
    """

    instances: int = 30
    queries_per_instance: int = 1
    positives_per_instance: int = 4
    distractors: int = 60
    seed: int = 0
    hard_negative_fraction: float = 0.3
    min_area: float = 0.02
    max_area: float = 0.30
    objects: str = "emoji"

    def parameters(self) -> dict[str, Any]:
        """The parameters as GENERATED.json records them (``objects`` left out for emoji, as before it existed)."""
        values = asdict(self)
        if self.objects == "emoji":
            del values["objects"]
        return values

    def family_counts(self) -> tuple[int, int]:
        """(emoji instances, photo instances)."""
        photo = {"emoji": 0, "photo": self.instances, "both": self.instances // 2}.get(self.objects, 0)
        return self.instances - photo, photo

    def validate(self) -> None:
        """Raise :class:`MiniIliasError` on a value that cannot work."""
        if self.objects not in OBJECT_FAMILIES:
            raise MiniIliasError(f"objects={self.objects!r}: unknown object family (choose from "
                                 f"{', '.join(OBJECT_FAMILIES)})")
        if self.instances < 1 or self.queries_per_instance < 1 or self.positives_per_instance < 1:
            raise MiniIliasError("instances, queries_per_instance and positives_per_instance must be >= 1")
        if self.distractors < 0:
            raise MiniIliasError("distractors must be >= 0")
        if not 0.0 <= self.hard_negative_fraction <= 1.0:
            raise MiniIliasError("hard_negative_fraction must lie in [0, 1]")
        if not 0.0 < self.min_area < self.max_area <= 0.5:
            raise MiniIliasError("need 0 < min_area < max_area <= 0.5")


# --------------------------------------------------------------------------- glyphs


@dataclass(frozen=True)
class Glyph:
    """One colour glyph of the emoji font."""

    gid: int  # glyph id in the font
    codepoints: tuple[int, ...]
    name: str  # readable slug, e.g. "dog_face"
    family: str  # look-alike group, e.g. "seq:1F44D" for every skin tone of thumbs up


class EmojiFont:
    """A CBDT colour font (Noto Color Emoji) read with fontTools: glyph sequences and PNG bitmaps."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            font = TTFont(self.path)
        except (OSError, TTLibError) as err:
            raise MiniIliasError(f"{self.path}: not a readable font ({err})") from None
        with font:
            for tag in ("cmap", "GSUB", "CBLC", "CBDT"):
                if tag not in font:
                    raise MiniIliasError(f"{self.path.name} has no {tag} table: not a CBDT colour emoji font")
            self._pngs = self._read_bitmaps(font)
            self.sequences = self._read_sequences(font)

    def _read_bitmaps(self, font: TTFont) -> dict[int, bytes]:
        """Glyph id -> PNG bytes of its bitmap in the first strike (glyphs with an empty bitmap left out)."""
        strikes = font["CBDT"].strikeData
        if not strikes:
            raise MiniIliasError(f"{self.path.name} has no bitmap strike")
        out = {}
        for name, bitmap in strikes[0].items():
            if bitmap.getFormat() not in (17, 18, 19):
                raise MiniIliasError(f"{self.path.name}: CBDT image format {bitmap.getFormat()} is not supported")
            out[font.getGlyphID(name)] = bitmap.imageData
        return out

    @staticmethod
    def _read_cmap(font: TTFont) -> dict[int, int]:
        """Code point -> glyph id, from the format 12 and 4 subtables (the first that maps a code point wins)."""
        mapping: dict[int, int] = {}
        for table in font["cmap"].tables:
            if table.format in (4, 12):
                for cp, name in table.cmap.items():
                    mapping.setdefault(cp, font.getGlyphID(name))
        return mapping

    @staticmethod
    def _read_ligatures(font: TTFont) -> list[tuple[int, tuple[int, ...]]]:
        """(ligature glyph, component glyphs) of every GSUB ligature substitution."""
        gid = font.getGlyphID
        out = []
        for lookup in font["GSUB"].table.LookupList.Lookup:
            for sub in lookup.SubTable:
                if lookup.LookupType == 7:  # extension: holds the real subtable
                    sub = sub.ExtSubTable
                if not hasattr(sub, "ligatures"):  # LigatureSubst (type 4) only
                    continue
                for first, ligatures in sub.ligatures.items():
                    for lig in ligatures:
                        out.append((gid(lig.LigGlyph), (gid(first), *map(gid, lig.Component))))
        return out

    def _read_sequences(self, font: TTFont) -> dict[int, tuple[int, ...]]:
        """Glyph id -> its canonical code point sequence (glyphs with a bitmap only)."""
        cmap = self._read_cmap(font)
        reverse: dict[int, int] = {}
        for cp in sorted(cmap):
            reverse.setdefault(cmap[cp], cp)
        options: dict[int, set[tuple[int, ...]]] = {gid: {(cp,)} for gid, cp in reverse.items()}
        for glyph, comps in self._read_ligatures(font):
            if all(c in reverse for c in comps):
                options.setdefault(glyph, set()).add(tuple(reverse[c] for c in comps))
        return {gid: _canonical_sequence(options[gid]) for gid in sorted(options) if gid in self._pngs}

    def image(self, gid: int) -> Image.Image:
        """The glyph's bitmap as RGBA (136 x 128 px for Noto Color Emoji)."""
        return Image.open(io.BytesIO(self._pngs[gid])).convert("RGBA")


def _is_private(cp: int) -> bool:
    return 0xE000 <= cp <= 0xF8FF or cp >= 0xF0000


def _canonical_sequence(options: set[tuple[int, ...]]) -> tuple[int, ...]:
    """Pick the standard sequence among those a font maps to one glyph.

    Google's legacy private-use code points come last. The font also maps
    element-reversed ZWJ sequences (for right-to-left text) to the same
    glyph; a person leads and a gender sign or arrow never does.
    """
    return min(options, key=lambda s: (any(map(_is_private, s)), len(s), s[0] not in _PEOPLE,
                                       s[0] in _SUFFIXES, s))


def _is_flag(seq: tuple[int, ...]) -> bool:
    regional = len(seq) == 2 and all(0x1F1E6 <= cp <= 0x1F1FF for cp in seq)
    tagged = len(seq) > 2 and seq[0] == 0x1F3F4 and all(0xE0020 <= cp <= 0xE007F for cp in seq[1:])
    return regional or tagged


def _cp_name(cp: int) -> str:
    return unicodedata.name(chr(cp), f"U{cp:04X}")


def glyph_name(seq: tuple[int, ...], max_len: int = 40) -> str:
    """Readable slug for a code point sequence, e.g. ``thumbs_up_sign_medium_skin``.

    Skin tones are named last (the font's own sequences do not always keep
    them beside their person), flags by their region letters (``flag_de``).
    """
    if _is_flag(seq):
        letters = [cp - 0x1F1E6 + ord("a") if cp < 0xE0000 else cp - 0xE0000 for cp in seq if cp != 0x1F3F4]
        words = ["flag", "".join(chr(c) for c in letters if chr(c).isalnum())]
    else:
        words = ["keycap" if cp == _KEYCAP else _cp_name(cp) for cp in seq
                 if cp not in (_ZWJ, _VS16) and cp not in _SKIN_TONES]
        tones: list[str] = []
        for cp in seq:
            if cp in _SKIN_TONES and _SKIN_TONES[cp] not in tones:
                tones.append(_SKIN_TONES[cp])
        if tones:
            words += tones + ["skin"]
    slug = re.sub(r"[^a-z0-9]+", "_", " ".join(words).lower()).strip("_")
    if len(slug) > max_len:
        slug = slug[:max_len].rsplit("_", 1)[0]
    return slug or "glyph"


def glyph_family(seq: tuple[int, ...]) -> str:
    """Look-alike group of a sequence.

    Same group: skin-tone, gender and facing variants of one emoji, ZWJ
    sequences of the same elements with any persons (``👩‍💻``, ``👨‍💻``), all
    flags, all keycaps, the yellow smiley faces, and names equal but for
    colour, size, number or moon-phase words (hearts, apples, clock faces).
    """
    if _is_flag(seq):
        return "flag"
    if _KEYCAP in seq:
        return "keycap"
    core = [cp for cp in seq if cp not in _SKIN_TONES and cp != _VS16]
    elements: list[int] = []
    for cp in core:
        if cp == _ZWJ or cp in _SUFFIXES:
            continue
        elements.append(0 if (_ZWJ in core and cp in _PEOPLE) else cp)
    if len(elements) == 1 and elements[0]:
        cp = elements[0]
        name = _cp_name(cp)
        if any(lo <= cp <= hi for lo, hi in _SMILEY_BLOCKS) and "FACE" in name and "CAT" not in name:
            return "smiley"
        words = re.split(r"[ -]", name)
        kept = [w for w in words if w not in _STRIP_WORDS]
        if kept and kept != words:
            return "name:" + " ".join(kept)
    return "seq:" + "-".join("P" if cp == 0 else f"{cp:X}" for cp in sorted(elements))


def _is_excluded(seq: tuple[int, ...]) -> bool:
    """Private-use glyphs, and single code points that only serve as parts of sequences."""
    if any(map(_is_private, seq)):
        return True
    if len(seq) != 1:
        return False
    cp = seq[0]
    return cp < 0x80 or cp in _SKIN_TONES or cp in (_ZWJ, _VS16, _KEYCAP) or 0x1F1E6 <= cp <= 0x1F1FF \
        or 0xE0020 <= cp <= 0xE007F


def eligible_glyphs(font: EmojiFont, min_opaque: float = 0.10, min_side: int = 32) -> list[Glyph]:
    """Glyphs usable as objects, sorted by glyph id.

    Leaves out private-use glyphs, sequence components (skin-tone swatches,
    lone regional indicators, ASCII digits) and glyphs that are mostly empty (fewer than
    ``min_opaque`` of the cell opaque, or a box side under ``min_side`` px:
    small squares, dotted faces).
    """
    out = []
    for gid, seq in font.sequences.items():
        if _is_excluded(seq):
            continue
        alpha = np.asarray(font.image(gid).getchannel("A")) > 127
        rows, cols = np.flatnonzero(alpha.any(1)), np.flatnonzero(alpha.any(0))
        if alpha.mean() < min_opaque or rows.size == 0 or min(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 < min_side:
            continue
        out.append(Glyph(gid=gid, codepoints=seq, name=glyph_name(seq), family=glyph_family(seq)))
    return out


def group_families(glyphs: Sequence[Glyph]) -> list[tuple[Glyph, ...]]:
    """Glyphs grouped by look-alike family, families sorted by key, members by glyph id."""
    families: dict[str, list[Glyph]] = {}
    for glyph in sorted(glyphs, key=lambda g: g.gid):
        families.setdefault(glyph.family, []).append(glyph)
    return [tuple(families[key]) for key in sorted(families)]


def _pick(rng: np.random.Generator, groups: Sequence[Sequence[Any]]) -> Any:
    """A family uniformly at random, then one of its members (so skin tones do not swamp the rest)."""
    group = groups[int(rng.integers(len(groups)))]
    return group[int(rng.integers(len(group)))]


def select_instances(glyphs: Sequence[Glyph], config: MiniIliasConfig,
                     rng: np.random.Generator) -> list[Glyph]:
    """Pick ``config.instances`` glyphs, ``hard_negative_fraction`` of them in look-alike pairs.

    Candidate pairs are disjoint pairs of glyphs of one family (two skin tones
    of one hand, two flags...). The chosen pairs are completed with one glyph
    from each of randomly ordered other families (then, once every family is
    used, with any remaining glyph), and the result is shuffled.
    """
    n = config.instances
    if n > len(glyphs):
        raise MiniIliasError(f"{n} instances asked but the emoji font has only {len(glyphs)} usable glyphs")
    wanted = 0
    if config.hard_negative_fraction > 0 and n >= 2:
        wanted = min(n // 2, max(1, int(config.hard_negative_fraction * n / 2 + 0.5)))
    candidates: list[tuple[Glyph, Glyph]] = []
    for members in group_families(glyphs):
        order = rng.permutation(len(members))
        candidates += [(members[order[i]], members[order[i + 1]]) for i in range(0, len(members) - 1, 2)]
    pairs = [candidates[i] for i in rng.permutation(len(candidates))[:wanted]]
    if len(pairs) < wanted:
        logger.warning(f"only {len(pairs)} look-alike pairs available, {wanted} wanted")
    chosen = [g for pair in pairs for g in pair]
    taken = {g.gid for g in chosen}
    families = group_families([g for g in glyphs if g.gid not in taken])
    for k in rng.permutation(len(families)):
        if len(chosen) >= n:
            break
        members = families[k]
        chosen.append(members[int(rng.integers(len(members)))])
    taken = {g.gid for g in chosen}
    rest = [g for g in glyphs if g.gid not in taken]
    chosen += [rest[i] for i in rng.permutation(len(rest))[: n - len(chosen)]]
    return [chosen[i] for i in rng.permutation(len(chosen))]


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class SourceFile:
    """One file taken from a registry package."""

    package: str  # Debian or PyPI package name
    version: str
    file: str  # path inside the package
    path: Path  # where it lies in the asset cache (not written out)
    role: str  # "objects" or "photos"


def _debian_version(root: Path, package: str) -> str:
    changelog = root / "usr/share/doc" / package / "changelog.Debian.gz"
    try:
        with gzip.open(changelog, "rt", encoding="utf-8") as handle:
            match = re.search(r"\(([^)]+)\)", handle.readline())
        return match.group(1) if match else "unknown"
    except OSError:
        return "unknown"


def _package_root(kind: str, package: str) -> tuple[Path, str]:
    if kind == "deb":
        root = debian_package(package)
        return root, _debian_version(root, package)
    return pip_package(package), package.split("==", 1)[1]


def font_source() -> SourceFile:
    """The emoji font (fails with :class:`MiniIliasError` if it cannot be fetched)."""
    try:
        root, version = _package_root("deb", FONT_PACKAGE)
    except AssetError as err:
        raise MiniIliasError(f"no emoji font, so no objects: {err}") from None
    path = root / FONT_FILE
    if not path.is_file():
        raise MiniIliasError(f"{FONT_PACKAGE} {version} has no {FONT_FILE}")
    return SourceFile(FONT_PACKAGE, version, FONT_FILE, path, "objects")


def photo_sources() -> list[SourceFile]:
    """Every usable photograph of every photo package, sorted; a package that fails is skipped.

    Raises :class:`MiniIliasError` if no package gives a photo.
    """
    found: list[SourceFile] = []
    for kind, package, folder, names in PHOTO_SETS:
        try:
            root, version = _package_root(kind, package)
        except (AssetError, OSError, subprocess.CalledProcessError) as err:
            logger.warning(f"photo source {package} skipped: {err}")
            continue
        base = root / folder
        paths = [base / n for n in names] if names is not None else sorted(base.glob("*.jpg"))
        kept = 0
        for path in paths:
            if not path.is_file():
                logger.warning(f"{package}: {path.name} missing, skipped")
                continue
            with Image.open(path) as im:
                if min(im.size) < MIN_PHOTO_SIDE:
                    continue
            name = package.split("==", 1)[0]
            found.append(SourceFile(name, version, f"{folder}/{path.name}", path, "photos"))
            kept += 1
        if kept == 0:
            logger.warning(f"photo source {package} gave no photo")
    if not found:
        raise MiniIliasError("no background photo source could be fetched (opencv-doc, mate-backgrounds, "
                             "scikit-image); check apt-get and pip access to the package registries")
    return sorted(found, key=lambda s: (s.package, s.file))


def object_photo_sources() -> list[SourceFile]:
    """The photo family's object photos (photo_objects.OBJECT_PHOTO_SETS), sorted; a package that fails is skipped.

    Raises :class:`MiniIliasError` if none can be fetched.
    """
    requirements = {"scikit-image": SKIMAGE_REQUIREMENT}
    found: list[SourceFile] = []
    for kind, package, folder, names in photo_objects.OBJECT_PHOTO_SETS:
        try:
            root, version = _package_root(kind, requirements.get(package, package))
        except (AssetError, OSError, subprocess.CalledProcessError) as err:
            logger.warning(f"object photo source {package} skipped: {err}")
            continue
        for name in names:
            if not (root / folder / name).is_file():
                logger.warning(f"{package}: {name} missing, skipped")
                continue
            found.append(SourceFile(package, version, f"{folder}/{name}", root / folder / name, "objects"))
    if not found:
        raise MiniIliasError("no object photo could be fetched (opencv-doc, scikit-image); check apt-get and "
                             "pip access to the package registries")
    return sorted(found, key=lambda s: (s.package, s.file))


def photo_catalogue(sources: Sequence[SourceFile]) -> list[list[PhotoRegion]]:
    """The candidate regions of every object photo (photo_objects.photo_cells), one list per photo."""
    catalogue = []
    for source in sources:
        name = Path(source.file).name
        cells = photo_objects.photo_cells(_object_photo(source.path), texture=name in photo_objects.TEXTURES)
        catalogue.append([PhotoRegion(source.path, f"{source.package}:{source.file}", cell, r, c)
                          for r, c, cell in cells])
    return catalogue


@lru_cache(maxsize=None)
def _object_photo(path: Path) -> Image.Image:
    """An object photo as RGB at its own resolution (cached per process)."""
    return photo_objects.load_object_photo(path)


@lru_cache(maxsize=None)
def _photo(path: Path) -> Image.Image:
    """A photo as RGB, its longer side at most :data:`MAX_PHOTO_SIDE` (cached per process)."""
    with Image.open(path) as im:
        if im.format == "JPEG" and max(im.size) >= 2 * MAX_PHOTO_SIDE:
            im.draft("RGB", (im.width // 2, im.height // 2))
        rgb = im.convert("RGB")
    if max(rgb.size) > MAX_PHOTO_SIDE:
        scale = MAX_PHOTO_SIDE / max(rgb.size)
        rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.Resampling.LANCZOS)
    return rgb


# --------------------------------------------------------------------------- drawing


def _loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _perspective_coeffs(dst: np.ndarray, src: np.ndarray) -> tuple[float, ...]:
    """PIL PERSPECTIVE data mapping output points ``dst`` to input points ``src`` (4 x 2 each)."""
    a = np.zeros((8, 8))
    b = np.zeros(8)
    for i, ((x, y), (u, v)) in enumerate(zip(dst, src)):
        a[2 * i] = [x, y, 1, 0, 0, 0, -u * x, -u * y]
        a[2 * i + 1] = [0, 0, 0, x, y, 1, -v * x, -v * y]
        b[2 * i], b[2 * i + 1] = u, v
    return tuple(float(c) for c in np.linalg.solve(a, b))


def _mask_bbox(alpha: Image.Image) -> Optional[tuple[int, int, int, int]]:
    """(left, top, right, bottom) of the pixels of an "L" image above the box threshold."""
    threshold = TRANSFORMS["alpha_threshold"]
    return alpha.point(lambda a: 255 if a > threshold else 0).getbbox()


def _tight(image: Image.Image) -> Image.Image:
    """Crop an RGBA image to its pixels with alpha above the box threshold."""
    box = _mask_bbox(image.getchannel("A"))
    if box is None:
        raise MiniIliasError("an object vanished while being drawn")
    return image.crop(box)


def _recolour(image: Image.Image, rng: np.random.Generator, ranges: dict[str, Any]) -> Image.Image:
    """Brightness, contrast, saturation and a hue rotation (in YIQ space) of an RGBA image."""
    brightness = rng.uniform(*ranges["brightness"])
    contrast = rng.uniform(*ranges["contrast"])
    saturation = rng.uniform(*ranges["saturation"])
    hue = math.radians(rng.uniform(-ranges["hue_deg"], ranges["hue_deg"]))
    to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    c, s = math.cos(hue), math.sin(hue)
    turn = np.array([[1, 0, 0], [0, c * saturation, -s * saturation], [0, s * saturation, c * saturation]])
    matrix = np.linalg.inv(to_yiq) @ turn @ to_yiq
    pixels = np.asarray(image, dtype=np.float32)
    rgb, alpha = pixels[..., :3] / 255.0, pixels[..., 3:]
    rgb = rgb @ matrix.T.astype(np.float32)
    weights = alpha[..., 0] > 127
    mean = float(rgb[weights].mean()) if weights.any() else 0.5
    rgb = ((rgb - mean) * contrast + mean) * brightness
    out = np.concatenate([np.clip(rgb * 255.0 + 0.5, 0, 255), alpha], axis=-1).astype(np.uint8)
    return Image.fromarray(out, "RGBA")


def _warp(source: Image.Image, rng: np.random.Generator, *, target_px: float, rotation: float,
          perspective: float, aspect: float, blur: float = 0.0) -> Image.Image:
    """Rotate, scale and perspective-warp an RGBA sprite so its box covers about ``target_px`` pixels.

    Returns the warped sprite cropped to its box (alpha above the threshold).
    Resampling works on premultiplied alpha, so edges take no colour from
    transparent pixels.
    """
    angle = math.radians(rng.uniform(-rotation, rotation))
    ratio = _loguniform(rng, 1.0 / aspect, aspect)
    jitter = rng.uniform(-perspective, perspective, size=(4, 2))
    w, h = source.size
    corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
    centred = (corners - [w / 2, h / 2]) * [math.sqrt(ratio), 1 / math.sqrt(ratio)]
    turn = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    unit = centred @ turn.T + jitter * max(w, h)  # destination corners at scale 1

    def draw(src: Image.Image, src_corners: np.ndarray, scale: float, pad: int) -> Image.Image:
        dst = unit * scale
        dst = dst - dst.min(0) + pad
        size = tuple(int(v) for v in np.ceil(dst.max(0) + pad))
        coeffs = _perspective_coeffs(dst, src_corners)
        return src.transform(size, Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BICUBIC)

    # The box of the warped object (not of the warped rectangle) sets the scale;
    # measure it on a small copy of the alpha mask.
    little = min(1.0, 64 / max(w, h))
    small = (max(1, round(w * little)), max(1, round(h * little)))
    probe = draw(source.getchannel("A").resize(small, Image.Resampling.BILINEAR),
                 corners * [small[0] / w, small[1] / h], little, 2)
    probe_box = _mask_bbox(probe)
    unit_area = w * h
    if probe_box:
        unit_area = max(1.0, (probe_box[2] - probe_box[0]) * (probe_box[3] - probe_box[1])) / little ** 2
    scale = math.sqrt(target_px / unit_area)
    src = source.convert("RGBa")
    src_corners = corners
    if scale < 0.8:  # minify with a proper filter first, then warp at about unit scale
        small = (max(1, round(w * scale)), max(1, round(h * scale)))
        src = src.resize(small, Image.Resampling.LANCZOS)
        src_corners = corners * [small[0] / w, small[1] / h]
    pad = 2 + int(math.ceil(3 * blur))
    out = draw(src, src_corners, scale, pad)
    if blur > 0:
        out = out.filter(ImageFilter.GaussianBlur(blur))
    return _tight(out.convert("RGBA"))


def _fit_area(sprite: Image.Image, canvas: tuple[int, int], lo: float, hi: float) -> Image.Image:
    """Rescale a sprite whose box area fraction fell outside [lo, hi], or that exceeds the canvas."""
    area = sprite.width * sprite.height / (canvas[0] * canvas[1])
    factor = 1.0
    if area > hi:
        factor = math.sqrt(hi / area) * 0.99
    elif area < lo:
        factor = math.sqrt(lo / area) * 1.01
    factor = min(factor, 0.98 * canvas[0] / sprite.width, 0.98 * canvas[1] / sprite.height)
    if abs(factor - 1.0) < 1e-9:
        return sprite
    size = (max(1, round(sprite.width * factor)), max(1, round(sprite.height * factor)))
    return _tight(sprite.convert("RGBa").resize(size, Image.Resampling.LANCZOS).convert("RGBA"))


def _paste(canvas: Image.Image, sprite: Image.Image, xy: tuple[int, int]) -> None:
    canvas.paste(sprite.convert("RGB"), xy, sprite.getchannel("A"))


def _photo_crop(rng: np.random.Generator, photo: Image.Image, size: tuple[int, int],
                crop_scale: Sequence[float], flip_p: float) -> Image.Image:
    """A random crop of ``photo`` with the aspect of ``size``, resized to ``size``, maybe mirrored."""
    pw, ph = photo.size
    aspect = size[0] / size[1]
    max_w = min(pw, ph * aspect)
    area = rng.uniform(*crop_scale)
    cw = max(8.0, max_w * math.sqrt(area))
    ch = cw / aspect
    x0 = rng.uniform(0, pw - cw)
    y0 = rng.uniform(0, ph - ch)
    out = photo.resize(size, Image.Resampling.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch), reducing_gap=3.0)
    if rng.random() < flip_p:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def _uniform_background(rng: np.random.Generator, size: tuple[int, int], ranges: dict[str, Any]) -> Image.Image:
    """A solid colour or a gentle linear gradient between two close colours."""
    hue, sat, val = rng.uniform(0, 1), rng.uniform(*ranges["bg_saturation"]), rng.uniform(*ranges["bg_value"])
    first = np.array(colorsys.hsv_to_rgb(hue, sat, val))
    if rng.random() >= ranges["gradient_p"]:
        return Image.new("RGB", size, tuple(int(round(c * 255)) for c in first))
    delta = ranges["gradient_value_delta"]
    second = np.clip(first + rng.uniform(-delta, delta) + rng.uniform(-delta / 4, delta / 4, size=3), 0, 1)
    angle = rng.uniform(0, 2 * math.pi)
    xs, ys = np.meshgrid(np.linspace(-0.5, 0.5, size[0]), np.linspace(-0.5, 0.5, size[1]))
    t = np.clip(0.5 + xs * math.cos(angle) + ys * math.sin(angle), 0, 1)[..., None]
    pixels = (first * (1 - t) + second * t) * 255 + 0.5
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class _Plan:
    """What the worker processes need to draw any image (picklable)."""

    config: MiniIliasConfig
    font_path: Optional[Path]  # None without emoji
    photos: tuple[SourceFile, ...]  # backgrounds and photo patches
    instances: tuple[Glyph | PhotoRegion, ...]
    clutter: tuple[tuple[Glyph, ...], ...]  # families of glyphs that are no instance
    decoys: tuple[tuple[Glyph, ...], ...]  # the non-instances of the instances' families
    out: Path
    spare_cells: tuple[tuple[PhotoRegion, ...], ...] = ()  # per object photo, its cells that are no instance
    decoy_cells: tuple[tuple[PhotoRegion, ...], ...] = ()  # those of the photos an instance comes from


_PLAN: Optional[_Plan] = None


@lru_cache(maxsize=1)
def _font(path: Path) -> EmojiFont:
    return EmojiFont(path)


@lru_cache(maxsize=512)
def _glyph_image(path: Path, gid: int) -> Image.Image:
    return _tight(_font(path).image(gid))


def _rng(config: MiniIliasConfig, kind: str, i: int, j: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(_KIND_CODE[kind], i, j)))


def _random_photo(rng: np.random.Generator, plan: _Plan) -> tuple[SourceFile, Image.Image]:
    source = plan.photos[int(rng.integers(len(plan.photos)))]
    return source, _photo(source.path)


def _photo_patch(rng: np.random.Generator, plan: _Plan, target_px: float) -> Image.Image:
    """A rectangular or elliptic piece of a photo, as an RGBA source sprite."""
    _, photo = _random_photo(rng, plan)
    ranges = TRANSFORMS["photo_patch"]
    aspect = _loguniform(rng, *ranges["aspect"])
    side = math.sqrt(target_px)
    size = (max(8, round(side * math.sqrt(aspect))), max(8, round(side / math.sqrt(aspect))))
    patch = _photo_crop(rng, photo, size, ranges["crop_scale"], ranges["flip_p"]).convert("RGBA")
    if rng.random() < ranges["ellipse_p"]:
        mask = np.zeros((size[1], size[0]), dtype=np.uint8)
        yy, xx = np.mgrid[0:size[1], 0:size[0]]
        inside = ((xx + 0.5 - size[0] / 2) / (size[0] / 2)) ** 2 + ((yy + 0.5 - size[1] / 2) / (size[1] / 2)) ** 2 <= 1
        mask[inside] = 255
        patch.putalpha(Image.fromarray(mask, "L"))
    return patch


def _clutter_sprite(rng: np.random.Generator, plan: _Plan, target_px: float,
                    emoji: bool) -> tuple[Image.Image, Optional[int]]:
    """A non-instance emoji (warped, recoloured) or a photo patch; returns it and the glyph id (or None)."""
    ranges = TRANSFORMS["positive"]
    if emoji and plan.clutter:
        glyph = _pick(rng, plan.clutter)
        sprite = _warp(_glyph_image(plan.font_path, glyph.gid), rng, target_px=target_px,
                       rotation=ranges["rotation_deg"], perspective=ranges["perspective"], aspect=ranges["aspect"])
        return _recolour(sprite, rng, ranges), glyph.gid
    patch = TRANSFORMS["photo_patch"]
    sprite = _warp(_photo_patch(rng, plan, target_px), rng, target_px=target_px, rotation=patch["rotation_deg"],
                   perspective=patch["perspective"], aspect=patch["scale_aspect"])
    return sprite, None


def _add_clutter(rng: np.random.Generator, plan: _Plan, canvas: Image.Image, n_emoji: int,
                 n_photo: int) -> list[int]:
    """Paste emoji and photo patches anywhere (up to a third outside); returns the glyph ids used."""
    kinds = [True] * n_emoji + [False] * n_photo
    used = []
    for k in rng.permutation(len(kinds)):
        target = _loguniform(rng, *TRANSFORMS["positive"]["clutter_area"]) * canvas.width * canvas.height
        sprite, gid = _clutter_sprite(rng, plan, target, kinds[k])
        x = int(rng.integers(-sprite.width // 3, max(1 - sprite.width // 3, canvas.width - 2 * sprite.width // 3)))
        y = int(rng.integers(-sprite.height // 3, max(1 - sprite.height // 3, canvas.height - 2 * sprite.height // 3)))
        _paste(canvas, sprite, (x, y))
        if gid is not None:
            used.append(gid)
    return used


def _object_sprite(rng: np.random.Generator, plan: _Plan, glyph: Glyph,
                   size: tuple[int, int]) -> tuple[Image.Image, dict]:
    """An instance (or decoy) drawn as in a positive: warped, recoloured, maybe blurred."""
    cfg, ranges = plan.config, TRANSFORMS["positive"]
    lo, hi = cfg.min_area, cfg.max_area
    target = _loguniform(rng, lo * 1.05, hi * 0.95) * size[0] * size[1]
    blur = rng.uniform(*ranges["object_blur_radius"]) if rng.random() < ranges["object_blur_p"] else 0.0
    sprite = _warp(_glyph_image(plan.font_path, glyph.gid), rng, target_px=target, rotation=ranges["rotation_deg"],
                   perspective=ranges["perspective"], aspect=ranges["aspect"], blur=blur)
    sprite = _fit_area(_recolour(sprite, rng, ranges), size, lo, hi)
    return sprite, {"blur": round(blur, 3)}


def _occlude(rng: np.random.Generator, plan: _Plan, canvas: Image.Image, sprite: Image.Image,
             xy: tuple[int, int], ranges: Optional[dict[str, Any]] = None) -> tuple[float, Optional[int]]:
    """Paste an emoji or photo patch over part of the object.

    Returns the share of the object's opaque pixels it hides (0 when no try
    of 12 hid a share within the range) and the occluding glyph id, if any.
    ``ranges``: occlusion ranges (default TRANSFORMS["positive"]).
    """
    ranges = TRANSFORMS["positive"] if ranges is None else ranges
    lo, hi = ranges["occlusion_cover"]
    obj = np.asarray(sprite.getchannel("A")) > TRANSFORMS["alpha_threshold"]
    total = max(int(obj.sum()), 1)
    for _ in range(12):
        target = rng.uniform(*ranges["occluder_area"]) * sprite.width * sprite.height
        occ, gid = _clutter_sprite(rng, plan, target, rng.random() < ranges["occluder_emoji_p"])
        ox = xy[0] + int(rng.integers(-occ.width + 1, sprite.width))
        oy = xy[1] + int(rng.integers(-occ.height + 1, sprite.height))
        x0, y0 = max(ox, xy[0]), max(oy, xy[1])
        x1, y1 = min(ox + occ.width, xy[0] + sprite.width), min(oy + occ.height, xy[1] + sprite.height)
        if x1 <= x0 or y1 <= y0:
            continue
        occ_a = np.asarray(occ.getchannel("A"))[y0 - oy:y1 - oy, x0 - ox:x1 - ox] > TRANSFORMS["alpha_threshold"]
        cover = float((obj[y0 - xy[1]:y1 - xy[1], x0 - xy[0]:x1 - xy[0]] & occ_a).sum() / total)
        if lo <= cover <= hi:
            _paste(canvas, occ, (ox, oy))
            return round(cover, 4), gid
    return 0.0, None


def _boxes_overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int], gap: int = 4) -> bool:
    return not (a[0] + a[2] + gap <= b[0] or b[0] + b[2] + gap <= a[0]
                or a[1] + a[3] + gap <= b[1] or b[1] + b[3] + gap <= a[1])


def _draw_scene(rng: np.random.Generator, plan: _Plan, glyph: Optional[Glyph], copies: int,
                counts: dict[str, Any]) -> tuple[Image.Image, list[tuple[int, int, int, int]], dict]:
    """Photo background, clutter behind, then ``copies`` of ``glyph`` (maybe occluded) on top.

    ``counts`` gives the ranges of the numbers of clutter emoji and photo patches.
    """
    ranges = TRANSFORMS["positive"]
    size = (int(rng.integers(ranges["side_px"][0], ranges["side_px"][1] + 1)),
            int(rng.integers(ranges["side_px"][0], ranges["side_px"][1] + 1)))
    source, photo = _random_photo(rng, plan)
    canvas = _photo_crop(rng, photo, size, ranges["crop_scale"], ranges["flip_p"])
    n_emoji = int(rng.integers(counts["clutter_emoji"][0], counts["clutter_emoji"][1] + 1))
    n_photo = int(rng.integers(counts["clutter_photo"][0], counts["clutter_photo"][1] + 1))
    clutter = _add_clutter(rng, plan, canvas, n_emoji, n_photo)
    boxes: list[tuple[int, int, int, int]] = []
    objects = []
    for _ in range(copies if glyph is not None else 0):
        sprite, info = _object_sprite(rng, plan, glyph, size)
        for _ in range(30):
            xy = (int(rng.integers(0, size[0] - sprite.width + 1)), int(rng.integers(0, size[1] - sprite.height + 1)))
            box = (xy[0], xy[1], sprite.width, sprite.height)
            if not any(_boxes_overlap(box, other) for other in boxes):
                break
        else:
            continue  # no free room for another copy
        _paste(canvas, sprite, xy)
        info["occluded"] = 0.0
        if rng.random() < ranges["occlusion_p"]:
            info["occluded"], gid = _occlude(rng, plan, canvas, sprite, xy)
            if gid is not None:
                clutter.append(gid)
        info["area"] = round(sprite.width * sprite.height / (size[0] * size[1]), 5)
        boxes.append(box)
        objects.append(info)
    image_blur = rng.uniform(*ranges["image_blur_radius"]) if rng.random() < ranges["image_blur_p"] else 0.0
    if image_blur:
        canvas = canvas.filter(ImageFilter.GaussianBlur(image_blur))
    meta = {"background": f"{source.package}:{Path(source.file).name}", "objects": objects,
            "clutter_glyphs": clutter, "image_blur": round(image_blur, 3)}
    return canvas, boxes, meta


def _draw_query(rng: np.random.Generator, plan: _Plan, glyph: Glyph) -> tuple[Image.Image, list, dict]:
    ranges = TRANSFORMS["query"]
    size = (int(rng.integers(ranges["side_px"][0], ranges["side_px"][1] + 1)),
            int(rng.integers(ranges["side_px"][0], ranges["side_px"][1] + 1)))
    canvas = _uniform_background(rng, size, ranges)
    target = rng.uniform(*ranges["area"]) * size[0] * size[1]
    sprite = _warp(_glyph_image(plan.font_path, glyph.gid), rng, target_px=target, rotation=ranges["rotation_deg"],
                   perspective=ranges["perspective"], aspect=ranges["aspect"])
    sprite = _fit_area(sprite, size, *ranges["area"])
    xy = (int(rng.integers(0, size[0] - sprite.width + 1)), int(rng.integers(0, size[1] - sprite.height + 1)))
    _paste(canvas, sprite, xy)
    box = (xy[0], xy[1], sprite.width, sprite.height)
    return canvas, [box], {"objects": [{"area": round(box[2] * box[3] / (size[0] * size[1]), 5)}]}


# --------------------------------------------------------------------------- photo family


def _picture(rng: np.random.Generator, region: PhotoRegion, rect: tuple[int, int, int, int],
             canvas: tuple[int, int], area: float, ranges: dict[str, Any], recolour: bool,
             blur: float = 0.0) -> tuple[Image.Image, np.ndarray]:
    """The picture ``rect`` of ``region``'s photo, seen in perspective, its box about ``area`` of ``canvas``.

    The view (yaw, pitch, roll) is drawn from ``ranges``; ``recolour`` applies
    ``ranges``' colour jitter first; ``blur`` is a Gaussian radius. Returns the
    RGBA sprite (alpha: the warped rectangle) and its four corners in sprite
    pixels (top-left, top-right, bottom-right, bottom-left of the picture).
    """
    source = _object_photo(region.path).crop(rect).convert("RGBA")
    if recolour:
        source = _recolour(source, rng, ranges)
    w, h = source.size
    unit = photo_objects.plane_view(w, h, rng.uniform(-ranges["yaw_deg"], ranges["yaw_deg"]),
                                    rng.uniform(-ranges["pitch_deg"], ranges["pitch_deg"]),
                                    rng.uniform(-ranges["roll_deg"], ranges["roll_deg"]),
                                    focal=ranges.get("focal", 2.0))
    span = unit.max(0) - unit.min(0)
    scale = math.sqrt(area * canvas[0] * canvas[1] / float(span[0] * span[1]))
    scale = min(scale, 0.98 * canvas[0] / float(span[0]), 0.98 * canvas[1] / float(span[1]))
    src = source.convert("RGBa")  # premultiplied: edges take no colour from outside
    src_corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float64)
    if scale < 0.8:  # minify with a proper filter first, then warp at about unit scale
        small = (max(1, round(w * scale)), max(1, round(h * scale)))
        src = src.resize(small, Image.Resampling.LANCZOS)
        src_corners = src_corners * [small[0] / w, small[1] / h]
    pad = 2 + int(math.ceil(3 * blur))
    corners = unit * scale
    corners = corners - corners.min(0) + pad
    size = tuple(int(v) for v in np.ceil(corners.max(0) + pad))
    sprite = src.transform(size, Image.Transform.PERSPECTIVE, _perspective_coeffs(corners, src_corners),
                           Image.Resampling.BICUBIC)
    if blur > 0:
        sprite = sprite.filter(ImageFilter.GaussianBlur(blur))
    return sprite.convert("RGBA"), corners


def _place(rng: np.random.Generator, corners: np.ndarray, canvas: tuple[int, int], cut: float) -> tuple[int, int]:
    """Where to paste a sprite so its corners' box lies in the image, or reaches out by up to ``cut`` of it."""
    low, high = corners.min(0), corners.max(0)
    span = high - low
    xy = []
    for axis in (0, 1):
        first = math.ceil(-low[axis] - cut * span[axis])
        last = math.floor(canvas[axis] - high[axis] + cut * span[axis])
        xy.append(int(rng.integers(first, max(first, last) + 1)))
    return xy[0], xy[1]


def _paste_object(canvas: Image.Image, sprite: Image.Image, xy: tuple[int, int]) -> None:
    """Paste a photo-family object (instance or decoy); a function of its own so tests can watch it."""
    _paste(canvas, sprite, xy)


def _random_rect(rng: np.random.Generator, region: PhotoRegion) -> tuple[int, int, int, int]:
    ranges = PHOTO_TRANSFORMS["region"]
    return photo_objects.sub_rectangle(rng, region.cell, ranges["area"], ranges["aspect"])


def _add_pictures(rng: np.random.Generator, plan: _Plan, canvas: Image.Image, count: int) -> list[str]:
    """Paste ``count`` pictures cut from object-photo cells that are no instance; returns their names."""
    ranges = PHOTO_TRANSFORMS["positive"]
    used = []
    for _ in range(count if plan.spare_cells else 0):
        region = _pick(rng, plan.spare_cells)
        area = _loguniform(rng, *ranges["clutter_area"])
        sprite, corners = _picture(rng, region, _random_rect(rng, region), canvas.size, area, ranges, recolour=True)
        _paste(canvas, sprite, _place(rng, corners, canvas.size, 1 / 3))
        used.append(region.name)
    return used


def _draw_photo_scene(rng: np.random.Generator, plan: _Plan, region: Optional[PhotoRegion], copies: int,
                      counts: dict[str, Any]) -> tuple[Image.Image, list[tuple[int, int, int, int]], dict]:
    """Photo background, photo patches and pictures behind, then ``copies`` of ``region``'s picture on top.

    ``region`` is an instance (its fixed ``rect``) or a decoy cell (a random
    rectangle of it). ``counts`` gives the ranges of the numbers of clutter
    pictures and photo patches.
    """
    base, ranges = TRANSFORMS["positive"], PHOTO_TRANSFORMS["positive"]
    size = (int(rng.integers(base["side_px"][0], base["side_px"][1] + 1)),
            int(rng.integers(base["side_px"][0], base["side_px"][1] + 1)))
    source, photo = _random_photo(rng, plan)
    canvas = _photo_crop(rng, photo, size, base["crop_scale"], base["flip_p"])
    n_pictures = int(rng.integers(counts["clutter_pictures"][0], counts["clutter_pictures"][1] + 1))
    n_photo = int(rng.integers(counts["clutter_photo"][0], counts["clutter_photo"][1] + 1))
    _add_clutter(rng, plan, canvas, 0, n_photo)
    pictures = _add_pictures(rng, plan, canvas, n_pictures)
    cfg = plan.config
    boxes: list[tuple[int, int, int, int]] = []
    objects = []
    for _ in range(copies if region is not None else 0):
        rect = region.rect if region.rect is not None else _random_rect(rng, region)
        area = _loguniform(rng, cfg.min_area * 1.05, cfg.max_area * 0.95)
        blur = rng.uniform(*ranges["object_blur_radius"]) if rng.random() < ranges["object_blur_p"] else 0.0
        sprite, corners = _picture(rng, region, rect, size, area, ranges, recolour=True, blur=blur)
        cut = ranges["frame_cut"] if rng.random() < ranges["frame_cut_p"] else 0.0
        for _ in range(30):
            xy = _place(rng, corners, size, cut)
            box = photo_objects.visible_box(corners + xy, *size)
            if box is not None and not any(_boxes_overlap(box, other) for other in boxes):
                break
        else:
            continue  # no free room for another copy
        _paste_object(canvas, sprite, xy)
        info = {"blur": round(blur, 3), "corners": np.round(corners + xy, 2).tolist(), "occluded": 0.0}
        if rng.random() < ranges["occlusion_p"]:
            info["occluded"], _ = _occlude(rng, plan, canvas, sprite, xy, ranges)
        info["area"] = round(box[2] * box[3] / (size[0] * size[1]), 5)
        boxes.append(box)
        objects.append(info)
    image_blur = rng.uniform(*ranges["image_blur_radius"]) if rng.random() < ranges["image_blur_p"] else 0.0
    if image_blur:
        canvas = canvas.filter(ImageFilter.GaussianBlur(image_blur))
    meta = {"background": f"{source.package}:{Path(source.file).name}", "objects": objects,
            "clutter_pictures": pictures, "image_blur": round(image_blur, 3)}
    return canvas, boxes, meta


def _draw_photo_query(rng: np.random.Generator, region: PhotoRegion) -> tuple[Image.Image, list, dict]:
    base, ranges = TRANSFORMS["query"], PHOTO_TRANSFORMS["query"]
    size = (int(rng.integers(base["side_px"][0], base["side_px"][1] + 1)),
            int(rng.integers(base["side_px"][0], base["side_px"][1] + 1)))
    canvas = _uniform_background(rng, size, base)
    sprite, corners = _picture(rng, region, region.rect, size, rng.uniform(*ranges["area"]), ranges, recolour=False)
    xy = _place(rng, corners, size, 0.0)
    _paste_object(canvas, sprite, xy)
    box = photo_objects.visible_box(corners + xy, *size)
    return canvas, [box], {"objects": [{"area": round(box[2] * box[3] / (size[0] * size[1]), 5),
                                        "corners": np.round(corners + xy, 2).tolist()}]}


def _photo_distractor(i: int, config: MiniIliasConfig) -> bool:
    """Whether distractor ``i`` follows the photo family's recipe (all for photo, every other one for both)."""
    return config.objects == "photo" or (config.objects == "both" and i % 2 == 1)


def _render(task: tuple[str, int, int]) -> tuple[str, dict]:
    """Draw and write one image (and its box file); returns its relative path and metadata."""
    kind, i, j = task
    plan = _PLAN
    assert plan is not None, "worker started without a plan"
    rng = _rng(plan.config, kind, i, j)
    if kind in ("query", "pos") and isinstance(plan.instances[i], PhotoRegion):
        region = plan.instances[i]
        folder = f"ilias_core/{instance_folder(region, i)}"
        if kind == "query":
            image, boxes, meta = _draw_photo_query(rng, region)
            rel = f"{folder}/query/Q{i:03d}_{j:02d}"
        else:
            copies = 2 if rng.random() < PHOTO_TRANSFORMS["positive"]["two_copies_p"] else 1
            image, boxes, meta = _draw_photo_scene(rng, plan, region, copies, PHOTO_TRANSFORMS["positive"])
            rel = f"{folder}/pos/P{i:03d}_{j:02d}"
    elif kind == "distractor" and _photo_distractor(i, plan.config):
        ranges = PHOTO_TRANSFORMS["distractor"]
        decoy = _pick(rng, plan.decoy_cells) if plan.decoy_cells and rng.random() < ranges["decoy_p"] else None
        image, boxes, meta = _draw_photo_scene(rng, plan, decoy, 1, ranges)
        meta["decoy_picture"] = decoy.name if decoy is not None else None
        boxes = []  # distractors are unlabelled
        rel = f"distractors/D{i:06d}"
    elif kind == "query":
        glyph = plan.instances[i]
        image, boxes, meta = _draw_query(rng, plan, glyph)
        rel = f"ilias_core/{instance_folder(glyph, i)}/query/Q{i:03d}_{j:02d}"
    elif kind == "pos":
        glyph = plan.instances[i]
        ranges = TRANSFORMS["positive"]
        copies = 2 if rng.random() < ranges["two_copies_p"] else 1
        image, boxes, meta = _draw_scene(rng, plan, glyph, copies, ranges)
        rel = f"ilias_core/{instance_folder(glyph, i)}/pos/P{i:03d}_{j:02d}"
    else:
        ranges = TRANSFORMS["distractor"]
        decoy = _pick(rng, plan.decoys) if plan.decoys and rng.random() < ranges["decoy_p"] else None
        image, boxes, meta = _draw_scene(rng, plan, decoy, 1, ranges)
        meta["decoy_glyph"] = decoy.gid if decoy is not None else None
        boxes = []  # distractors are unlabelled
        rel = f"distractors/D{i:06d}"
    path = plan.out / f"{rel}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "JPEG", quality=TRANSFORMS["jpeg_quality"])
    if boxes:
        w, h = image.size
        lines = []
        for x, y, bw, bh in boxes:  # clip to the image (a no-op by construction)
            x0, y0 = min(max(x, 0), w - 1), min(max(y, 0), h - 1)
            lines.append(f"{x0} {y0} {min(x + bw, w) - x0} {min(y + bh, h) - y0}\n")
        (plan.out / f"{rel}_bbox.txt").write_text("".join(lines))
    meta["size"] = list(image.size)
    meta["boxes"] = [list(b) for b in boxes]
    return f"{rel}.jpg", meta


def _init_worker(plan: Optional[_Plan]) -> None:
    global _PLAN
    _PLAN = plan


def instance_folder(glyph: Glyph | PhotoRegion, index: int) -> str:
    """Folder name of instance ``index``: the glyph's (or picture's) name plus the index, e.g. ``dog_face_003``."""
    return f"{glyph.name}_{index:03d}"


# --------------------------------------------------------------------------- writing


def _existing(out: Path, config: MiniIliasConfig) -> Optional[dict]:
    """GENERATED.json of a complete data set with the same parameters, None if ``out`` is free."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise MiniIliasError(f"{out} exists and is not a folder")
    marker = out / "GENERATED.json"
    if marker.is_file():
        try:
            done = json.loads(marker.read_text())
        except ValueError as err:
            raise MiniIliasError(f"{marker} is unreadable ({err}); delete {out} to regenerate") from None
        wanted = {"version": GENERATOR_VERSION, **asdict(config)}
        found = {"version": done.get("version"), "objects": "emoji", **done.get("parameters", {})}
        if found == wanted:
            return done
        diff = ", ".join(f"{k}={found.get(k)!r} (asked {v!r})" for k, v in wanted.items() if found.get(k) != v)
        raise MiniIliasError(f"{out} holds a mini-ILIAS generated with other parameters: {diff}; "
                             "choose another --out (dataset.root) or delete it")
    if any(out.iterdir()):
        raise MiniIliasError(f"{out} is not empty and holds no GENERATED.json; refusing to write into it")
    return None


def generate(out: Path, config: MiniIliasConfig = MiniIliasConfig(), workers: int = 1) -> dict:
    """Generate a mini-ILIAS under ``out`` and return the content of its GENERATED.json.

    Returns at once if ``out`` already holds a complete data set made with the
    same parameters; raises :class:`MiniIliasError` if it holds anything else.
    The data set is drawn in a sibling folder ``<out>.partial-*`` that is
    renamed to ``out`` once GENERATED.json (written last) is in place, so an
    interrupted run leaves no half data set at ``out``. ``workers`` > 1 draws
    images in that many processes; the files are identical for any value.
    """
    config.validate()
    out = Path(out)
    done = _existing(out, config)
    if done is not None:
        logger.debug(f"{out} already holds this mini-ILIAS (seed {config.seed}); nothing to do")
        return done
    started = time.perf_counter()
    n_emoji, n_photo = config.family_counts()
    rng = np.random.default_rng(config.seed)
    font_file = font_source() if n_emoji else None
    photos = photo_sources()
    instances: list[Glyph | PhotoRegion] = []
    clutter: tuple[tuple[Glyph, ...], ...] = ()
    decoys: tuple[tuple[Glyph, ...], ...] = ()
    if font_file is not None:
        font = EmojiFont(font_file.path)
        glyphs = eligible_glyphs(font)
        instances = select_instances(glyphs, replace(config, instances=n_emoji), rng)
        taken = {g.gid for g in instances}
        families = {g.family for g in instances}
        clutter = tuple(group_families([g for g in glyphs if g.gid not in taken]))
        decoys = tuple(f for f in clutter if f[0].family in families)
    object_files: list[SourceFile] = []
    spare_cells: tuple[tuple[PhotoRegion, ...], ...] = ()
    decoy_cells: tuple[tuple[PhotoRegion, ...], ...] = ()
    if config.objects != "emoji":  # no photo that shows an object source may be a background
        photos = [p for p in photos if photo_objects.is_background(Path(p.file).name)]
    if n_photo:
        object_files = object_photo_sources()
        catalogue = photo_catalogue(object_files)
        try:
            regions = photo_objects.select_regions(catalogue, n_photo, rng)
        except ValueError as err:
            raise MiniIliasError(str(err)) from None
        region_ranges = PHOTO_TRANSFORMS["region"]
        pictures = [replace(r, rect=photo_objects.sub_rectangle(rng, r.cell, region_ranges["area"],
                                                                region_ranges["aspect"])) for r in regions]
        chosen = {(r.source, r.row, r.col) for r in regions}
        spare_cells = tuple(tuple(r for r in cells if (r.source, r.row, r.col) not in chosen) for cells in catalogue)
        spare_cells = tuple(cells for cells in spare_cells if cells)
        decoy_cells = tuple(cells for cells in spare_cells if cells[0].family in {r.family for r in regions})
        instances += pictures

    out.parent.mkdir(parents=True, exist_ok=True)
    stale = sorted(p.name for p in out.parent.glob(f"{out.name}.partial-*"))
    if stale:
        logger.warning(f"left-overs of interrupted runs beside {out}: {', '.join(stale)} (safe to delete)")
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.partial-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        plan = _Plan(config, font_file.path if font_file else None, tuple(photos), tuple(instances), clutter,
                     decoys, tmp, spare_cells, decoy_cells)
        tasks = [("query", i, j) for i in range(len(instances)) for j in range(config.queries_per_instance)]
        tasks += [("pos", i, j) for i in range(len(instances)) for j in range(config.positives_per_instance)]
        tasks += [("distractor", i, 0) for i in range(config.distractors)]
        if workers > 1:
            # spawn, not fork: the caller may hold threads (torch, OpenMP) that fork would copy half-way
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                     initargs=(plan,)) as pool:
                results = list(pool.map(_render, tasks, chunksize=max(1, len(tasks) // (8 * workers))))
        else:
            _init_worker(plan)
            results = [_render(task) for task in tasks]
        content = _manifest(config, font_file, photos, object_files, instances, results)
        (tmp / "GENERATED.json").write_text(json.dumps(content, indent=1, sort_keys=True) + "\n")
        try:
            if out.is_dir():
                out.rmdir()  # empty, checked above; fails if someone wrote into it meanwhile
            os.rename(tmp, out)
        except OSError:
            if _existing(out, config) is None:  # not a twin run that finished first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        _init_worker(None)
    counts = content["counts"]
    logger.info(f"mini-ILIAS: {counts['instances']} instances, {counts['queries']} queries, "
                f"{counts['positives']} positives, {counts['distractors']} distractors written to {out} "
                f"in {time.perf_counter() - started:.1f} s")
    return content


def _instance_entry(instance: Glyph | PhotoRegion, index: int, lookalikes: list[str]) -> dict:
    folder = instance_folder(instance, index)
    others = [f for f in lookalikes if f != folder]
    if isinstance(instance, PhotoRegion):
        x0, y0, x1, y1 = instance.rect
        return {"folder": folder, "family": instance.family, "source": instance.source,
                "region": [x0, y0, x1 - x0, y1 - y0], "lookalikes": others}
    return {"folder": folder, "glyph_id": instance.gid, "family": instance.family,
            "codepoints": " ".join(f"U+{cp:04X}" for cp in instance.codepoints), "lookalikes": others}


def _manifest(config: MiniIliasConfig, font_file: Optional[SourceFile], photos: list[SourceFile],
              object_files: list[SourceFile], instances: list[Glyph | PhotoRegion],
              results: list[tuple[str, dict]]) -> dict:
    by_family: dict[str, list[str]] = {}
    for i, instance in enumerate(instances):
        by_family.setdefault(instance.family, []).append(instance_folder(instance, i))
    files = [f for f in [font_file, *photos, *object_files] if f is not None]
    sources = [{"package": s.package, "version": s.version, "file": s.file, "role": s.role,
                "sha256": sha256_of(s.path)} for s in files]
    images = dict(results)
    photo_counts = {}
    if config.objects != "emoji":
        photo_counts = {"object_photos": len(object_files),
                        "photo_instances": sum(isinstance(x, PhotoRegion) for x in instances)}
    return {
        "generator": "patchify.datasets.mini_ilias",
        "version": GENERATOR_VERSION,
        "parameters": config.parameters(),
        "seed": config.seed,
        "transforms": TRANSFORMS if config.objects == "emoji" else {**TRANSFORMS, "photo_objects": PHOTO_TRANSFORMS},
        "libraries": {"numpy": np.__version__, "pillow": PIL.__version__,
                      "unicodedata": unicodedata.unidata_version},
        "sources": sources,
        "counts": {
            "instances": len(instances),
            "queries": sum(1 for k in images if "/query/" in k),
            "positives": sum(1 for k in images if "/pos/" in k),
            "distractors": sum(1 for k in images if k.startswith("distractors/")),
            "boxes": sum(len(m["boxes"]) for m in images.values()),
            "lookalike_instances": sum(len(v) for v in by_family.values() if len(v) > 1),
            "photos": len(photos),
            **photo_counts,
        },
        "instances": [_instance_entry(x, i, by_family[x.family]) for i, x in enumerate(instances)],
        "images": images,
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: ``python -m patchify.datasets.mini_ilias --out ilias/mini --instances 30 --positives 4 --distractors 60 --seed 0``."""
    defaults = MiniIliasConfig()
    parser = argparse.ArgumentParser(prog="python -m patchify.datasets.mini_ilias", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("ilias/mini"))
    parser.add_argument("--instances", type=int, default=defaults.instances)
    parser.add_argument("--queries", type=int, default=defaults.queries_per_instance, help="queries per instance")
    parser.add_argument("--positives", type=int, default=defaults.positives_per_instance,
                        help="positives per instance")
    parser.add_argument("--distractors", type=int, default=defaults.distractors)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--hard-negatives", type=float, default=defaults.hard_negative_fraction,
                        help="share of instances that come with a look-alike instance")
    parser.add_argument("--min-area", type=float, default=defaults.min_area)
    parser.add_argument("--max-area", type=float, default=defaults.max_area)
    parser.add_argument("--objects", choices=OBJECT_FAMILIES, default=defaults.objects,
                        help="object family: emoji, photo (pictures cut from photos) or both (half each)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes drawing images (does not change the output)")
    args = parser.parse_args(argv)
    config = MiniIliasConfig(instances=args.instances, queries_per_instance=args.queries,
                             positives_per_instance=args.positives, distractors=args.distractors, seed=args.seed,
                             hard_negative_fraction=args.hard_negatives, min_area=args.min_area,
                             max_area=args.max_area, objects=args.objects)
    try:
        generate(args.out, config, workers=args.workers)
    except (MiniIliasError, AssetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
