"""Features computed elsewhere: the feature file (docs/FORMATS.md), read, checked, written.

A feature file holds another method's descriptors of a dataset's images: one vector per query, and
patch vectors of the gallery images with the image each belongs to, optionally its box (x, y, w, h in
original pixels) and pyramid level (a global descriptor is one patch per image). Two containers, same
fields: NumPy ``.npz`` and HDF5 (``.h5`` / ``.hdf5``, needs the ``hdf5`` extra: h5py).

- ``extract.import_features=PATH`` (task=eval): :func:`imported_source` stands in for the encoder
  (src/patchify/features.py make_feature_source), so Patchify's index, search, mAP and LocScore run
  on the file's vectors. Vectors are L2-normalised as the encoder's own are (``torch.nn.functional
  .normalize`` on float32, src/patchify/model.py); without ``patch_boxes`` LocScore is reported as
  not available.
- ``extract.export_features=PATH`` (task=eval): :func:`export_run_features` writes the run's own
  features in this format; :func:`write_features` writes any arrays, checked as a reader checks them.

Every problem is one :class:`FeatureFileError` line naming the file and the field.
"""

from __future__ import annotations

import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from loguru import logger
from omegaconf import DictConfig

from .assets import sha256_of
from .cache import atomic_write
from .data import DataError, ImageRecord
from .digests import ImageKeys
from .extraction import ExtractStats, PatchFeatures

SUFFIXES = {".npz": "npz", ".h5": "hdf5", ".hdf5": "hdf5"}
REQUIRED = ("query_ids", "query_vectors", "gallery_ids", "patch_vectors")
OPTIONAL = ("patch_image", "patch_ids", "patch_boxes", "patch_level")
MISSING_CHOICES = ("error", "skip")  # extract.missing_features


class FeatureFileError(DataError):
    """A feature file that cannot be used as it is (one line naming the file and the field)."""


def container_of(path: Path, setting: str) -> str:
    """``npz`` or ``hdf5`` from the file name's suffix; one line naming ``setting`` otherwise."""
    kind = SUFFIXES.get(Path(path).suffix.lower())
    if kind is None:
        raise FeatureFileError(f"{setting}={path}: a feature file must end in .npz, .h5 or .hdf5")
    return kind


def _h5py(path: Path):
    try:
        import h5py
    except ImportError:
        raise FeatureFileError(f'{path}: HDF5 feature files need h5py, which is not installed: '
                               f'pip install "patchify[hdf5]"') from None
    return h5py


# ----------------------------------------------------------------------------- reading

def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every top-level array of a feature file, by name (strings as ``str`` arrays)."""
    path = Path(path)
    kind = container_of(path, "feature file")
    if not path.is_file():
        raise FeatureFileError(f"{path}: feature file not found")
    return _read_npz(path) if kind == "npz" else _read_hdf5(path)


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise FeatureFileError(f"{path}: not a readable .npz file ({type(err).__name__}: {err})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise FeatureFileError(f"{path}: a single .npy array, not an .npz archive of named fields (np.savez)")
    arrays = {}
    with data:
        for name in data.files:
            try:
                arrays[name] = data[name]
            except ValueError:  # object arrays need pickle, which is never loaded
                raise FeatureFileError(f"{path}: field {name!r} is an object array; store ids as strings "
                                       "(np.asarray(ids, dtype=str)) and numbers as numeric arrays") from None
            except (OSError, EOFError, zipfile.BadZipFile) as err:
                raise FeatureFileError(f"{path}: field {name!r} is unreadable ({type(err).__name__}: {err})") from None
    return arrays


def _read_hdf5(path: Path) -> dict[str, np.ndarray]:
    h5py = _h5py(path)
    arrays = {}
    try:
        with h5py.File(path, "r") as handle:
            for name, item in handle.items():
                if not isinstance(item, h5py.Dataset):
                    continue
                if h5py.check_string_dtype(item.dtype) is not None:
                    arrays[name] = np.asarray(item.asstr()[()], dtype=str)
                else:
                    arrays[name] = np.asarray(item[()])
    except (OSError, UnicodeDecodeError) as err:
        raise FeatureFileError(f"{path}: not a readable HDF5 file ({type(err).__name__}: {err})") from None
    return arrays


# ----------------------------------------------------------------------------- checking

@dataclass
class FeatureFile:
    """A checked feature file: vectors float32 and L2-normalised, every patch tied to a row of ``gallery_ids``."""

    path: Path
    query_ids: np.ndarray      # (nq,) str
    query_vectors: np.ndarray  # (nq, d) float32
    gallery_ids: np.ndarray    # (ng,) str
    patch_vectors: np.ndarray  # (n, d) float32
    patch_image: np.ndarray    # (n,) int64 row into gallery_ids
    patch_boxes: np.ndarray | None = None  # (n, 4) float32 (x, y, w, h) original pixels
    patch_level: np.ndarray | None = None  # (n,) int8
    extra: list[str] = field(default_factory=list)  # fields the format does not know (ignored)

    @property
    def dim(self) -> int:
        return int(self.query_vectors.shape[1])

    @property
    def levels(self) -> list[int]:
        return [0] if self.patch_level is None else sorted(set(np.unique(self.patch_level).tolist()))


def l2_normalised(vectors: np.ndarray) -> np.ndarray:
    """Rows L2-normalised exactly as the encoder's descriptors are: ``F.normalize`` on float32 (model.py)."""
    import torch
    import torch.nn.functional as F

    return F.normalize(torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)), dim=-1).numpy()


