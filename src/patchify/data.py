"""Data: image records, ground-truth boxes, the ILIAS layout, manifests, folders.

This module knows files and boxes, never features. Every image is an
``ImageRecord`` whose ``id`` is its path relative to the dataset's image root
(``ilias_core/`` for ILIAS, so an id's first component is its instance, as in
ILIAS's own similarity files). Distractors in WebDataset tar shards are ``"<shard file name>/<key>"``,
ILIAS's ids for them, with the path ``<shard>/<member>`` (src/patchify/tar_images.py). Boxes are
``(x, y, w, h)`` in original pixels, top-left origin.

Manifest schema (``query.json`` / ``gallery.json``; an eval writes the ones it scanned into its
run folder, never into the dataset; ``dataset.pin_manifest=true`` reads them from ``dataset.root``)::

    {"version": 1,
     "images": [{"id": "bold_bimp_000/pos/P000_00.jpg",   # unique, ranked-list id
                 "path": "ilias_core/bold_bimp_000/pos/P000_00.jpg",  # relative to dataset.root
                 "instance": "bold_bimp_000",              # null for distractors/unlabelled
                 "boxes": [[x, y, w, h], ...],             # [] when unannotated
                 "width": 1024, "height": 768}, ...]}

A manifest pins a subset: delete entries to evaluate on fewer images.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterable

import numpy as np
from PIL import Image, ImageOps

from loguru import logger
from omegaconf import DictConfig

from .cache import atomic_write_text
from .settings import ConfigError
from .tar_images import TAR_SUFFIX, image_exists, image_file_size, image_source, samples

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
MANIFEST_VERSION = 1


class DataError(ValueError):
    """Bad input data; the message is one line that names the file."""


class _DataOnly(pickle.Unpickler):
    """Unpickles Python containers, strings, numbers and NumPy arrays, nothing else: a dataset or similarity
    file is data, and ``pickle`` would otherwise run whatever a file names."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("builtins", "set"), ("builtins", "frozenset"),
               ("_codecs", "encode"),  # protocol 2's bytes
               *((f"numpy.{core}.{module}", name) for core in ("core", "_core")
                 for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                                      ("numeric", "_frombuffer")))}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refers to {module}.{name} (a data file holds only containers and NumPy arrays)")


def load_data_pickle(stream: IO[bytes], encoding: str = "ASCII") -> Any:
    """The content of a pickled data file (ground truth, similarities), refusing anything but data.
    ``encoding="latin1"`` reads Python 2 pickles (revisitop's ground truth)."""
    return _DataOnly(stream, encoding=encoding).load()


@dataclass(frozen=True)
class ImageRecord:
    """One image of a query set or gallery."""

    id: str
    path: Path
    instance: str | None = None
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    width: int = 0
    height: int = 0

    @property
    def boxes_array(self) -> np.ndarray:
        return np.asarray(self.boxes, dtype=np.float64).reshape(-1, 4)

    @property
    def object_scale(self) -> float:
        """Largest ground-truth box area over image area (ILIAS scale groups)."""
        if not self.boxes or not self.width or not self.height:
            return float("nan")
        return max(w * h for _, _, w, h in self.boxes) / float(self.width * self.height)


@dataclass(frozen=True)
class QueryTruth:
    """One query's ground truth where a benchmark lists it per query (revisited Oxford/Paris, INSTRE):
    gallery ids of its easy and hard positives and of its junk (taken out of the ranking when scored), and
    the ground-truth boxes (x, y, w, h) of each positive that has some."""

    easy: frozenset[str]
    hard: frozenset[str] = frozenset()
    junk: frozenset[str] = frozenset()
    boxes: dict[str, tuple[tuple[float, float, float, float], ...]] = field(default_factory=dict)

    @property
    def positives(self) -> frozenset[str]:
        return self.easy | self.hard

    def lists(self) -> dict[str, frozenset[str]]:
        return {"easy": self.easy, "hard": self.hard, "junk": self.junk}


