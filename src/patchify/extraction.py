"""Extraction: pyramid patches of many images -> descriptors, cached and resumable.

A ``FeatureStore`` is one folder per (encoder fingerprint, pyramid level,
patch mode, image region) under ``features/``, named
``<model>.<mode>.L<level>[.bbox]-<hash>``. It holds chunk files, each an
atomic ``.npz`` with, for a run of images: content keys (a hash of each
image's bytes, src/patchify/digests.py), the ids they were first seen under,
per-image offsets into the patch arrays, patch vectors, patch boxes and a
per-image error (empty when the image was read). An image is reused when its
content key is found, whatever its name or folder, so

- a second identical run extracts nothing, and identical files are encoded once,
- two different images never share features (same name, size and mtime or not),
- a run killed mid-way resumes after its last finished chunk,
- adding photos to a folder extracts only the new ones,
- a chunk is checked when written and when read (offsets vs vectors vs patches
  per image, CRC, finite values); a truncated, corrupt or inconsistent chunk is
  moved aside (``*.corrupt``) and its images extracted again,
- chunk names carry shard, host, pid and a random tag, so concurrent jobs never
  write the same file,
- batch size, workers and device never enter the key (they do not change
  the content).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from loguru import logger
from PIL import Image
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import default_convert, get_worker_info
from tqdm import tqdm

from .cache import CacheError, check_writable, content_key, load_arrays, open_cache_folder, save_arrays
from .crops import TensorCrops, crop_method, crop_region, decode_rgb
from .data import DataError, ImageRecord, load_image
from .digests import DEFAULT_KEYS, ImageKeys
from .model import LoadedModel, LongSideTransform, encode
from .pool_cells import describe_cells
from .pyramid import grid_edges, level_boxes

STORE_FORMAT = 2  # 2: entries keyed by image content (src/patchify/digests.py); 1 keyed them by file name + size + mtime


class ExtractionError(RuntimeError):
    """Extraction could not go on (one line); finished chunks are kept."""


@dataclass
class PatchFeatures:
    """Patch descriptors of a list of images, all levels concatenated."""

    vectors: np.ndarray  # (n, d) float32, L2-normalised
    image: np.ndarray    # (n,) int64 index into the record list
    boxes: np.ndarray    # (n, 4) float32 (x, y, w, h) original pixels
    level: np.ndarray    # (n,) int8

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def select(self, mask: np.ndarray) -> "PatchFeatures":
        return PatchFeatures(self.vectors[mask], self.image[mask], self.boxes[mask], self.level[mask])

    @staticmethod
    def concat(parts: Sequence["PatchFeatures"]) -> "PatchFeatures":
        return PatchFeatures(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("vectors", "image", "boxes", "level")))


@dataclass
class ExtractStats:
    desc: str = ""
    extracted: int = 0
    reused: int = 0
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0


# ----------------------------------------------------------------------------- store

class CorruptChunk(Exception):
    """A chunk failed its checks while being read; it was moved aside and its entries dropped."""


def _reason(error: str, path: Path) -> str:
    """An error message without its leading ``<path>: `` (stored per content, shown with the current path)."""
    prefix = f"{path}: "
    return error[len(prefix):] if error.startswith(prefix) else error


class FeatureStore:
    """Chunked, content-keyed feature cache of one (model, level, mode, region).

    An entry is keyed by what the image is (``ImageKeys``: a hash of its bytes,
    plus its boxes for ``region="bbox"``), never by its name: different images
    never share features, and identical files share one entry.
    """

    def __init__(self, root: Path, model_name: str, fingerprint: dict, level: int, mode: str, region: str,
                 writer: int = 0, keys: ImageKeys | None = None):
        self.fingerprint = {"format": STORE_FORMAT, "model": fingerprint, "level": level, "mode": mode, "region": region}
        self.writer = writer  # shard index, part of chunk names (which also carry host and pid)
        suffix = "" if region == "full" else f".{region}"
        self.folder = Path(root) / f"{model_name}.{mode}.L{level}{suffix}-{content_key(self.fingerprint)}"
        self.level, self.mode, self.region = level, mode, region
        self.keys = keys or DEFAULT_KEYS
        self._entries: dict[str, tuple[Path, int]] | None = None

    def open(self) -> None:
        """Create the folder with its meta file, or check that an existing one matches."""
        open_cache_folder(self.folder, self.fingerprint)

    def chunk_paths(self) -> list[Path]:
        """Chunk files, oldest first (entries of equal keys hold the same content; the newest wins)."""
        def age(path: Path) -> tuple[int, str]:
            try:
                return path.stat().st_mtime_ns, path.name
            except FileNotFoundError:  # moved aside by a concurrent reader
                return 0, path.name
        return sorted(self.folder.glob("chunk-*.npz"), key=age)

    def _set_aside(self, path: Path, reason: str) -> None:
        logger.warning(f"{path}: {reason}; moved aside, its images will be extracted again")
        try:
            path.rename(path.with_name(path.name + ".corrupt"))
        except OSError:
            pass  # already moved by another reader, or a read-only cache (then it is skipped every run)
        if self._entries is not None:
            self._entries = {key: entry for key, entry in self._entries.items() if entry[0] != path}

    def _index_chunk(self, path: Path) -> dict[str, int] | None:
        """``key -> position`` of a chunk whose index arrays are consistent; None (set aside) otherwise."""
        try:
            arrays = load_arrays(path, ("keys", "offsets", "errors"))
        except CacheError as err:
            self._set_aside(path, str(err).removeprefix(f"{path}: "))
            return None
        problem = _index_problem(arrays["keys"], arrays["offsets"], arrays["errors"], (self.level + 1) ** 2)
        if problem:
            self._set_aside(path, f"inconsistent cache chunk ({problem})")
            return None
        return {str(key): position for position, key in enumerate(arrays["keys"])}

    def entries(self) -> dict[str, tuple[Path, int]]:
        """content key -> (chunk file, position in chunk); later chunks win."""
        if self._entries is None:
            self._entries = {}
            for path in self.chunk_paths():
                for key, position in (self._index_chunk(path) or {}).items():
                    self._entries[key] = (path, position)
        return self._entries

    def missing(self, records: Sequence[ImageRecord]) -> list[ImageRecord]:
        """Records without an entry (an unreadable file has no key and is always tried again)."""
        entries = self.entries()
        return [r for r, key in zip(records, self.keys.keys(records, self.region)) if key is None or key not in entries]

    def write_chunk(self, records: Sequence[ImageRecord], counts: list[int], vectors: np.ndarray, boxes: np.ndarray,
                    errors: list[str], dim: int) -> None:
        """Write one chunk for ``records`` (``counts[i]`` patches each, 0 for a failed image), checked first.

        Images whose file could not be read have no content key; they are not stored (their error is
        reported by this run and they are tried again by the next).
        """
        keys = self.keys.keys(records, self.region)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        vectors, boxes = vectors.reshape(-1, dim).astype(np.float32), boxes.reshape(-1, 4).astype(np.float32)
        reasons = np.asarray([_reason(e, r.path) for r, e in zip(records, errors)], dtype=str)
        arrays = dict(keys=np.asarray([k or "" for k in keys], dtype=str),
                      ids=np.asarray([r.id for r in records], dtype=str), offsets=offsets, vectors=vectors,
                      boxes=boxes, errors=reasons)
        problem = _index_problem(arrays["keys"], offsets, reasons, (self.level + 1) ** 2) or \
            _array_problem(offsets, vectors, boxes, dim)
        if problem:  # a bug or a setting that slipped through; never cache it
            raise ExtractionError(f"{self.folder}: refusing to write an inconsistent cache chunk ({problem})")
        stored = np.asarray([k is not None for k in keys])
        if not stored.all():  # drop unkeyed images and their (zero) patches
            rows = np.repeat(stored, np.diff(offsets))
            arrays = dict(keys=arrays["keys"][stored], ids=arrays["ids"][stored],
                          offsets=np.concatenate([[0], np.cumsum(np.diff(offsets)[stored])]).astype(np.int64),
                          vectors=vectors[rows], boxes=boxes[rows], errors=reasons[stored])
        if not len(arrays["keys"]):
            return
        path = self.folder / f"chunk-{self.writer:04d}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}.npz"
        save_arrays(path, **arrays)
        entries = self.entries()
        for position, key in enumerate(arrays["keys"]):
            entries[str(key)] = (path, position)

    def gather(self, records: Sequence[ImageRecord], expected_dim: int | None = None) -> tuple[PatchFeatures, list[str]]:
        """Features of ``records`` (all found in the store), in record order; also the read errors.

        Raises ``CorruptChunk`` when a chunk fails its checks (it is moved aside first, so extracting the
        missing records again and gathering again recovers).
        """
        entries = self.entries()
        by_chunk: dict[Path, list[tuple[int, int]]] = {}
        errors: list[str] = []
        for index, (record, key) in enumerate(zip(records, self.keys.keys(records, self.region))):
            if key is None:  # the file could not be read at all (gone, no permission): no patches
                errors.append(f"{record.path}: cannot read the file")
                continue
            if key not in entries:  # its chunk was set aside since extraction
                raise CorruptChunk(f"{record.path}: no cache entry")
            by_chunk.setdefault(entries[key][0], []).append((index, entries[key][1]))
        pieces: list[tuple[int, np.ndarray, np.ndarray]] = []
        for path, wanted in by_chunk.items():
            arrays = self._read_chunk(path, expected_dim)
            for index, position in wanted:
                start, stop = arrays["offsets"][position], arrays["offsets"][position + 1]
                pieces.append((index, arrays["vectors"][start:stop], arrays["boxes"][start:stop]))
                if arrays["errors"][position]:
                    errors.append(f"{records[index].path}: {arrays['errors'][position]}")
        pieces.sort(key=lambda piece: piece[0])
        dim = pieces[0][1].shape[1] if pieces else (expected_dim or 0)
        vectors = np.concatenate([p[1] for p in pieces]) if pieces else np.zeros((0, dim), np.float32)
        boxes = np.concatenate([p[2] for p in pieces]) if pieces else np.zeros((0, 4), np.float32)
        image = np.concatenate([np.full(len(p[1]), p[0], np.int64) for p in pieces]) if pieces else np.zeros(0, np.int64)
        return PatchFeatures(vectors, image, boxes, np.full(len(image), self.level, np.int8)), errors

    def _read_chunk(self, path: Path, expected_dim: int | None) -> dict[str, np.ndarray]:
        """All arrays of a chunk, checked (CRC, shapes, finite values); CorruptChunk after setting it aside."""
        try:
            arrays = load_arrays(path)
        except CacheError as err:
            self._set_aside(path, str(err).removeprefix(f"{path}: "))
            raise CorruptChunk(str(path)) from None
        dim = arrays["vectors"].shape[1] if arrays["vectors"].ndim == 2 else -1
        if expected_dim is not None and dim != expected_dim:
            raise CacheError(f"{path}: feature dimension {dim} does not match the model's {expected_dim}; stale cache")
        problem = _array_problem(arrays["offsets"], arrays["vectors"], arrays["boxes"], dim)
        if problem:
            self._set_aside(path, f"inconsistent cache chunk ({problem})")
            raise CorruptChunk(str(path))
        return arrays


def warn_old_stores(root: Path) -> None:
    """Say (once per run) that feature folders of an older store format under ``root`` are not read."""
    old = []
    for meta in Path(root).glob("*/meta.json"):
        try:
            found = json.loads(meta.read_text()).get("format")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(found, int) and found < STORE_FORMAT:
            old.append(meta.parent)
    if old:
        size = sum(f.stat().st_size for folder in old for f in folder.iterdir() if f.is_file())
        logger.warning(f"{root}: {len(old)} feature cache folder(s) of store format < {STORE_FORMAT} (keyed by file "
                       f"name, size and mtime, which could give one image another's features) are not read; their "
                       f"images are encoded again once. Delete them to free {size / 1e6:,.0f} MB, e.g. {old[0]}")


def _index_problem(keys: np.ndarray, offsets: np.ndarray, errors: np.ndarray, patches: int) -> str:
    """What is wrong with a chunk's per-image arrays ('' if nothing): lengths, offsets, patches per image."""
    if len(offsets) != len(keys) + 1 or len(errors) != len(keys):
        return f"{len(keys)} keys, {len(offsets)} offsets, {len(errors)} error entries"
    if len(keys) and (offsets[0] != 0 or (np.diff(offsets) < 0).any()):
        return "offsets not increasing from 0"
    counts = np.diff(offsets)
    failed = np.asarray([bool(e) for e in errors], dtype=bool)
    if (counts[~failed] != patches).any() or (counts[failed] != 0).any():
        return f"patches per image {sorted(set(counts.tolist()))}, expected {patches} (0 for unreadable images)"
    if any(not str(k) for k in keys):
        return "an empty content key"
    return ""


