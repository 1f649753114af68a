"""Cache: content keys and atomic files.

Every cached artefact (feature chunks, FAISS indices, manifests) is named by a
readable prefix plus a short hash of *every setting that changes its content*
(``content_key``), and is written to a temporary file in the same folder that
is then renamed over the final name (``os.replace`` is atomic on POSIX). A
killed run therefore leaves at most a temporary ``.<name>.tmp-<host>-<pid>``
(``tmp_path_for``), which is never read. Several jobs may share one cache
folder (a Slurm sweep), so ``sweep_temporaries`` removes only temporaries
whose writer is gone: this host's with a pid that no longer runs, or another
host's (or a name without a host, from older versions) older than a day.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import mmap
import os
import re
import socket
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from filelock import FileLock, Timeout
from loguru import logger


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


HOST = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:64] or "host"
FOREIGN_TEMP_AGE_S = 24 * 3600  # another host's temporary older than this has no live writer
TEMP_NAME = re.compile(r"\.tmp-(?:(?P<host>[A-Za-z0-9_.-]+)-)?(?P<pid>[0-9]+)$")


def tmp_path_for(path: Path) -> Path:
    """The temporary this process writes before renaming it to ``path``: ``.<name>.tmp-<host>-<pid>``."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{HOST}-{os.getpid()}")


def discard(path: Path) -> None:
    """Remove ``path`` if possible; never raises (clean-up must not hide the error that caused it)."""
    try:
        Path(path).unlink(missing_ok=True)
    except OSError:
        pass


def _reason(err: OSError) -> str:
    return err.strerror or str(err) or type(err).__name__