@dataclass
class Dataset:
    """Queries and gallery of one evaluation (or a bare gallery).

    ``protocol``: None when a query's positives are the gallery images of its instance (ILIAS, folders);
    ``"revisited"`` or ``"instre"`` when ``truth`` lists them per query id (src/patchify/datasets/benchmarks.py).
    ``no_boxes``: why LocScore cannot be computed (the benchmark's database has no boxes), else None.
    """

    name: str
    root: Path
    queries: list[ImageRecord] = field(default_factory=list)
    gallery: list[ImageRecord] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    protocol: str | None = None
    truth: dict[str, QueryTruth] = field(default_factory=dict)
    no_boxes: str | None = None

    def positives_of(self, instance: str | None) -> dict[str, np.ndarray]:
        """Gallery ids showing ``instance`` -> their ground-truth boxes."""
        return {r.id: r.boxes_array for r in self.gallery if instance and r.instance == instance}

    def positives_for(self, query: ImageRecord) -> dict[str, np.ndarray]:
        """Gallery ids that are positives of ``query`` -> their ground-truth boxes ((0, 4) when none); a
        benchmark's per-query truth (Medium's positives: easy and hard) or the query's instance."""
        if self.protocol is None:
            return self.positives_of(query.instance)
        truth = self.truth[query.id]
        return {i: np.asarray(truth.boxes.get(i, ()), dtype=np.float64).reshape(-1, 4) for i in sorted(truth.positives)}

    def junk_for(self, query: ImageRecord) -> frozenset[str]:
        """Gallery ids taken out of ``query``'s ranking before scoring (a benchmark's junk; none for ILIAS)."""
        return self.truth[query.id].junk if self.protocol is not None else frozenset()


# ----------------------------------------------------------------------------- images

Image.MAX_IMAGE_PIXELS = 178_956_970  # PIL's own default, stated explicitly