def _array_problem(offsets: np.ndarray, vectors: np.ndarray, boxes: np.ndarray, dim: int) -> str:
    """What is wrong with a chunk's patch arrays ('' if nothing): row counts, width, finite values."""
    rows = int(offsets[-1]) if len(offsets) else 0
    if vectors.ndim != 2 or vectors.shape != (rows, dim) or boxes.shape != (rows, 4):
        return f"offsets say {rows} patches, vectors {vectors.shape}, boxes {boxes.shape}"
    if not (np.isfinite(vectors).all() and np.isfinite(boxes).all()):
        return "non-finite values"
    return ""


# ----------------------------------------------------------------------------- crop-mode extraction

ShapeGroups = list[tuple[torch.Tensor, torch.Tensor]]  # (positions (k,), crops (k, 3, h, w)) per crop shape


def shape_groups(crops: Sequence[torch.Tensor]) -> ShapeGroups:
    """Crops of several shapes as one stacked tensor per shape, with each crop's position in ``crops``."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for position, crop in enumerate(crops):
        by_shape.setdefault(tuple(crop.shape), []).append(position)
    return [(torch.tensor(positions, dtype=torch.long), torch.stack([crops[i] for i in positions]))
            for positions in by_shape.values()]


class PatchTransform:
    """timm's eval transform of a model (squash resize, to tensor, normalise) for many crops
    of one image at once: each crop is resized by PIL exactly as timm's ``Resize`` does, and
    the conversion and normalisation run once on the stacked crops (same arithmetic, so the
    same numbers as ``model.transform`` crop by crop; tests/test_extraction_speed.py).
    Under ``model.resize=long_side`` each crop gets ``LongSideTransform`` (src/patchify/model.py)
    and the crops come grouped by shape (``ShapeGroups``)."""

    RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
                "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}

    def __init__(self, data_config: dict) -> None:
        mode = data_config.get("crop_mode")
        if mode not in ("squash", "long_side") or float(data_config.get("crop_pct", 1.0)) != 1.0:
            raise ValueError("PatchTransform reproduces the squash or long_side resize (crop_pct 1) only")
        self.long_side = LongSideTransform(data_config) if mode == "long_side" else None
        self.size = (int(data_config["input_size"][-1]), int(data_config["input_size"][-2]))
        self.resample = self.RESAMPLE[data_config.get("interpolation", "bicubic")]
        self.mean = torch.tensor(data_config["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(data_config["std"], dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, image: Image.Image, boxes: np.ndarray) -> torch.Tensor | ShapeGroups:
        """(n, 3, S, S) float32 of the ``boxes`` (x, y, w, h) of ``image``; long_side: ShapeGroups."""
        if self.long_side is not None:
            return shape_groups([self.long_side(image.crop((x, y, x + w, y + h))) for x, y, w, h in boxes.tolist()])
        pixels = np.stack([np.asarray(image.crop((x, y, x + w, y + h)).resize(self.size, self.resample))
                           for x, y, w, h in boxes.tolist()])
        batch = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255)
        return batch.sub_(self.mean).div_(self.std)


class CropBatches:
    """Crops waiting for the encoder, by shape: a shape's full batches are encoded as soon as they fill
    (squash has one shape, so its batches are the crops in arrival order), ``finish`` encodes the rest
    and returns each layer's descriptors in arrival order. Crops of different shapes (long_side) are
    never padded to a common shape: the extra padding tokens would change those crops' descriptors."""

    def __init__(self, model: LoadedModel, layers: Sequence[int] | None, batch_size: int) -> None:
        self.model, self.layers, self.batch_size = model, layers, batch_size
        self.waiting: dict[tuple[int, ...], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.encoded: list[tuple[torch.Tensor, list[torch.Tensor]]] = []  # (positions, one (B, D) per layer)
        self.count = 0

    def add(self, crops: torch.Tensor | ShapeGroups) -> None:
        """Queue a (n, 3, H, W) tensor or ShapeGroups (positions relative to this call)."""
        groups = [(torch.arange(len(crops)), crops)] if isinstance(crops, torch.Tensor) else crops
        for positions, batch in groups:
            shape = tuple(batch.shape[1:])
            self.waiting.setdefault(shape, []).append((positions + self.count, batch))
            if sum(len(b) for _, b in self.waiting[shape]) >= self.batch_size:
                self._encode(shape, everything=False)
        self.count += sum(len(positions) for positions, _ in groups)

    def _encode(self, shape: tuple[int, ...], everything: bool) -> None:
        parts = self.waiting.pop(shape)
        positions, stacked = torch.cat([p for p, _ in parts]), torch.cat([b for _, b in parts])
        full = len(stacked) if everything else len(stacked) // self.batch_size * self.batch_size
        for start in range(0, full, self.batch_size):
            stop = min(start + self.batch_size, full)
            self.encoded.append((positions[start:stop], encode(self.model, stacked[start:stop], self.layers)))
        if full < len(stacked):
            self.waiting[shape] = [(positions[full:], stacked[full:])]

    def finish(self) -> list[torch.Tensor] | None:
        """Descriptors of every queued crop, one (n, D) tensor per layer in arrival order (None if
        none was queued); the queue starts again empty."""
        for shape in list(self.waiting):
            self._encode(shape, everything=True)
        encoded, self.encoded, self.count = self.encoded, [], 0
        if not encoded:
            return None
        order = torch.cat([positions for positions, _ in encoded])
        layers = [torch.cat([vectors[i] for _, vectors in encoded]) for i in range(len(encoded[0][1]))]
        if bool((order[1:] > order[:-1]).all()):
            return layers
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order))
        return [vectors[inverse] for vectors in layers]