class _Checker:
    """One-line errors about the fields of one file."""

    def __init__(self, path: Path, arrays: dict[str, np.ndarray]):
        self.path, self.arrays = Path(path), arrays

    def fail(self, name: str, problem: str) -> FeatureFileError:
        return FeatureFileError(f"{self.path}: field {name!r}: {problem}")

    def get(self, name: str, required: bool = True) -> np.ndarray | None:
        if name not in self.arrays:
            if required:
                raise FeatureFileError(f"{self.path}: missing field {name!r} (a feature file needs "
                                       f"{', '.join(REQUIRED)} and patch_image or patch_ids; docs/FORMATS.md)")
            return None
        return np.asarray(self.arrays[name])

    def ids(self, name: str) -> np.ndarray:
        ids = self.get(name)
        if ids.ndim != 1:
            raise self.fail(name, f"expected a 1-D array of ids, got shape {ids.shape}")
        if ids.dtype.kind == "S":
            try:
                ids = np.char.decode(ids, "utf-8")
            except UnicodeDecodeError:
                raise self.fail(name, "ids are bytes that are not UTF-8 text") from None
        if ids.dtype.kind != "U":
            raise self.fail(name, f"ids must be strings, got dtype {ids.dtype}")
        unique, counts = np.unique(ids, return_counts=True)
        if len(unique) != len(ids):
            twice = set(unique[counts > 1].tolist())
            first = next(i for i in ids.tolist() if i in twice)
            raise self.fail(name, f"id {first!r} appears {int(counts[unique == first][0])} times "
                                  f"({len(twice)} duplicated ids); ids must be unique")
        return ids.astype(str)

    def vectors(self, name: str, rows: int | None = None, rows_of: str = "") -> np.ndarray:
        vectors = self.get(name)
        if vectors.ndim != 2 or vectors.shape[1] == 0:
            raise self.fail(name, f"expected a 2-D array (rows, dim), got shape {vectors.shape}")
        if vectors.dtype.kind != "f":
            raise self.fail(name, f"expected floats (float16, float32 or float64), got dtype {vectors.dtype}")
        if rows is not None and len(vectors) != rows:
            raise self.fail(name, f"{len(vectors)} rows, but {rows_of} has {rows}")
        vectors = vectors.astype(np.float32)
        finite = np.isfinite(vectors).all(axis=1)
        if not finite.all():
            row = int(np.argmin(finite))
            raise self.fail(name, f"row {row} holds NaN or inf (as float32); {int((~finite).sum())} such rows")
        zero = ~vectors.any(axis=1)
        if zero.any():
            raise self.fail(name, f"row {int(np.argmax(zero))} is all zeros and cannot be L2-normalised; "
                                  f"{int(zero.sum())} such rows")
        return vectors

    def integers(self, name: str, rows: int, lo: int, hi: int, what: str, required: bool = True) -> np.ndarray | None:
        values = self.get(name, required)
        if values is None:
            return None
        if values.ndim != 1 or len(values) != rows:
            raise self.fail(name, f"expected shape ({rows},) (one value per row of patch_vectors), got {values.shape}")
        if values.dtype.kind not in "iu":
            raise self.fail(name, f"expected integers, got dtype {values.dtype}")
        values = values.astype(np.int64)
        bad = (values < lo) | (values > hi)
        if bad.any():
            row = int(np.argmax(bad))
            raise self.fail(name, f"row {row} is {values[row]}, outside {lo}..{hi} ({what})")
        return values

    def boxes(self, rows: int) -> np.ndarray | None:
        boxes = self.get("patch_boxes", required=False)
        if boxes is None:
            return None
        if boxes.shape != (rows, 4):
            raise self.fail("patch_boxes", f"expected shape ({rows}, 4) (x, y, w, h per patch), got {boxes.shape}")
        if boxes.dtype.kind not in "iuf":
            raise self.fail("patch_boxes", f"expected numbers, got dtype {boxes.dtype}")
        boxes = boxes.astype(np.float32)
        bad = ~np.isfinite(boxes).all(axis=1) | (boxes[:, 2] <= 0) | (boxes[:, 3] <= 0)
        if bad.any():
            row = int(np.argmax(bad))
            raise self.fail("patch_boxes", f"row {row} is {boxes[row].tolist()}; a box is (x, y, w, h), finite, "
                                           "with w > 0 and h > 0")
        return boxes