def atomic_write(path: Path, write: Callable[[Path], None], what: str = "cache file",
                 error: type[Exception] = CacheError, hint: str = "") -> None:
    """``write(tmp)`` to this process's temporary (:func:`tmp_path_for`), fsync it, then rename it over ``path``:
    no partial file ever has ``path``'s name. An OS error is one ``error`` line naming ``path`` and ``what``
    (plus ``hint``), and the temporary is removed; the project's only atomic-write routine."""
    path = Path(path)
    tmp = tmp_path_for(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        discard(tmp)
        if err.errno == errno.ENOSPC:
            raise error(f"{path}: no space left on device while writing the {what} (nothing was replaced)"
                        f"{hint}") from None
        raise error(f"{path}: cannot write {what} ({_reason(err)}){hint}") from None
    except BaseException:
        discard(tmp)
        raise


def atomic_write_bytes(path: Path, data: bytes, what: str = "cache file") -> None:
    """Write bytes to ``path`` atomically (:func:`atomic_write`)."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)

    atomic_write(path, write, what)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """Save named arrays as an uncompressed .npz, atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def read_at_random(mapped: np.ndarray) -> np.ndarray:
    """Tell the kernel a memory-mapped array is read at random rows (``MADV_RANDOM``), and return it.

    A search reads a few rows (its shortlist's codes, its results' boxes and paths), each within a page or
    two; when the file is not cached, the default readahead around each page fault reads from disk many
    pages no search asked for."""
    mapping = getattr(mapped, "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_RANDOM"):
        mapping.madvise(mmap.MADV_RANDOM)
    return mapped


def load_arrays(path: Path, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Load (some of) the arrays of an .npz written by ``save_arrays``; CacheError if truncated or corrupt."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in (archive.files if names is None else names)}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise CacheError(f"{path}: corrupt or truncated cache file ({type(err).__name__})") from None


def _pid_alive(pid: int) -> bool:
    """True unless no process ``pid`` runs on this host (another user's process counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, ValueError):
        return False
    except OSError:  # PermissionError: alive, owned by someone else
        return True
    return True


def writer_gone(path: Path, now: float | None = None) -> bool:
    """True when ``path`` is a temporary (``tmp_path_for``, or an older ``<name>.tmp-<pid>``) whose
    writer cannot still be writing it: this host's with a pid that no longer runs, or another
    host's, or one without a host, last changed more than ``FOREIGN_TEMP_AGE_S`` ago."""
    match = TEMP_NAME.search(Path(path).name)
    if match is None or int(match["pid"]) <= 0:
        return False
    if match["host"] == HOST:
        return not _pid_alive(int(match["pid"]))
    try:
        info = os.lstat(path)
    except OSError:
        return False
    changed = max(info.st_mtime, info.st_ctime)  # ctime: a hard-linked temporary keeps its source's mtime
    return (time.time() if now is None else now) - changed > FOREIGN_TEMP_AGE_S


def sweep_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries in ``folder`` (not below it) whose writer is gone (``writer_gone``);
    a live job's temporary is kept. Never raises (a read-only folder keeps its leftovers).
    Returns the removed paths."""
    removed = []
    try:
        candidates = [p for p in Path(folder).iterdir() if ".tmp-" in p.name]
    except OSError:
        return removed
    for leftover in candidates:
        try:
            if leftover.is_file() and not leftover.is_symlink() and writer_gone(leftover):
                leftover.unlink()
                removed.append(leftover)
        except OSError:
            pass
    return removed


@contextmanager
def file_lock(path: Path, what: str, hint: str, error: type[Exception] = CacheError) -> Iterator[None]:
    """Hold the inter-process lock file ``path`` (filelock; made with its folder if missing) while
    ``what`` runs, saying so when another job holds it. ``error`` (one line naming the lock file,
    the reason and ``hint``, e.g. "choose a writable folder with paths.indices=DIR") if it cannot
    be made."""
    path = Path(path)
    lock = FileLock(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            logger.info(f"waiting for another job {what} ({path})")
            lock.acquire()
    except OSError as err:
        raise error(f"{path}: cannot create the lock file ({_reason(err)}); {hint}") from None
    try:
        yield
    finally:
        lock.release()


def check_writable(folder: Path, setting: str = "paths.features") -> None:
    """CacheError (one line naming ``folder``, the reason and ``setting``) unless a file can be
    created in ``folder`` (made if missing); the probe is a temporary removed at once."""
    folder = Path(folder)
    probe = tmp_path_for(folder / "write-probe")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"probe")
    except OSError as err:
        raise CacheError(f"{folder}: cache folder is not writable ({_reason(err)}); "
                         f"choose another with {setting}=DIR") from None
    finally:
        discard(probe)


def open_cache_folder(folder: Path, fingerprint: dict, setting: str = "paths.features") -> None:
    """Create ``folder`` with a ``meta.json`` of ``fingerprint``, or check that an existing one
    matches (CacheError, one line, otherwise); sweep temporaries a killed writer left. A folder
    that cannot be created is a CacheError naming it and ``setting``."""
    meta = Path(folder) / "meta.json"
    try:
        exists = meta.exists()
    except OSError as err:
        raise CacheError(f"{folder}: cannot read the cache folder ({_reason(err)}); "
                         f"choose another with {setting}=DIR") from None
    if exists:
        try:
            stored = json.loads(meta.read_text())
        except ValueError:
            if not Path(folder).name.endswith(f"-{content_key(fingerprint)}"):
                raise CacheError(f"{meta}: corrupt cache metadata; delete {folder} to rebuild") from None
            # The folder's name carries the hash of these settings: rewrite the file, keep every chunk.
            logger.warning(f"{meta}: corrupt cache metadata; rewritten from the settings this folder is named by")
            atomic_write_text(meta, json.dumps(fingerprint, indent=1, sort_keys=True))
            stored = fingerprint
        except OSError as err:
            raise CacheError(f"{meta}: cannot read cache metadata ({_reason(err)})") from None
        if stored != json.loads(json.dumps(fingerprint)):
            raise CacheError(f"{meta}: stale cache (built with other settings); delete {folder} to rebuild")
    else:
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise CacheError(f"{folder}: cannot create the cache folder ({_reason(err)}); "
                             f"choose a writable one with {setting}=DIR") from None
        try:
            atomic_write_text(meta, json.dumps(fingerprint, indent=1, sort_keys=True))
        except CacheError as err:
            raise CacheError(f"{err}; choose a writable cache folder with {setting}=DIR") from None
    sweep_temporaries(Path(folder))