class _CropDataset(TorchDataset):
    """Image i -> (its patches of every level, their boxes (n, 4) and levels (n,), error message).
    Each image is decoded once for all levels. The patches are, with ``crops="pil"``, preprocessed
    here ((n, 3, S, S), ``PatchTransform``); with ``crops="tensor"``, the decoded image (3, H, W)
    uint8 and its cell boxes (n, 4) in its own pixels, cut and resized by the main process on the
    model's device (``TensorCrops``, src/patchify/crops.py)."""

    def __init__(self, records: Sequence[ImageRecord], levels: Sequence[int], region: str, data_config: dict,
                 crops: str = "pil"):
        self.records, self.levels, self.region, self.crops = records, sorted(levels), region, crops
        self.transform = PatchTransform(data_config) if crops == "pil" else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        record = self.records[index]
        nothing = (np.zeros((0, 4), np.float32), np.zeros(0, np.int8))
        tensor = self.crops != "pil"
        try:
            image = decode_rgb(record.path) if tensor else load_image(record.path)
        except DataError as err:
            return None, nothing, str(err)
        offset_x = offset_y = 0
        if self.region == "bbox" and record.boxes:
            b = record.boxes_array
            x0, y0 = b[:, 0].min(), b[:, 1].min()
            x1, y1 = (b[:, 0] + b[:, 2]).max(), (b[:, 1] + b[:, 3]).max()
            offset_x, offset_y = int(round(x0)), int(round(y0))
            region = (offset_x, offset_y, max(int(round(x1)), offset_x + 1), max(int(round(y1)), offset_y + 1))
            image = crop_region(image, *region) if tensor else image.crop(region)
        width, height = (image.shape[2], image.shape[1]) if tensor else image.size
        if width <= self.levels[-1] or height <= self.levels[-1]:
            return None, nothing, f"{record.path}: image {width}x{height} too small for pyramid level {self.levels[-1]}"
        per_level = [level_boxes(width, height, level) for level in self.levels]
        boxes = np.concatenate(per_level)
        levels = np.concatenate([np.full(len(b), level, np.int8) for b, level in zip(per_level, self.levels)])
        crops = (image, boxes) if tensor else self.transform(image, boxes)
        boxes = boxes.astype(np.float32) + np.array([offset_x, offset_y, 0, 0], np.float32)
        return crops, (boxes, levels), ""