def check_arrays(path: Path, arrays: dict[str, Any]) -> FeatureFile:
    """The fields of a feature file, checked (docs/FORMATS.md); vectors float32, not yet normalised."""
    check = _Checker(path, {name: np.asarray(value) for name, value in arrays.items()})
    for name in REQUIRED:
        check.get(name)
    query_ids, gallery_ids = check.ids("query_ids"), check.ids("gallery_ids")
    query_vectors = check.vectors("query_vectors", len(query_ids), "query_ids")
    patch_vectors = check.vectors("patch_vectors")
    n = len(patch_vectors)
    if patch_vectors.shape[1] != query_vectors.shape[1]:
        raise check.fail("patch_vectors", f"width {patch_vectors.shape[1]} differs from query_vectors' "
                                          f"{query_vectors.shape[1]}; both must come from the same method")
    has_image, has_ids = "patch_image" in check.arrays, "patch_ids" in check.arrays
    if has_image == has_ids:
        raise FeatureFileError(f"{path}: {'both' if has_image else 'neither'} patch_image and patch_ids; give exactly "
                               "one (each patch's row in gallery_ids, or its gallery id)")
    if has_image:
        patch_image = check.integers("patch_image", n, 0, len(gallery_ids) - 1, "a row of gallery_ids")
    else:
        patch_ids = check.get("patch_ids")
        if patch_ids.ndim != 1 or len(patch_ids) != n:
            raise check.fail("patch_ids", f"expected shape ({n},) (one gallery id per patch), got {patch_ids.shape}")
        if patch_ids.dtype.kind == "S":  # repeats are expected here: several patches per image
            try:
                patch_ids = np.char.decode(patch_ids, "utf-8")
            except UnicodeDecodeError:
                raise check.fail("patch_ids", "ids are bytes that are not UTF-8 text") from None
        if patch_ids.dtype.kind != "U":
            raise check.fail("patch_ids", f"ids must be strings, got dtype {patch_ids.dtype}")
        order = np.argsort(gallery_ids)
        where = np.searchsorted(gallery_ids[order], patch_ids)
        found = (where < len(order)) & (gallery_ids[order][np.minimum(where, len(order) - 1)] == patch_ids)
        if not found.all():
            raise check.fail("patch_ids", f"id {str(patch_ids[np.argmin(found)])!r} is not in gallery_ids "
                                          f"({int((~found).sum())} such patches)")
        patch_image = order[where].astype(np.int64)
    boxes = check.boxes(n)
    level = check.integers("patch_level", n, 0, 127, "a pyramid level", required=False)
    extra = sorted(set(check.arrays) - set(REQUIRED) - set(OPTIONAL))
    return FeatureFile(Path(path), query_ids, query_vectors, gallery_ids, patch_vectors, patch_image, boxes,
                       None if level is None else level.astype(np.int8), extra)


