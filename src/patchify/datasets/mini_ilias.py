"""Generate a *mini-ILIAS*: a small instance-retrieval data set in ILIAS's native layout.

Objects are colour emoji glyphs of Noto Color Emoji (Debian
``fonts-noto-color-emoji``); backgrounds and clutter are real photographs that
registry packages ship (Debian ``opencv-doc`` and ``mate-backgrounds``, the
images bundled in the ``scikit-image`` wheel). Every glyph has a true alpha
mask, so every box is exact. Layout written under ``out``::

    ilias_core/<instance>/query/Q{iii}_{qq}.jpg  + Q{iii}_{qq}_bbox.txt
    ilias_core/<instance>/pos/P{iii}_{pp}.jpg    + P{iii}_{pp}_bbox.txt
    distractors/D{nnnnnn}.jpg
    GENERATED.json

A box file holds one line ``x y w h`` (integer pixels, top-left corner, width,
height) per copy of the object: its full extent, parts hidden by an occluder
included. ``ilias/README.md`` lists every transform and its range; the
numbers live in :data:`TRANSFORMS` below and are copied into GENERATED.json.

Glyphs are read straight from the font's tables (``cmap`` and ``GSUB`` give
each glyph's code point sequence, ``CBLC``/``CBDT`` its PNG bitmap). That is
the very bitmap that ``ImageFont.truetype(font, 109)`` plus
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
import struct
import subprocess
import sys
import tempfile
import time
import unicodedata
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import PIL
from loguru import logger
from PIL import Image, ImageFilter

from ..assets import AssetError, debian_package, pip_package, sha256_of

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

    ``hard_negative_fraction`` is the share of instances that come with a
    look-alike instance among the others (a skin-tone variant, a differently
    coloured heart, another flag...). ``min_area``/``max_area`` bound a
    positive's object box area as a fraction of the image (log-uniform).
    """

    instances: int = 30
    queries_per_instance: int = 1
    positives_per_instance: int = 4
    distractors: int = 60
    seed: int = 0
    hard_negative_fraction: float = 0.3
    min_area: float = 0.02
    max_area: float = 0.30

    def validate(self) -> None:
        """Raise :class:`MiniIliasError` on a value that cannot work."""
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
    """Reads a CBDT colour font (Noto Color Emoji): glyph sequences and bitmaps."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._data = self.path.read_bytes()
        count = struct.unpack_from(">H", self._data, 4)[0]
        self._tables = {}
        for i in range(count):
            tag, _, offset, _ = struct.unpack_from(">4sIII", self._data, 12 + 16 * i)
            self._tables[tag.decode("latin-1")] = offset
        for tag in ("cmap", "GSUB", "CBLC", "CBDT"):
            if tag not in self._tables:
                raise MiniIliasError(f"{self.path.name} has no {tag} table: not a CBDT colour emoji font")
        self._bitmaps = self._read_cblc()
        self.sequences = self._read_sequences()

    def _u16(self, offset: int) -> int:
        return struct.unpack_from(">H", self._data, offset)[0]

    def _read_cmap(self) -> dict[int, int]:
        """Code point -> glyph id, from the format 12 (or 4) subtable."""
        base = self._tables["cmap"]
        mapping: dict[int, int] = {}
        for i in range(self._u16(base + 2)):
            _, _, sub = struct.unpack_from(">HHI", self._data, base + 4 + 8 * i)
            sub += base
            fmt = self._u16(sub)
            if fmt == 12:
                groups = struct.unpack_from(">I", self._data, sub + 12)[0]
                for g in range(groups):
                    start, end, gid = struct.unpack_from(">III", self._data, sub + 16 + 12 * g)
                    for cp in range(start, end + 1):
                        mapping.setdefault(cp, gid + cp - start)
            elif fmt == 4:
                segs = self._u16(sub + 6) // 2
                ends = struct.unpack_from(f">{segs}H", self._data, sub + 14)
                starts = struct.unpack_from(f">{segs}H", self._data, sub + 16 + 2 * segs)
                deltas = struct.unpack_from(f">{segs}h", self._data, sub + 16 + 4 * segs)
                ro_at = sub + 16 + 6 * segs
                for s in range(segs):
                    ro = self._u16(ro_at + 2 * s)
                    for cp in range(starts[s], ends[s] + 1):
                        if cp == 0xFFFF:
                            continue
                        if ro == 0:
                            gid = (cp + deltas[s]) & 0xFFFF
                        else:
                            gid = self._u16(ro_at + 2 * s + ro + 2 * (cp - starts[s]))
                            gid = (gid + deltas[s]) & 0xFFFF if gid else 0
                        if gid:
                            mapping.setdefault(cp, gid)
        return mapping

    def _coverage(self, offset: int) -> list[int]:
        fmt, count = struct.unpack_from(">HH", self._data, offset)
        if fmt == 1:
            return list(struct.unpack_from(f">{count}H", self._data, offset + 4))
        out: list[int] = []
        for i in range(count):
            start, end, _ = struct.unpack_from(">HHH", self._data, offset + 4 + 6 * i)
            out.extend(range(start, end + 1))
        return out

    def _read_ligatures(self) -> list[tuple[int, tuple[int, ...]]]:
        """(ligature glyph, component glyphs) of every GSUB ligature substitution."""
        gsub = self._tables["GSUB"]
        lookups = gsub + self._u16(gsub + 8)
        out = []
        for li in range(self._u16(lookups)):
            lookup = lookups + self._u16(lookups + 2 + 2 * li)
            ltype, _, nsub = struct.unpack_from(">HHH", self._data, lookup)
            for si in range(nsub):
                sub = lookup + self._u16(lookup + 6 + 2 * si)
                stype = ltype
                if stype == 7:  # extension: points at the real subtable
                    _, stype, ext = struct.unpack_from(">HHI", self._data, sub)
                    sub += ext
                if stype != 4:
                    continue
                _, cov, nsets = struct.unpack_from(">HHH", self._data, sub)
                firsts = self._coverage(sub + cov)
                for k in range(nsets):
                    lset = sub + self._u16(sub + 6 + 2 * k)
                    for m in range(self._u16(lset)):
                        lig = lset + self._u16(lset + 2 + 2 * m)
                        glyph, ncomp = struct.unpack_from(">HH", self._data, lig)
                        rest = struct.unpack_from(f">{ncomp - 1}H", self._data, lig + 4)
                        out.append((glyph, (firsts[k],) + rest))
        return out

    def _read_sequences(self) -> dict[int, tuple[int, ...]]:
        """Glyph id -> its canonical code point sequence (glyphs with a bitmap only)."""
        cmap = self._read_cmap()
        reverse: dict[int, int] = {}
        for cp in sorted(cmap):
            reverse.setdefault(cmap[cp], cp)
        options: dict[int, set[tuple[int, ...]]] = {gid: {(cp,)} for gid, cp in reverse.items()}
        for glyph, comps in self._read_ligatures():
            if all(c in reverse for c in comps):
                options.setdefault(glyph, set()).add(tuple(reverse[c] for c in comps))
        return {gid: _canonical_sequence(options[gid]) for gid in sorted(options) if gid in self._bitmaps}

    def _read_cblc(self) -> dict[int, tuple[int, int, int]]:
        """Glyph id -> (image format, offset in the file, length) for the first strike."""
        cblc, cbdt = self._tables["CBLC"], self._tables["CBDT"]
        if struct.unpack_from(">I", self._data, cblc + 4)[0] < 1:
            raise MiniIliasError(f"{self.path.name} has no bitmap strike")
        array, _, nsub = struct.unpack_from(">III", self._data, cblc + 8)
        out: dict[int, tuple[int, int, int]] = {}
        for k in range(nsub):
            first, last, extra = struct.unpack_from(">HHI", self._data, cblc + array + 8 * k)
            head = cblc + array + extra
            ifmt, imfmt, data_at = struct.unpack_from(">HHI", self._data, head)
            if ifmt in (1, 3):
                n = last - first + 2
                offs = struct.unpack_from(f">{n}{'I' if ifmt == 1 else 'H'}", self._data, head + 8)
                pairs = [(first + i, offs[i], offs[i + 1]) for i in range(n - 1)]
            elif ifmt == 4:
                count = struct.unpack_from(">I", self._data, head + 8)[0]
                raw = struct.unpack_from(f">{2 * (count + 1)}H", self._data, head + 12)
                pairs = [(raw[2 * i], raw[2 * i + 1], raw[2 * i + 3]) for i in range(count)]
            else:
                raise MiniIliasError(f"{self.path.name}: CBLC index format {ifmt} is not supported")
            for gid, start, end in pairs:
                if end > start:
                    out[gid] = (imfmt, cbdt + data_at + start, end - start)
        return out

    def image(self, gid: int) -> Image.Image:
        """The glyph's bitmap as RGBA (136 x 128 px for Noto Color Emoji)."""
        fmt, at, _ = self._bitmaps[gid]
        header = {17: 5, 18: 8, 19: 0}.get(fmt)
        if header is None:
            raise MiniIliasError(f"{self.path.name}: CBDT image format {fmt} is not supported")
        length = struct.unpack_from(">I", self._data, at + header)[0]
        png = self._data[at + header + 4: at + header + 4 + length]
        return Image.open(io.BytesIO(png)).convert("RGBA")


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