def load_image(path: Path) -> Image.Image:
    """Open an image as RGB with EXIF orientation applied; DataError on any failure.

    ``path`` is a file or a member of a tar shard (``<shard>.tar/<member>``, src/patchify/tar_images.py).
    Grayscale, palette, CMYK, 16-bit and alpha images are converted (alpha
    composited on white).
    """
    path = Path(path)
    try:
        if image_file_size(path) == 0:
            raise DataError(f"{path}: empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with image_source(path) as source, Image.open(source) as image:
                image = ImageOps.exif_transpose(image)
                image.load()
    except DataError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise DataError(f"{path}: image too large (decompression-bomb limit: {err})") from None
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except Exception as err:  # PIL raises many types for corrupt data
        raise DataError(f"{path}: unreadable image ({type(err).__name__}: {err})") from None
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        top = array.max() or 1.0
        image = Image.fromarray((array * (255.0 / top)).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, read from the header only (of a file or a tar member)."""
    try:
        with image_source(path) as source, Image.open(source) as image:
            width, height = image.size
            orientation = image.getexif().get(0x0112, 1)
    except Exception as err:
        raise DataError(f"{path}: unreadable image ({type(err).__name__}: {err})") from None
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


# ----------------------------------------------------------------------------- boxes

def read_box_file(path: Path, width: int, height: int) -> tuple[tuple[float, float, float, float], ...]:
    """Parse an ILIAS ``_bbox.txt`` (one ``x y w h`` line per box) and check it.

    A box may touch the border; one that leaves the image by more than a
    pixel, or has a non-positive size, is an error naming file and line.
    """
    boxes = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.replace(",", " ").split()
        try:
            x, y, w, h = (float(p) for p in parts)
        except ValueError:
            raise DataError(f"{path}:{number}: expected 'x y w h', got {line.strip()!r}") from None
        if not all(math.isfinite(v) for v in (x, y, w, h)):
            raise DataError(f"{path}:{number}: box values must be finite numbers, got {line.strip()!r}")
        if w <= 0 or h <= 0:
            raise DataError(f"{path}:{number}: box size must be positive, got w={w:g} h={h:g}")
        if x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
            raise DataError(
                f"{path}:{number}: box ({x:g}, {y:g}, {w:g}, {h:g}) lies outside the {width}x{height} image"
            )
        x0, y0 = max(x, 0.0), max(y, 0.0)
        clipped = (x0, y0, min(x + w, width) - x0, min(y + h, height) - y0)
        if clipped[2] <= 0 or clipped[3] <= 0:
            raise DataError(f"{path}:{number}: box ({x:g}, {y:g}, {w:g}, {h:g}) lies outside the {width}x{height} image")
        boxes.append(clipped)
    if not boxes:
        raise DataError(f"{path}: box file has no 'x y w h' line")
    return tuple(boxes)


# ----------------------------------------------------------------------------- layouts

def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def image_files(root: Path, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> list[Path]:
    """Every file under ``root`` whose name ends in an image extension (or one of ``extensions``), sorted;
    the one folder walker.

    Walks with ``os.walk(followlinks=False)``: a symlinked folder is not entered (so a symlink loop
    cannot hang or repeat the scan, and nothing outside the tree is pulled in), a symlinked file is
    listed and read through its link. Folders are never listed, even when named like an image
    (``album.jpg/``); hidden files and folders (``.*``, including macOS's AppleDouble ``._*``) are
    ignored. A listed file may still be unreadable (text named ``.jpg``, dangling or looping link):
    its reader skips and lists it.
    """
    found = []
    for folder, folders, files in os.walk(root, followlinks=False):
        folders[:] = [name for name in folders if not name.startswith(".")]
        found.extend(Path(folder) / name for name in files
                     if not name.startswith(".") and Path(name).suffix.lower() in extensions)
    return sorted(found)


def _record(path: Path, id_root: Path, instance: str | None, with_boxes: bool) -> ImageRecord:
    width, height = image_size(path)
    boxes = ()
    box_file = path.with_name(path.stem + "_bbox.txt")
    if with_boxes and box_file.exists():
        boxes = read_box_file(box_file, width, height)
    return ImageRecord(
        id=path.relative_to(id_root).as_posix(), path=path, instance=instance,
        boxes=boxes, width=width, height=height,
    )


def read_ilias_layout(
    root: Path, core_dir: str = "ilias_core", distractors: str | None = None
) -> Dataset:
    """Read ILIAS's native layout: ``<root>/<core_dir>/<instance>/{query,pos}/*``.

    ``distractors`` (a folder, relative to ``root`` or absolute) adds its
    images to the gallery unlabelled; their ids are ``"<folder name>/..."``. WebDataset shards
    (``*.tar``) in that folder (or the folder itself being one shard) add the image of each of their
    samples, read in place, with ILIAS's id ``"<shard file name>/<key>"`` (src/patchify/tar_images.py).
    An unreadable distractor (file, member or whole shard) is skipped and listed; an unreadable query
    or positive is an error (it is ground truth).
    """
    root = Path(root)
    core = root / core_dir
    if not core.is_dir():
        raise DataError(f"{core}: dataset folder not found (expected ILIAS layout <root>/{core_dir}/<instance>/query|pos)")
    instances = sorted(p for p in core.iterdir() if p.is_dir())
    if not instances:
        raise DataError(f"{core}: dataset folder is empty (no instance folders)")
    dataset = Dataset(name=root.name, root=root)
    for folder in instances:
        for role, target in (("query", dataset.queries), ("pos", dataset.gallery)):
            sub = folder / role
            if sub.is_dir():
                for path in sorted(filter(_is_image, sub.iterdir())):
                    target.append(_record(path, core, folder.name, with_boxes=True))
    if distractors:
        folder = Path(distractors) if Path(distractors).is_absolute() else root / distractors
        one_shard = folder.is_file() and folder.name.lower().endswith(TAR_SUFFIX)
        if not folder.is_dir() and not one_shard:
            raise DataError(f"{folder}: distractor folder not found")
        for path in [] if one_shard else image_files(folder):  # one unreadable distractor among millions is skipped and listed
            try:
                dataset.gallery.append(_record(path, folder.parent, None, with_boxes=False))
            except DataError as err:
                dataset.skipped.append(str(err))
        shards = [folder] if one_shard else image_files(folder, (TAR_SUFFIX,))
        named: dict[str, Path] = {}
        for shard in shards:
            if shard.name in named:  # ids carry the shard's file name only (as ILIAS's): two would collide
                raise DataError(f"{shard}: a shard of the same name was read from {named[shard.name]} (distractor ids "
                                f"are '<shard file name>/<key>'); rename one")
            named[shard.name] = shard
            _read_shard(shard, dataset)
    if not dataset.queries:
        raise DataError(f"{core}: no query images found under <instance>/query/")
    return dataset


def _read_shard(shard: Path, dataset: Dataset) -> None:
    """Add the image of every sample of a WebDataset shard to ``dataset.gallery`` as an unlabelled record
    ``"<shard file name>/<key>"`` (ILIAS's distractor id); unreadable members and shards go to ``skipped``."""
    try:
        found, problems = samples(shard, [e.lstrip(".") for e in IMAGE_EXTENSIONS])
    except OSError as err:  # TarMemberError included: not an uncompressed tar
        dataset.skipped.append(f"{shard}: unreadable shard ({type(err).__name__}: {err})")
        return
    dataset.skipped.extend(problems)
    for sample in found:
        path = shard / sample.member
        try:
            width, height = image_size(path)
        except DataError as err:
            dataset.skipped.append(str(err))
            continue
        dataset.gallery.append(ImageRecord(id=f"{shard.name}/{sample.key}", path=path, width=width, height=height))


def read_folder(root: Path) -> Dataset:
    """Any folder tree of images as an unlabelled gallery; unreadable files are skipped and listed."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: folder not found")
    dataset = Dataset(name=root.name, root=root)
    for path in image_files(root):
        try:
            dataset.gallery.append(_record(path, root, None, with_boxes=False))
        except DataError as err:
            dataset.skipped.append(str(err))
    if not dataset.gallery:
        raise DataError(f"{root}: no readable images found ({', '.join(IMAGE_EXTENSIONS)})")
    return dataset


def annotation_gaps(dataset: Dataset) -> dict[str, list[str]]:
    """Ground truth that changes scores without an error: ids of positives without a box (LocScore can
    never localise them) and of queries whose instance has no positive in the gallery (AP 0, counted)."""
    if dataset.protocol is not None:  # a benchmark's per-query truth
        truths = [dataset.truth[q.id] for q in dataset.queries]
        boxed = {i for t in truths for i in t.boxes}
        positives = sorted({i for t in truths for i in t.positives})
        return {"positives_without_boxes": [] if dataset.no_boxes else [i for i in positives if i not in boxed],
                "queries_without_positives": [q.id for q, t in zip(dataset.queries, truths) if not t.positives]}
    labelled = {r.instance for r in dataset.gallery if r.instance is not None}
    return {"positives_without_boxes": [r.id for r in dataset.gallery if r.instance is not None and not r.boxes],
            "queries_without_positives": [q.id for q in dataset.queries if q.instance not in labelled]}


# ----------------------------------------------------------------------------- manifests

def write_manifest(path: Path, records: Iterable[ImageRecord], root: Path) -> None:
    """Write records as a manifest (schema in the module docstring), atomically."""
    images = [
        {
            "id": r.id,
            "path": os.path.relpath(r.path, root),
            "instance": r.instance,
            "boxes": [list(b) for b in r.boxes],
            "width": r.width,
            "height": r.height,
        }
        for r in records
    ]
    atomic_write_text(Path(path), json.dumps({"version": MANIFEST_VERSION, "images": images}, indent=1))


def read_manifest(path: Path, root: Path) -> list[ImageRecord]:
    """Read a manifest; paths are resolved against the dataset root."""
    path, root = Path(path), Path(root)
    try:
        content = json.loads(path.read_text())
        entries = content["images"]
        records = [
            ImageRecord(
                id=e["id"], path=root / e["path"], instance=e.get("instance"),
                boxes=tuple(tuple(float(v) for v in b) for b in e.get("boxes", [])),
                width=int(e.get("width", 0)), height=int(e.get("height", 0)),
            )
            for e in entries
        ]
    except FileNotFoundError:
        raise DataError(f"{path}: manifest not found") from None
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a valid manifest ({type(err).__name__}: {err})") from None
    if content.get("version") != MANIFEST_VERSION:
        raise DataError(f"{path}: manifest version {content.get('version')} (expected {MANIFEST_VERSION})")
    missing = [r.path for r in records if not image_exists(r.path)]
    if missing:
        raise DataError(f"{path}: {len(missing)} listed images are missing, first: {missing[0]}")
    return records


# ----------------------------------------------------------------------------- a run's dataset

def load_dataset(cfg: DictConfig, manifests: Path | None = None) -> Dataset:
    """The dataset of ``cfg.dataset``: ILIAS layout (generated first for mini-ILIAS), a folder, or a benchmark
    read from its ground-truth file (revisited Oxford/Paris, INSTRE: src/patchify/datasets/benchmarks.py).

    Nothing is written into the dataset folder (it may be a read-only mount): a scanned ILIAS layout's
    manifests go to ``manifests`` (the run folder) when given; pinned ones are read from ``root``.
    """
    root = Path(cfg.root)
    if cfg.kind == "folder":
        return read_folder(root)
    if cfg.kind in ("revisited", "instre"):  # a benchmark's own ground-truth file: src/patchify/datasets/benchmarks.py
        from .datasets.benchmarks import read_benchmark

        dataset = read_benchmark(cfg)
        for line in dataset.skipped:
            logger.warning(f"skipped distractor {line}")
        warn_annotation_gaps(annotation_gaps(dataset))
        logger.info(f"dataset {cfg.name} ({cfg.kind} protocol): {len(dataset.queries):,} queries, "
                    f"{len(dataset.gallery):,} gallery images")
        return dataset
    if cfg.kind != "ilias":
        raise ConfigError(f"dataset.kind must be 'ilias', 'folder', 'revisited' or 'instre', got {cfg.kind!r}")
    # a root that holds a generated set is checked too: its GENERATED.json must match (else a one-line error,
    # never a silent reuse); a hand-made ILIAS layout (no GENERATED.json) is read as it is
    if cfg.get("generate") and (not (root / cfg.core_dir).is_dir() or (root / "GENERATED.json").is_file()):
        from .datasets.mini_ilias import MiniIliasConfig, generate

        if not (root / cfg.core_dir).is_dir():
            logger.info(f"generating mini-ILIAS into {root} ({dict(cfg.generate)})")
        generate(root, MiniIliasConfig(**cfg.generate))
    suffix = "" if cfg.split == "test" else f"_{cfg.split}"
    query_manifest, gallery_manifest = root / f"query{suffix}.json", root / f"gallery{suffix}.json"
    if cfg.pin_manifest or cfg.split != "test":
        dataset = Dataset(name=cfg.name, root=root, queries=read_manifest(query_manifest, root),
                          gallery=read_manifest(gallery_manifest, root))
        logger.info(f"dataset {cfg.name}: read pinned manifests {query_manifest.name}, {gallery_manifest.name}")
    else:
        dataset = read_ilias_layout(root, cfg.core_dir, cfg.get("distractors"))
        dataset.name = cfg.name
        if manifests is not None:
            write_manifest(Path(manifests) / query_manifest.name, dataset.queries, root)
            write_manifest(Path(manifests) / gallery_manifest.name, dataset.gallery, root)
    if not dataset.gallery:
        raise DataError(f"{root}: the gallery is empty")
    for line in dataset.skipped:
        logger.warning(f"skipped distractor {line}")
    warn_annotation_gaps(annotation_gaps(dataset))
    labelled = sum(r.instance is not None for r in dataset.gallery)
    logger.info(f"dataset {cfg.name}: {len(dataset.queries):,} queries, {len(dataset.gallery):,} gallery images "
                f"({labelled:,} positives, {len(dataset.gallery) - labelled:,} distractors)")
    return dataset


def warn_annotation_gaps(gaps: dict[str, list[str]], shown: int = 3) -> None:
    """One warning line per kind of ground-truth gap, with the count and the first few ids."""
    why = {"positives_without_boxes": "positives have no _bbox.txt (LocScore never counts them as localised)",
           "queries_without_positives": "queries have no positive in the gallery (no <instance>/pos/ images; "
                                        "each scores AP 0)"}
    for kind, ids in gaps.items():
        if ids:
            more = f", ... ({len(ids) - shown} more)" if len(ids) > shown else ""
            logger.warning(f"{len(ids)} {why[kind]}: {', '.join(ids[:shown])}{more}; counted in metrics.json")

