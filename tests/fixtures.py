"""Small ILIAS-layout fixtures that tests build in a temporary folder (no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def _object(rng: np.random.Generator, instance: int, size: int) -> Image.Image:
    """A distinctive synthetic object: coloured rings and bars seeded by the instance."""
    local = np.random.default_rng(1000 + instance)
    image = Image.new("RGB", (size, size), tuple(int(v) for v in local.integers(0, 255, 3)))
    draw = ImageDraw.Draw(image)
    for step in range(6):
        colour = tuple(int(v) for v in local.integers(0, 255, 3))
        inset = step * size // 14
        if local.random() < 0.5:
            draw.ellipse([inset, inset, size - inset, size - inset], outline=colour, width=max(size // 20, 1))
        else:
            x = int(local.integers(0, size))
            draw.rectangle([x, 0, min(x + size // 8, size), size], fill=colour)
    return image


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    noise = rng.integers(0, 255, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    return Image.fromarray(noise).resize((width, height), Image.BILINEAR)


def make_ilias_fixture(root: Path, instances: int = 4, positives: int = 3, distractors: int = 4,
                       seed: int = 0) -> Path:
    """Write ``root/ilias_core/<instance>/{query,pos}`` and ``root/distractors`` with true boxes."""
    rng = np.random.default_rng(seed)
    for i in range(instances):
        folder = root / "ilias_core" / f"thing_{i:03d}"
        (folder / "query").mkdir(parents=True)
        (folder / "pos").mkdir(parents=True)
        query = Image.new("RGB", (200, 160), (240, 240, 240))
        query.paste(_object(rng, i, 120), (40, 20))
        query.save(folder / "query" / f"Q{i:03d}_00.jpg", quality=95)
        (folder / "query" / f"Q{i:03d}_00_bbox.txt").write_text("40 20 120 120\n")
        for p in range(positives):
            width, height = int(rng.integers(300, 420)), int(rng.integers(240, 330))
            image = _background(rng, width, height)
            size = int(rng.integers(60, 100))
            x, y = int(rng.integers(0, width - size)), int(rng.integers(0, height - size))
            image.paste(_object(rng, i, size), (x, y))
            image.save(folder / "pos" / f"P{i:03d}_{p:02d}.jpg", quality=95)
            (folder / "pos" / f"P{i:03d}_{p:02d}_bbox.txt").write_text(f"{x} {y} {size} {size}\n")
    (root / "distractors").mkdir(parents=True)
    for d in range(distractors):
        _background(rng, 320, 240).save(root / "distractors" / f"D{d:06d}.jpg", quality=95)
    return root


def skimage_photos(*names: str) -> list[Image.Image]:
    """Real photos from scikit-image's wheel (a registry package), or skip the test."""
    import pytest
    from patchify.assets import AssetError, pip_package
    from patchify.datasets.mini_ilias import SKIMAGE_REQUIREMENT

    try:
        root = pip_package(SKIMAGE_REQUIREMENT) / "skimage" / "data"
    except AssetError as err:  # pragma: no cover - depends on the registry
        pytest.skip(f"no photos: {err}")
    return [Image.open(root / name).convert("RGB") for name in names]


def random_gallery_patches(images: int, levels: list[int], dim: int, seed: int = 0,
                           unreadable: tuple[int, ...] = ()):
    """Random unit patch vectors laid out as extraction lays them out (level by level, image by image, cells
    row-major), ``unreadable`` images left out (gaps in the ids of a sharded index); zero boxes."""
    from patchify.extraction import PatchFeatures

    rng = np.random.default_rng(seed)
    kept = [i for i in range(images) if i not in unreadable]
    image = np.concatenate([np.repeat(kept, (level + 1) ** 2) for level in levels]).astype(np.int64)
    level = np.concatenate([np.full(len(kept) * (level + 1) ** 2, level) for level in levels]).astype(np.int8)
    vectors = rng.standard_normal((len(image), dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return PatchFeatures(vectors, image, np.zeros((len(image), 4), np.float32), level)
