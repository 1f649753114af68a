"""Image identity: what an image *is*, as a hash of its file's bytes.

Feature caches, index keys and re-ranking caches identify an image by the
BLAKE2b digest of its bytes, never by its name, size or modification time:
two different photos with the same relative name, size and mtime in two
folders get their own features, the same photo in two albums is encoded once,
and no folder's cache entries evict another's.

Hashing reads every byte, so digests are memoised per file in a small table
(``DigestMemo``) keyed by the file's absolute path and its ``stat`` identity
(size, mtime, ctime, inode, device). ``ctime`` cannot be set from user space
(``touch -d`` sets mtime, and changes ctime), so an edited file never keeps
its memo entry; a miss only costs a re-hash. The memo is an optimisation: a
lost or deleted memo file is rebuilt, never trusted over the bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

from loguru import logger

from .cache import atomic_write_text, content_key, sweep_temporaries
from .tar_images import image_identity, open_image_file, stat_signature

DIGEST_SIZE = 16  # bytes: 128-bit BLAKE2b, 32 hex characters


def file_digest(path: Path, block: int = 1 << 20) -> str:
    """Hex BLAKE2b-128 of the file's (or tar member's, src/patchify/tar_images.py) bytes (OSError if it
    cannot be read)."""
    digest = hashlib.blake2b(digest_size=DIGEST_SIZE)
    with open_image_file(path) as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def stat_identity(path: Path) -> str:
    """What changes whenever a file's bytes may have changed: size, mtime, ctime, inode, device; for a
    member of a tar shard, its shard's, plus the member's offset and size (a rewritten shard is hashed again)."""
    member = image_identity(path)
    return member if member is not None else stat_signature(os.stat(path))


def region_key(digest: str, boxes: Sequence[Sequence[float]] | None) -> str:
    """Key of an image region: the digest alone for the whole image; digest + boxes for a box crop."""
    if not boxes:
        return digest
    return f"{digest}-{content_key({'boxes': [[round(float(v), 3) for v in box] for box in boxes]}, length=12)}"


class DigestMemo:
    """``path -> digest`` memo of one file collection, stored as JSON lines beside the feature caches
    (in memory only when ``folder`` is None).

    ``digests(paths)`` hashes only files whose stat identity changed since they
    were last hashed (or were never hashed); ``save()`` writes the memo when it
    learned something (atomically; a concurrent job's save may win, costing the
    other job's re-hash next time, never a wrong digest).
    """

    def __init__(self, folder: Path | None = None, collection: str = ""):
        self.path = None if folder is None else Path(folder) / f"{content_key({'collection': collection}, length=16)}.jsonl"
        self._known: dict[str, tuple[str, str]] = {}
        self._dirty = False
        self._loaded = False

    def _load(self) -> None:
        self._loaded = True
        if self.path is None:
            return
        try:
            lines = self.path.read_text().splitlines()
        except OSError:
            return
        for line in lines:
            try:
                path, identity, digest = json.loads(line)
            except (ValueError, TypeError):
                continue  # a damaged line only costs a re-hash
            self._known[path] = (identity, digest)

    def digest(self, path: Path) -> str | None:
        """Digest of ``path``'s bytes, or None when the file cannot be read (the decoder reports why)."""
        if not self._loaded:
            self._load()
        key = os.path.abspath(path)
        try:
            identity = stat_identity(path)
            known = self._known.get(key)
            if known and known[0] == identity:
                return known[1]
            digest = file_digest(path)
        except OSError:
            return None
        self._known[key] = (identity, digest)
        self._dirty = True
        return digest

    def digests(self, paths: Iterable[Path]) -> list[str | None]:
        return [self.digest(path) for path in paths]

    def save(self) -> None:
        """Write the memo if it learned new digests; a failure to write is logged, never fatal."""
        if not self._dirty or self.path is None:
            return
        text = "".join(json.dumps([path, identity, digest]) + "\n" for path, (identity, digest) in self._known.items())
        try:
            sweep_temporaries(self.path.parent)  # a killed save's leftover (only if its writer is gone)
            atomic_write_text(self.path, text)
            self._dirty = False
        except Exception as err:  # the memo only saves re-hashing
            logger.debug(f"digest memo not saved: {err}")


class ImageKeys:
    """Record -> content key of the image region a feature store describes (None: file unreadable)."""

    def __init__(self, memo: DigestMemo | None = None):
        self.memo = memo or DigestMemo()

    def key(self, record, region: str = "full") -> str | None:
        digest = self.memo.digest(record.path)
        if digest is None or region == "full":
            return digest
        return region_key(digest, record.boxes)

    def keys(self, records, region: str = "full") -> list[str | None]:
        return [self.key(record, region) for record in records]


#: Keys of callers that bring none (tests, scripts): hashed once per process, not saved.
DEFAULT_KEYS = ImageKeys()