def _todo(stores: Sequence[FeatureStore], records: Sequence[ImageRecord], stats: ExtractStats) -> list[ImageRecord]:
    """Records that at least one store lacks (in record order, identical files once); counts the others as reused."""
    missing = {id(r) for store in stores for r in store.missing(records)}
    todo, seen = [], set()
    for record, key in zip(records, stores[0].keys.keys(records, stores[0].region)):
        if id(record) in missing and (key is None or key not in seen):
            todo.append(record)
            seen.add(key)
    stats.reused = len(records) - len(todo)
    if todo:
        for store in stores:
            check_writable(store.folder)
    return todo


def _share_tensors(item: Any) -> None:
    if isinstance(item, torch.Tensor):
        item.share_memory_()
    elif isinstance(item, (tuple, list)):
        for part in item:
            _share_tensors(part)


def _collate_shared(sample: Any) -> Any:
    """DataLoader ``collate_fn`` (``batch_size=None``): numpy arrays to tensors as torch's default
    does and, in a worker, every tensor moved to shared memory at once. Torch would otherwise
    copy it there later, in the result queue's feeder thread, where a failure (a full /dev/shm,
    ``ulimit -f``: EFBIG) is only printed, the sample is lost and the main process waits for it
    forever; raised here, it reaches the main process as the worker's error."""
    sample = default_convert(sample)
    if get_worker_info() is not None:
        _share_tensors(sample)
    return sample


