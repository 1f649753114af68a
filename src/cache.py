"""Cache: content keys and atomic files.

Every cached artefact (feature chunks, FAISS indices, manifests) is named by a
readable prefix plus a short hash of *every setting that changes its content*
(``content_key``), and is written to a temporary file in the same folder that
is then renamed over the final name (``os.replace`` is atomic on POSIX). A
killed run therefore leaves at most a ``.tmp-*`` file, which is never read and
is swept away by the next write into that folder.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np


class CacheError(RuntimeError):
    """A cache file is unusable (stale, truncated, foreign); one line naming the file."""


def content_key(fields: Mapping[str, Any], length: int = 12) -> str:
    """Short stable hash of a JSON-able mapping (key order does not matter)."""
    blob = json.dumps(fields, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha1(blob.encode()).hexdigest()[:length]


def list_key(items: list[str]) -> str:
    """Hash of an ordered list of strings (e.g. a gallery's image ids)."""
    digest = hashlib.sha1()
    for item in items:
        digest.update(item.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:12]


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write bytes to ``path`` via temp file + fsync + rename; no partial file survives."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        if err.errno == errno.ENOSPC:
            raise CacheError(f"{path}: no space left on device while writing the cache (nothing was replaced)") from None
        raise CacheError(f"{path}: cannot write cache file ({err.strerror or err})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """Save named arrays as an uncompressed .npz, atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_arrays(path: Path, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Load (some of) the arrays of an .npz written by ``save_arrays``; CacheError if truncated or corrupt."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in (archive.files if names is None else names)}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise CacheError(f"{path}: corrupt or truncated cache file ({type(err).__name__})") from None


def sweep_temporaries(folder: Path) -> None:
    """Remove temp files left by killed writers in ``folder``."""
    if Path(folder).is_dir():
        for leftover in Path(folder).glob(".*.tmp-*"):
            leftover.unlink(missing_ok=True)


def open_cache_folder(folder: Path, fingerprint: dict) -> None:
    """Create ``folder`` with a ``meta.json`` of ``fingerprint``, or check that an existing one
    matches (CacheError, one line, otherwise); sweep temporaries a killed writer left."""
    meta = Path(folder) / "meta.json"
    if meta.exists():
        try:
            stored = json.loads(meta.read_text())
        except ValueError:
            raise CacheError(f"{meta}: corrupt cache metadata; delete {folder} to rebuild") from None
        if stored != json.loads(json.dumps(fingerprint)):
            raise CacheError(f"{meta}: stale cache (built with other settings); delete {folder} to rebuild")
    else:
        atomic_write_text(meta, json.dumps(fingerprint, indent=1, sort_keys=True))
    sweep_temporaries(Path(folder))