def _pick(rng: np.random.Generator, groups: Sequence[Sequence[Glyph]]) -> Glyph:
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
    font_path: Path
    photos: tuple[SourceFile, ...]
    instances: tuple[Glyph, ...]
    clutter: tuple[tuple[Glyph, ...], ...]  # families of glyphs that are no instance
    decoys: tuple[tuple[Glyph, ...], ...]  # the non-instances of the instances' families
    out: Path


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
             xy: tuple[int, int]) -> tuple[float, Optional[int]]:
    """Paste an emoji or photo patch over part of the object.

    Returns the share of the object's opaque pixels it hides (0 when no try
    of 12 hid a share within the range) and the occluding glyph id, if any.
    """
    ranges = TRANSFORMS["positive"]
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


def _render(task: tuple[str, int, int]) -> tuple[str, dict]:
    """Draw and write one image (and its box file); returns its relative path and metadata."""
    kind, i, j = task
    plan = _PLAN
    assert plan is not None, "worker started without a plan"
    rng = _rng(plan.config, kind, i, j)
    if kind == "query":
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


def instance_folder(glyph: Glyph, index: int) -> str:
    """Folder name of instance ``index``: the glyph's name plus the index, e.g. ``dog_face_003``."""
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
        found = {"version": done.get("version"), **done.get("parameters", {})}
        if found == wanted:
            return done
        diff = ", ".join(f"{k}={found.get(k)!r} (asked {v!r})" for k, v in wanted.items() if found.get(k) != v)
        raise MiniIliasError(f"{out} holds a mini-ILIAS generated with other parameters: {diff}; "
                             "choose another --out or delete it")
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
        logger.info(f"{out} already holds this mini-ILIAS (seed {config.seed}); nothing to do")
        return done
    started = time.perf_counter()
    font_file = font_source()
    photos = photo_sources()
    font = EmojiFont(font_file.path)
    glyphs = eligible_glyphs(font)
    instances = select_instances(glyphs, config, np.random.default_rng(config.seed))
    taken = {g.gid for g in instances}
    families = {g.family for g in instances}
    clutter = tuple(group_families([g for g in glyphs if g.gid not in taken]))
    decoys = tuple(f for f in clutter if f[0].family in families)

    out.parent.mkdir(parents=True, exist_ok=True)
    stale = sorted(p.name for p in out.parent.glob(f"{out.name}.partial-*"))
    if stale:
        logger.warning(f"left-overs of interrupted runs beside {out}: {', '.join(stale)} (safe to delete)")
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.partial-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)
        plan = _Plan(config, font_file.path, tuple(photos), tuple(instances), clutter, decoys, tmp)
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
        content = _manifest(config, font_file, photos, instances, results)
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