def _worker_failure(err: BaseException) -> str | None:
    """One line saying how a DataLoader worker failed, when ``err`` reports that; else None."""
    text = str(err)
    if "DataLoader worker" not in text:
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if text.startswith("Caught "):  # "Caught X in DataLoader worker process N. Original Traceback ...<last line>"
        return f"a DataLoader worker failed ({lines[-1]})"
    # "DataLoader worker (pid N) is killed by signal: Killed. <advice>" / "... exited unexpectedly ..."
    return lines[0].split(". ")[0].rstrip(".")


def _close_workers(samples: Any) -> None:
    """Shut a DataLoader iterator's workers down now (not when a traceback is freed). torch's
    SIGCHLD handler may meanwhile raise a worker's death again; it is already being handled."""
    shutdown = getattr(samples, "_shutdown_workers", None)  # absent without workers
    for _ in range(3):
        try:
            if shutdown is not None:
                shutdown()
            return
        except RuntimeError as err:
            if _worker_failure(err) is None:
                raise


def _feed_chunks(todo: Sequence[ImageRecord], loader: DataLoader, *, desc: str, chunk_size: int,
                 stats: ExtractStats, take: Callable, write: Callable) -> None:
    """Give each decoded image to ``take``; every ``chunk_size`` images (and at the end) call
    ``write(pending)`` with the chunk's ``(record, meta, error)`` triples. A DataLoader worker that
    raises or dies, or a sample lost on its way from one, ends the run with ExtractionError (one
    line; the worker's traceback goes to the log file); the chunks already written are kept."""
    pending: list[tuple[ImageRecord, Any, str]] = []
    samples, failure = None, None
    progress = tqdm(todo, desc=desc, unit="img", dynamic_ncols=True, leave=False)
    try:
        samples = iter(loader)
        for record in progress:
            try:
                payload, meta, error = next(samples)
            except Exception as err:
                if not loader.num_workers:
                    raise
                failure = err  # e.g. the worker died while handing its sample over (ConnectionResetError)
                break
            if error:
                logger.warning(f"skipped {error}")
                stats.failed.append(error)
            else:
                take(payload)
            pending.append((record, meta, error))
            if len(pending) >= chunk_size:
                write(pending)
                pending = []
        else:
            if pending:
                write(pending)
    except Exception as err:  # torch's SIGCHLD handler raises a worker's death wherever the main process is
        if _worker_failure(err) is None:
            raise
        failure = err
    finally:
        _close_workers(samples)
        progress.close()
    if failure is not None:
        reason = _worker_failure(failure) or f"a sample from a DataLoader worker was lost ({type(failure).__name__}: {failure})"
        logger.debug(f"{desc}: DataLoader worker failure:\n{failure}")
        raise ExtractionError(f"{desc}: {reason}; finished cache chunks are kept and the next run resumes "
                              "from them")