def read_features(path: Path) -> FeatureFile:
    """A feature file read and checked, its vectors L2-normalised as the encoder's are."""
    features = check_arrays(path, read_arrays(path))
    if features.extra:
        logger.warning(f"{path}: fields {', '.join(features.extra)} are not part of the format and are ignored "
                       f"(known: {', '.join(REQUIRED + OPTIONAL)})")
    features.query_vectors = l2_normalised(features.query_vectors)
    features.patch_vectors = l2_normalised(features.patch_vectors)
    return features


# ----------------------------------------------------------------------------- matching a dataset

def _rows_of(ids: np.ndarray, wanted: list[str]) -> np.ndarray:
    """Row of each ``wanted`` id in ``ids`` (-1 where absent)."""
    row = {image_id: i for i, image_id in enumerate(ids.tolist())}
    return np.asarray([row.get(w, -1) for w in wanted], np.int64)


def _unknown(features: FeatureFile, name: str, ids: np.ndarray, records: Sequence[ImageRecord], role: str) -> None:
    known = {r.id for r in records}
    unknown = [i for i in ids.tolist() if i not in known]
    if unknown:
        example = records[0].id if records else ""
        raise FeatureFileError(f"{features.path}: field {name!r}: id {unknown[0]!r} is not a {role} image of the "
                               f"dataset ({len(unknown)} such ids; ids are paths relative to the image root, e.g. "
                               f"{example!r})")


@dataclass
class ImportedModel:
    """What the index cache needs to know of where imported vectors come from."""

    fingerprint: dict
    dim: int
    input_size: int = 0


@dataclass
class ImportedSource:
    """Stands in for :class:`~patchify.features.FeatureSource` with a feature file's vectors (task=eval)."""

    file: FeatureFile
    missing: str  # extract.missing_features: error | skip (gallery images without vectors)
    seconds: float
    model: ImportedModel = None  # type: ignore[assignment]
    stats: list[ExtractStats] = field(default_factory=list)
    keys: ImageKeys = field(default_factory=ImageKeys)
    skipped: list[str] = field(default_factory=list)

    @property
    def levels(self) -> list[int]:
        return self.file.levels

    @property
    def has_boxes(self) -> bool:
        return self.file.patch_boxes is not None

    def queries(self, records: list[ImageRecord], region: str = "full") -> PatchFeatures:
        """One vector per query record, in record order; every query needs one (its AP could not be scored)."""
        ff = self.file
        _unknown(ff, "query_ids", ff.query_ids, records, "query")
        rows = _rows_of(ff.query_ids, [r.id for r in records])
        if (rows < 0).any():
            first = records[int(np.argmin(rows >= 0))].id
            raise FeatureFileError(f"{ff.path}: field 'query_ids': dataset query {first!r} has no vector "
                                   f"({int((rows < 0).sum())} queries missing); every query needs one")
        n = len(records)
        return PatchFeatures(ff.query_vectors[rows], np.arange(n, dtype=np.int64), np.full((n, 4), np.nan, np.float32),
                             np.zeros(n, np.int8))

    def features(self, records: list[ImageRecord], levels: list[int] | None = None, region: str = "full",
                 desc: str = "gallery") -> PatchFeatures:
        """All patches of the file (``levels`` does not select: the file says what it holds), in file order,
        ``image`` indexing ``records``; a record with no patch is an error unless missing=skip."""
        ff = self.file
        _unknown(ff, "gallery_ids", ff.gallery_ids, records, "gallery")
        record_of_row = _rows_of(np.asarray([r.id for r in records]), ff.gallery_ids.tolist())
        image = record_of_row[ff.patch_image]
        described = np.zeros(len(records), bool)
        described[image] = True
        if not described.all():
            lacking = [records[i].id for i in np.flatnonzero(~described)]
            if self.missing != "skip":
                raise FeatureFileError(f"{ff.path}: dataset gallery image {lacking[0]!r} has no patch "
                                       f"({len(lacking)} images without features); add them, or evaluate without "
                                       "them: extract.missing_features=skip")
            self.skipped = [f"{image_id}: no features in {ff.path.name}" for image_id in lacking]
            logger.warning(f"{len(lacking)} gallery images have no features in {ff.path} (first {lacking[0]}); "
                           "extract.missing_features=skip: they are never retrieved and listed in metrics.json")
        boxes = ff.patch_boxes if ff.patch_boxes is not None else np.full((len(image), 4), np.nan, np.float32)
        level = ff.patch_level if ff.patch_level is not None else np.zeros(len(image), np.int8)
        return PatchFeatures(ff.patch_vectors, image, boxes, level)

    def totals(self) -> dict:
        return {"extracted": 0, "reused": 0, "failed": list(self.skipped), "seconds": round(self.seconds, 2)}

    def describe(self) -> dict:
        """What metrics.json says of the imported file."""
        ff = self.file
        return {"imported": str(ff.path), "sha256": self.model.fingerprint["sha256"], "dim": ff.dim,
                "query_vectors": len(ff.query_ids), "gallery_images": len(ff.gallery_ids),
                "patch_vectors": len(ff.patch_vectors), "boxes": self.has_boxes,
                "levels": self.levels if ff.patch_level is not None else None}


