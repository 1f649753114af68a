"""Search bundle: what task=index leaves for task=search, written and read as one unit.

A bundle folder (``faiss_indices/search/<name>-<key>/``, ``indexing.bundle_folder``) holds::

    current.json                {"format": 2, "build": "build-<id>", "manifest_sha256": "<hex>"}
    build-<id>/index.faiss      the FAISS index (+ index.ivfdata, its inverted lists, when on disk;
                                + index.refine.faiss/.npy, refine quantizer and codes, when sharded and refined)
    build-<id>/gallery/*.npy    gallery ids and paths; per index row its image, box (and id when sharded);
                                one plain .npy per array
    build-<id>/manifest.json    format, every part's size and sha256 (the ivfdata: size only), counts
    .lock                       taken by writers only

The gallery arrays are memory-mapped when read: a search touches the rows of its results only, so a
serving process holds the index, not the gallery table (at 1M L3 images the table is ~1.5 GB: boxes,
each row's image and id, paths). Format 1 kept them in one ``gallery.npz``, read whole.

A build is written whole into a new subfolder of its own; the commit is ONE atomic replace of
``current.json``, and older builds are removed after it. A writer killed at any point so leaves
the previous bundle (or none) in place; its half-written build is never read (no ``current.json``
names it) and is removed by the next successful write. Writers of one bundle take turns (a file
lock); readers take none, and retry when a writer replaced the build they were opening. Reading
checks the manifest against ``current.json`` and every part against the manifest; any
disagreement is a one-line CacheError that says to re-run task=index.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from . import index as faiss_index
from .assets import sha256_of
from .cache import TEMP_NAME, CacheError, atomic_write_text, discard, file_lock, read_at_random, sweep_temporaries
from .pyramid import patches_per_image

BUNDLE_FORMAT = 2
POINTER = "current.json"
LEGACY_PARTS = ("index.faiss", "index.ivfdata", "gallery.npz")  # the bundle before builds: loose files
REBUILD = "re-run task=index with the same settings to rebuild it"
GALLERY_ARRAYS = ("ids", "paths", "patch_image", "boxes")
PER_ROW = ("patch_image", "boxes", "patch_ids")  # gallery arrays with one entry per index row
GALLERY = "gallery"  # the build's folder of gallery arrays, one <name>.npy each
MAPPED_BYTES = 1 << 20  # gallery arrays this large or larger are memory-mapped when read; smaller ones loaded


@dataclass
class Bundle:
    """A bundle as read: its index, gallery arrays, manifest and build folder."""

    index: faiss.Index
    gallery: dict[str, np.ndarray]
    manifest: dict
    build: Path


def _counts(gallery: dict[str, np.ndarray], index: faiss.Index) -> dict:
    """The manifest's counts, and what readers may rely on without reading the arrays: ``rows_by_image``
    (rows grouped by image, ascending: an image's rows are found by binary search) and ``patches_per_image``
    (when the index ids are ``image * P + slot``, so that search reads an id's image from the id alone)."""
    image = np.asarray(gallery["patch_image"])
    if image.size and (image.min() < 0 or image.max() >= len(gallery["ids"])):
        raise ValueError("inconsistent bundle: patch rows name images the gallery does not list")
    counts = {"images": len(gallery["ids"]), "indexed_images": len(np.unique(image)),
              "patches": len(image), "ntotal": int(index.ntotal), "dim": int(index.d),
              "rows_by_image": bool(np.all(image[1:] >= image[:-1]))}
    if "patch_ids" in gallery and "levels" in gallery and len(gallery["levels"]):
        ids, per_image = np.asarray(gallery["patch_ids"]), patches_per_image([int(v) for v in gallery["levels"]])
        if ids.size and (np.any(ids[1:] <= ids[:-1]) or np.any(ids // per_image != image)):
            raise ValueError("inconsistent bundle: patch ids are not increasing image * P + slot")
        counts["patches_per_image"] = per_image
    return counts


def write_bundle(folder: Path, index: faiss.Index, gallery: dict[str, np.ndarray]) -> Path:
    """Write ``index`` and the ``gallery`` arrays (``ids``, ``paths``, ``patch_image``, ``boxes``, optional
    ``patch_ids``, ``levels``) as the new bundle of ``folder``; returns the build folder. With ``patch_ids``
    (the index's ids when they are not its row numbers) the rows are stored in id order, so that a reader
    finds an id's row by binary search and an image's rows together."""
    missing = [name for name in GALLERY_ARRAYS if name not in gallery]
    if missing or len(gallery["patch_image"]) != index.ntotal:
        raise ValueError(f"{folder}: inconsistent bundle (missing {missing}, {len(gallery.get('patch_image', []))} "
                         f"patch rows for {index.ntotal} index rows)")
    if "patch_ids" in gallery:  # rows in id order (free: the ids, not the rows, are what the index returns)
        order = np.argsort(gallery["patch_ids"], kind="stable")
        gallery = {**gallery, **{name: np.asarray(gallery[name])[order] for name in PER_ROW if name in gallery}}
    counts = _counts(gallery, index)
    folder = Path(folder)
    sweep_temporaries(folder)  # only those whose writer is gone
    with file_lock(folder / ".lock", "writing this search index", hint="choose a writable folder with paths.indices=DIR"):
        build = folder / f"build-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            build.mkdir()
            faiss_index.write_index(index, build / "index.faiss")  # on disk: index.faiss + index.ivfdata
            _save_gallery(build / GALLERY, gallery)
            hashed = ["index.faiss", "index.refine.faiss", *(f"{GALLERY}/{name}.npy" for name in gallery)]
            parts = {name: {"size": (build / name).stat().st_size, "sha256": sha256_of(build / name)}
                     for name in hashed if (build / name).exists()}
            for name in ("index.ivfdata", "index.refine.npy"):  # may be huge: their size is checked, not their hash
                if (build / name).exists():
                    parts[name] = {"size": (build / name).stat().st_size}
            manifest = json.dumps({"format": BUNDLE_FORMAT, "parts": parts, "counts": counts},
                                  indent=1, sort_keys=True)
            atomic_write_text(build / "manifest.json", manifest)
            atomic_write_text(folder / POINTER, json.dumps({
                "format": BUNDLE_FORMAT, "build": build.name,
                "manifest_sha256": hashlib.sha256(manifest.encode()).hexdigest()}, indent=1))
        except OSError as err:
            shutil.rmtree(build, ignore_errors=True)
            raise CacheError(f"{build}: cannot write the search index ({err.strerror or err}); nothing was "
                             "replaced; choose a writable folder with paths.indices=DIR") from None
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)  # never read: no current.json names it
            raise
        _remove_all_but(folder, build.name)
    return build


def _save_gallery(folder: Path, gallery: dict[str, np.ndarray]) -> None:
    """One plain .npy per array (the build is new: no reader sees these files before the commit)."""
    folder.mkdir()
    for name, array in gallery.items():
        np.save(folder / f"{name}.npy", np.asarray(array), allow_pickle=False)


def _remove_all_but(folder: Path, keep: str) -> None:
    """Remove older builds, a killed writer's leftovers and the loose files of a legacy bundle (lock held)."""
    for entry in folder.iterdir():
        if entry.name.startswith("build-") and entry.name != keep and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name in LEGACY_PARTS or TEMP_NAME.search(entry.name):
            discard(entry)


def _pointer(folder: Path) -> dict | None:
    """The content of ``current.json``, None when there is none."""
    path = folder / POINTER
    try:
        pointer = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise CacheError(f"{path}: unreadable ({type(err).__name__}); {REBUILD}") from None
    if not isinstance(pointer, dict):
        raise CacheError(f"{path}: not a bundle pointer; {REBUILD}")
    if pointer.get("format") != BUNDLE_FORMAT:
        raise CacheError(f"{path}: bundle format {pointer.get('format')} (expected {BUNDLE_FORMAT}); {REBUILD}")
    build = pointer.get("build")
    if not isinstance(build, str) or not build.startswith("build-") or build != Path(build).name:
        raise CacheError(f"{path}: names no build folder; {REBUILD}")
    return pointer


def read_bundle(folder: Path, dim: int) -> Bundle | None:
    """The bundle of ``folder``, every part checked; None when ``folder`` holds none (leftover builds
    of a killed writer are not a bundle). ``dim`` is the query model's dimension."""
    folder = Path(folder)
    for _ in range(3):  # a writer may replace the build between reading current.json and its files
        pointer = _pointer(folder)
        if pointer is None:
            if any((folder / name).exists() for name in LEGACY_PARTS):
                raise CacheError(f"{folder}: this search index predates the atomic bundle format; re-run task=index "
                                 "with the same settings (cached features are reused, only the index is rebuilt)")
            return None
        try:
            return _read_build(folder, pointer, dim)
        except FileNotFoundError as err:
            if _pointer(folder) == pointer:
                raise CacheError(f"{err.filename or folder / pointer['build']}: missing part of the search index; "
                                 f"{REBUILD}") from None
    raise CacheError(f"{folder}: the search index kept changing while being read; try again")


def _read_build(folder: Path, pointer: dict, dim: int) -> Bundle:
    build = folder / pointer["build"]
    manifest_path = build / "manifest.json"
    text = manifest_path.read_bytes()  # FileNotFoundError: the caller tells a replaced build from a lost one

    def refuse(path: Path, problem: str) -> CacheError:
        return CacheError(f"{path}: {problem}; {REBUILD}")

    if hashlib.sha256(text).hexdigest() != pointer.get("manifest_sha256"):
        raise refuse(manifest_path, f"does not match {folder / POINTER}")
    try:
        manifest = json.loads(text)
        parts, counts = dict(manifest["parts"]), dict(manifest["counts"])
    except (ValueError, KeyError, TypeError) as err:
        raise refuse(manifest_path, f"not a bundle manifest ({type(err).__name__})") from None
    if manifest.get("format") != BUNDLE_FORMAT:
        raise refuse(manifest_path, f"bundle format {manifest.get('format')} (expected {BUNDLE_FORMAT})")
    arrays = [f"{GALLERY}/{name}.npy" for name in GALLERY_ARRAYS]
    if not {"index.faiss", *arrays} <= set(parts):
        raise refuse(manifest_path, f"does not list index.faiss and {', '.join(arrays)}")
    for name, expected in parts.items():
        path = build / name
        size = path.stat().st_size
        if size != expected.get("size"):
            raise refuse(path, f"{size:,} bytes, the manifest says {expected.get('size')}")
        if "sha256" in expected and sha256_of(path) != expected["sha256"]:
            raise refuse(path, "content differs from the manifest (sha256)")
    gallery = _load_gallery(build, [name for name in parts if name.startswith(f"{GALLERY}/")], refuse)
    try:
        index = faiss_index.read_index(build / "index.faiss")  # an on-disk index is memory-mapped
    except faiss_index.IndexConfigError as err:
        raise CacheError(f"{err}; {REBUILD}") from None
    _check(build, index, gallery, counts, dim, refuse)
    return Bundle(index, gallery, manifest, build)


def _load_gallery(build: Path, parts: list[str], refuse) -> dict[str, np.ndarray]:
    """The gallery arrays the manifest lists, the large ones memory-mapped (read-only)."""
    gallery = {}
    for part in parts:
        path = build / part
        try:
            mapped = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, EOFError, OSError) as err:
            if isinstance(err, FileNotFoundError):
                raise
            raise refuse(path, f"corrupt ({type(err).__name__})") from None
        gallery[Path(part).stem] = read_at_random(mapped) if mapped.nbytes >= MAPPED_BYTES else np.array(mapped)
    return gallery


def _check(build: Path, index: faiss.Index, gallery: dict[str, np.ndarray], counts: dict, dim: int, refuse) -> None:
    """Every count of the parts agrees with the manifest and with each other."""
    rows = len(gallery["patch_image"])
    found = {"images": len(gallery["ids"]), "patches": rows, "ntotal": int(index.ntotal), "dim": int(index.d)}
    for name, value in found.items():
        if counts.get(name) != value:
            raise refuse(build, f"{name} is {value}, the manifest says {counts.get(name)}")
    if index.ntotal != rows:
        raise refuse(build, f"index has {index.ntotal} rows, the gallery table {rows} patches")
    if index.d != dim:
        raise refuse(build / "index.faiss", f"index dimension {index.d} does not match the model's {dim}")
    if len(gallery["paths"]) != len(gallery["ids"]) or len(gallery["boxes"]) != rows or \
            ("patch_ids" in gallery and len(gallery["patch_ids"]) != rows):
        raise refuse(build / GALLERY, "its arrays disagree in length")
    # what rows name (images it lists, increasing ids) was checked when written, and the hashes say these are
    # those arrays: nothing here reads a whole array (they are mapped, and a search touches its results only)