def extract_missing(stores: Sequence[FeatureStore], records: Sequence[ImageRecord], models: Sequence[LoadedModel], *,
                    batch_size: int, num_workers: int, chunk_size: int, desc: str = "extract") -> ExtractStats:
    """Encode every record that any store lacks, writing one chunk per ``chunk_size`` images to each.

    ``models[i]`` describes ``stores[i]``. The stores may hold several levels
    (each image is decoded once and its crops of every level are encoded
    together) and several blocks of one backbone (``model.with_layer``): one
    encoder pass fills them all. Crops of consecutive images fill whole batches.
    The model's fingerprint says how crops are made (src/patchify/crops.py ``crop_method``): by PIL in
    the DataLoader workers, or (``tensor``) cut from the decoded image on the model's device here.
    """
    stats = ExtractStats(desc=desc)
    todo = _todo(stores, records, stats)
    if not todo:
        return stats
    layers = sorted({m.fingerprint["layer"] for m in models})
    started = time.perf_counter()
    region = stores[0].region
    method = crop_method(models[0])
    cut = TensorCrops(models[0].data_config) if method != "pil" else None
    loader = DataLoader(_CropDataset(todo, sorted({s.level for s in stores}), region, models[0].data_config, method),
                        batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_collate_shared,
                        prefetch_factor=4 if num_workers else None)
    batches = CropBatches(models[0], layers, batch_size)  # preprocessed patches not yet encoded
    patches_done = 0

    def take(payload: Any) -> None:
        batches.add(payload if cut is None else cut(*payload, device=models[0].device))

    def write(pending: list) -> None:
        nonlocal patches_done
        encoded = batches.finish()
        by_layer = {layer: encoded[i].numpy() if encoded else None for i, layer in enumerate(layers)}
        boxes = np.concatenate([p[1][0] for p in pending])
        levels = np.concatenate([p[1][1] for p in pending])
        owner = np.repeat(np.arange(len(pending)), [len(p[1][1]) for p in pending])
        for store, model in zip(stores, models):
            rows = levels == store.level
            vectors = by_layer[model.fingerprint["layer"]]
            store.write_chunk(
                records=[p[0] for p in pending], counts=np.bincount(owner[rows], minlength=len(pending)).tolist(),
                vectors=vectors[rows] if vectors is not None else np.zeros((0, model.dim), np.float32),
                boxes=boxes[rows], errors=[p[2] for p in pending], dim=model.dim)
        patches_done += len(levels)

    _feed_chunks(todo, loader, desc=desc, chunk_size=chunk_size, stats=stats, take=take, write=write)
    stats.extracted = len(todo)
    stats.seconds = time.perf_counter() - started
    logger.info(f"{desc}: extracted {len(todo):,} images ({patches_done:,} patches) in {stats.seconds:.1f} s "
                f"({len(todo) / max(stats.seconds, 1e-9):.1f} img/s), reused {stats.reused:,} from "
                f"{', '.join(store.folder.name for store in stores)}")
    return stats