def imported_source(cfg: DictConfig) -> ImportedSource:
    """The source of a run with ``extract.import_features`` set: the file read, checked and normalised."""
    path = Path(str(cfg.extract.import_features))
    container_of(path, "extract.import_features")
    started = time.perf_counter()
    features = read_features(path)
    digest = sha256_of(path)
    logger.info(f"features: imported {path} ({len(features.query_ids):,} queries, {len(features.patch_vectors):,} "
                f"patches of {len(features.gallery_ids):,} gallery images, dim {features.dim}, "
                f"{'with' if features.patch_boxes is not None else 'no'} boxes) instead of model={cfg.model.name}")
    return ImportedSource(features, str(cfg.extract.get("missing_features", "error")),
                          time.perf_counter() - started, ImportedModel({"imported": digest, "sha256": digest}, features.dim))


# ----------------------------------------------------------------------------- writing

def write_features(path: Path, *, query_ids: Sequence[str], query_vectors: np.ndarray, gallery_ids: Sequence[str],
                   patch_vectors: np.ndarray, patch_image: np.ndarray | None = None,
                   patch_ids: Sequence[str] | None = None, patch_boxes: np.ndarray | None = None,
                   patch_level: np.ndarray | None = None) -> Path:
    """Write a feature file (.npz or .h5 by ``path``'s suffix), atomically, after the checks a reader makes."""
    path = Path(path)
    kind = container_of(path, "feature file")
    given = {"query_ids": query_ids, "query_vectors": query_vectors, "gallery_ids": gallery_ids,
             "patch_vectors": patch_vectors, "patch_image": patch_image, "patch_ids": patch_ids,
             "patch_boxes": patch_boxes, "patch_level": patch_level}
    arrays = {name: np.asarray(value) for name, value in given.items() if value is not None}
    for name in ("query_ids", "gallery_ids", "patch_ids"):
        if name in arrays:
            arrays[name] = arrays[name].astype(str)
    check_arrays(path, arrays)

    def write_npz(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)

    def write_hdf5(tmp: Path) -> None:
        with h5py.File(tmp, "w") as handle:
            for name, value in arrays.items():
                if value.dtype.kind == "U":
                    handle.create_dataset(name, data=value.astype(object), dtype=h5py.string_dtype("utf-8"))
                else:
                    handle.create_dataset(name, data=value)

    if kind == "hdf5":
        h5py = _h5py(path)
    atomic_write(path, write_npz if kind == "npz" else write_hdf5, what="feature file", error=FeatureFileError)
    return path


def export_run_features(path: Path, queries: Sequence[ImageRecord], gallery: Sequence[ImageRecord],
                        query_features: PatchFeatures, gallery_features: PatchFeatures) -> Path:
    """Write a run's query and patch features (``image`` indexing ``queries`` / ``gallery``), patches in the
    run's own order, with boxes and levels; gallery images without patches (unreadable) are left out."""
    if not np.array_equal(query_features.image, np.arange(len(queries))):
        raise FeatureFileError(f"{path}: cannot export: the run has no single vector for every query")
    described = np.unique(gallery_features.image)
    row_of_image = np.full(len(gallery), -1, np.int64)
    row_of_image[described] = np.arange(len(described))
    path = write_features(path, query_ids=[q.id for q in queries], query_vectors=query_features.vectors,
                          gallery_ids=[gallery[i].id for i in described], patch_vectors=gallery_features.vectors,
                          patch_image=row_of_image[gallery_features.image], patch_boxes=gallery_features.boxes,
                          patch_level=gallery_features.level)
    logger.info(f"features: exported {len(queries):,} query and {len(gallery_features.vectors):,} patch vectors to {path}")
    return path