def _manifest(config: MiniIliasConfig, font_file: SourceFile, photos: list[SourceFile],
              instances: list[Glyph], results: list[tuple[str, dict]]) -> dict:
    by_family: dict[str, list[str]] = {}
    for i, glyph in enumerate(instances):
        by_family.setdefault(glyph.family, []).append(instance_folder(glyph, i))
    sources = [{"package": s.package, "version": s.version, "file": s.file, "role": s.role,
                "sha256": sha256_of(s.path)} for s in [font_file, *photos]]
    images = dict(results)
    return {
        "generator": "patchify.datasets.mini_ilias",
        "version": GENERATOR_VERSION,
        "parameters": asdict(config),
        "seed": config.seed,
        "transforms": TRANSFORMS,
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
        },
        "instances": [
            {"folder": instance_folder(g, i), "glyph_id": g.gid, "family": g.family,
             "codepoints": " ".join(f"U+{cp:04X}" for cp in g.codepoints),
             "lookalikes": [f for f in by_family[g.family] if f != instance_folder(g, i)]}
            for i, g in enumerate(instances)
        ],
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
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes drawing images (does not change the output)")
    args = parser.parse_args(argv)
    config = MiniIliasConfig(instances=args.instances, queries_per_instance=args.queries,
                             positives_per_instance=args.positives, distractors=args.distractors, seed=args.seed,
                             hard_negative_fraction=args.hard_negatives, min_area=args.min_area,
                             max_area=args.max_area)
    try:
        generate(args.out, config, workers=args.workers)
    except (MiniIliasError, AssetError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