# ----------------------------------------------------------------------------- pool-mode extraction

def token_cells(rows: int, cols: int, levels: Sequence[int]) -> dict[int, list[tuple[int, int, int, int]]]:
    """Per level, its grid cells in token units (row0, row1, col0, col1), row-major like ``level_boxes``."""
    cells = {}
    for level in levels:
        r, c = grid_edges(rows, level + 1), grid_edges(cols, level + 1)
        cells[level] = [(int(r[i]), int(r[i + 1]), int(c[j]), int(c[j + 1]))
                        for i in range(level + 1) for j in range(level + 1)]
    return cells


class _WholeImageDataset(TorchDataset):
    """Image i -> (whole image preprocessed (3, S, S), (width, height), error message); with
    ``transform=None`` (``extract.crops=tensor``) the decoded image (3, H, W) uint8 instead. Pool mode
    cuts one square token grid: ``model.resize=long_side`` is refused with it (src/patchify/settings.py)."""

    def __init__(self, records: Sequence[ImageRecord], transform):
        self.records, self.transform = records, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        try:
            if self.transform is None:
                image = decode_rgb(self.records[index].path)
                return image, (image.shape[2], image.shape[1]), ""
            image = load_image(self.records[index].path)
        except DataError as err:
            return None, (0, 0), str(err)
        return self.transform(image), image.size, ""


def extract_pooled(stores: dict[int, FeatureStore], records: Sequence[ImageRecord], model: LoadedModel, *,
                   split_block: int, method: str = "split", cell_pos: str | None = None, batch_size: int, num_workers: int,
                   chunk_size: int, desc: str = "extract") -> ExtractStats:
    """Pool mode: every level's cells of an image from ONE encoder pass (``pool_cells.describe_cells``).

    The whole image is squashed to the model's input size; a level-l cell is
    the (l+1)x(l+1) grid cell of the token grid, and its box is that cell
    scaled back to the original pixels. ``batch_size`` counts whole images.
    """
    stats = ExtractStats(desc=desc)
    todo = _todo(list(stores.values()), records, stats)
    if not todo:
        return stats
    started = time.perf_counter()
    rows, cols = model.encoder.backbone.patch_embed.grid_size
    levels = sorted(stores)
    cells_by_level = token_cells(rows, cols, levels)
    cells = [cell for level in levels for cell in cells_by_level[level]]
    cut = TensorCrops(model.data_config) if crop_method(model) != "pil" else None  # the whole image as one cell
    loader = DataLoader(_WholeImageDataset(todo, model.transform if cut is None else None), batch_size=None,
                        shuffle=False, num_workers=num_workers, collate_fn=_collate_shared,
                        prefetch_factor=4 if num_workers else None)
    images: list[torch.Tensor] = []
    described: list[torch.Tensor] = []

    def encode_images() -> None:
        if images:
            batch = torch.stack(images).to(model.device)
            described.append(describe_cells(model.encoder, batch, cells,
                                                          split_block, method, cell_pos=cell_pos)[0].float().cpu())
            images.clear()

    def take(image: torch.Tensor) -> None:
        whole = [(0, 0, image.shape[2], image.shape[1])]
        images.append(image if cut is None else cut(image, whole, device=model.device)[0])
        if len(images) >= batch_size:
            encode_images()

    def write(pending: list) -> None:
        encode_images()
        vectors = torch.cat(described).numpy() if described else np.zeros((0, len(cells), model.dim), np.float32)
        sizes = [size for _, size, error in pending if not error]
        start = 0
        for level in levels:
            count = len(cells_by_level[level])
            cell = np.asarray(cells_by_level[level], np.float32)  # row0, row1, col0, col1
            boxes = [np.stack([cell[:, 2] * w / cols, cell[:, 0] * h / rows, (cell[:, 3] - cell[:, 2]) * w / cols,
                               (cell[:, 1] - cell[:, 0]) * h / rows], axis=1) for w, h in sizes]
            stores[level].write_chunk(
                records=[p[0] for p in pending], counts=[0 if p[2] else count for p in pending], vectors=vectors[:, start:start + count],
                boxes=np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32),
                errors=[p[2] for p in pending], dim=model.dim)
            start += count
        described.clear()

    _feed_chunks(todo, loader, desc=desc, chunk_size=chunk_size, stats=stats, take=take, write=write)
    stats.extracted = len(todo)
    stats.seconds = time.perf_counter() - started
    logger.info(f"{desc}: pooled {len(todo):,} images into {len(cells)} cells each (levels {levels}) in "
                f"{stats.seconds:.1f} s ({len(todo) / max(stats.seconds, 1e-9):.1f} img/s), reused {stats.reused:,}")
    return stats


def describe_images(records: Sequence[ImageRecord], model: LoadedModel, *, region: str = "full",
                    batch_size: int = 16) -> tuple[np.ndarray, list[str]]:
    """Global (level-0) descriptors of a few images, uncached (e.g. search queries).

    Returns (vectors (n_readable, d) in record order, error messages of unreadable images).
    Crops are made as the model's fingerprint says (``pil`` or ``tensor``), as for its index.
    """
    method = crop_method(model)
    dataset = _CropDataset(records, [0], region, model.data_config, method)
    cut = TensorCrops(model.data_config) if method != "pil" else None
    items = [dataset[i] for i in range(len(records))]
    errors = [error for _, _, error in items if error]
    batches = CropBatches(model, None, batch_size)
    for crops, _, error in items:
        if not error:
            batches.add(crops if cut is None else cut(*crops, device=model.device))
    encoded = batches.finish()
    return (encoded[0].numpy() if encoded else np.zeros((0, model.dim), np.float32)), errors
