"""Images inside tar shards (WebDataset), read in place: a shard is never unpacked to disk.

ILIAS ships its YFCC100M distractors as WebDataset shards: uncompressed tar files whose members
``<key>.<ext>`` group into samples by key. ILIAS names a distractor ``<shard file name>/<key>``
(ilias-vrg/ilias, feature_extraction/src/datasets/generators.py ``merge_id_shard``: the basename of
the shard's URL, a slash, webdataset's ``__key__``), e.g. ``00042.tar/7731882``: no folder, no
extension, and only samples with a ``.jpg`` member are read there. Its evaluation's ``--check_ids``
accepts exactly those ids, so :func:`samples` derives keys as webdataset does
(``webdataset.tariterators``): regular members only, ``__*__`` metadata skipped, the key is the name
up to the first dot of its last component, the extension after it (lower-cased), consecutive
members with one key form one sample. A sample's image is its ``jpg`` member, else its first member
with another image extension (``png``, ``webp``...); other members (``json``, ``cls``, ``seg.png``)
are not images of the gallery.

Why ``tarfile`` and not the ``webdataset`` library: webdataset reads a shard start to end as a
stream (an ``IterableDataset``), which suits training but not this project's extraction, a
map-style DataLoader that asks for image *i* of a list, in any order, from any worker, and resumes
after a killed run at any image. ``tarfile`` lists an uncompressed shard's members with their data
offsets by reading the 512-byte headers only (it seeks over the data), so one pass per shard and
process builds a ``name -> (offset, size)`` index (:class:`ShardIndex`, kept in memory, checked
against the shard's size, mtime and inode at every read) and any member is then read with one seek.
A compressed shard (``.tar.gz``) cannot be read by offset; it is reported, not read.

Addressing: an image in a shard is the path ``<shard>/<member name>``
(``yfcc100m/00042.tar/7731882.jpg``), so a record's ``path`` names it like a file, manifests store it
relative to the dataset root, and error messages show where it is. The readers
(:func:`open_image_file`, :func:`read_image_bytes`, :func:`image_identity`) resolve such a path to
its member; any other path is an ordinary file (a *folder* named ``x.tar`` stays a folder).
"""

from __future__ import annotations

import io
import os
import re
import tarfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator, Sequence

TAR_SUFFIX = ".tar"
_META = re.compile(r"__[^/]*__($|/)")            # webdataset's skip_meta
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


class TarMemberError(OSError):
    """A member of a shard cannot be read (truncated shard); the message says why, without the path."""


@dataclass
class ShardIndex:
    """Where each member's bytes lie in one shard, listed once from its headers."""

    shard: Path
    identity: str                                  # shard size, mtime, ctime, inode, device when listed
    file_size: int
    members: dict[str, tuple[int, int]] = field(default_factory=dict)  # normalised name -> (offset, size)
    order: list[str] = field(default_factory=list)  # member names as stored, in shard order
    problem: str = ""                               # why the listing stopped early ('' when it did not)


_INDICES: dict[str, ShardIndex] = {}


def stat_signature(stat: os.stat_result) -> str:
    """What changes whenever a file's bytes may have changed: size, mtime, ctime, inode, device."""
    return f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}:{stat.st_ino}:{stat.st_dev}"


def _normalised(name: str) -> str:
    """A member name as a path below the shard spells it (``./a.jpg`` and ``a//b`` collapse as pathlib does)."""
    return PurePosixPath(name).as_posix()


def _list_members(shard: Path, stat: os.stat_result) -> ShardIndex:
    index = ShardIndex(shard=shard, identity=stat_signature(stat), file_size=stat.st_size)
    try:
        with tarfile.open(shard, mode="r:") as tar:  # uncompressed only: members must be addressable by offset
            while True:
                try:
                    info = tar.next()
                except tarfile.ReadError as err:  # a truncated shard: the last member's data ends past the file
                    index.problem = f"truncated or damaged shard, listing stopped ({err})"
                    break
                if info is None:
                    break
                name = PurePosixPath(info.name)
                if info.isreg() and not name.is_absolute() and ".." not in name.parts:  # never outside the shard
                    index.order.append(info.name)
                    index.members.setdefault(_normalised(info.name), (info.offset_data, info.size))
            end = tar.offset
        if not index.problem and end < stat.st_size:  # tarfile stops quietly at a header it cannot parse
            with open(shard, "rb") as handle:
                handle.seek(end)
                if handle.read(tarfile.BLOCKSIZE).strip(b"\0"):
                    index.problem = f"unreadable tar header at byte {end:,}; members after it are not listed"
    except tarfile.ReadError as err:
        raise TarMemberError(f"not an uncompressed tar file ({err})") from None
    return index


def shard_index(shard: Path) -> ShardIndex:
    """The member index of ``shard``, listed on first use in this process and again whenever the
    shard's size, mtime or inode changed (OSError when it cannot be read, TarMemberError when it is
    not an uncompressed tar)."""
    shard = Path(shard)
    key = os.path.abspath(shard)
    stat = os.stat(shard)
    known = _INDICES.get(key)
    if known is None or known.identity != stat_signature(stat):
        known = _INDICES[key] = _list_members(shard, stat)
    return known


def member_of(path: Path) -> tuple[Path, str] | None:
    """(shard, member name) when ``path`` names a member of a tar file (``<shard>.tar/<name>``), else None.
    Costs nothing for a path without a ``.tar`` component above it."""
    path = Path(path)
    if not any(part.lower().endswith(TAR_SUFFIX) for part in path.parts[:-1]):
        return None
    for parent in path.parents:
        if parent.name.lower().endswith(TAR_SUFFIX) and parent.is_file():
            return parent, path.relative_to(parent).as_posix()
    return None


def _locate(path: Path) -> tuple[ShardIndex, int, int] | None:
    """(shard index, offset, size) of the member ``path`` names; None for an ordinary path."""
    found = member_of(path)
    if found is None:
        return None
    shard, name = found
    index = shard_index(shard)
    if name not in index.members:
        raise FileNotFoundError(f"{path}: no member {name!r} in {shard}")
    offset, size = index.members[name]
    if offset + size > index.file_size:
        raise TarMemberError(f"member truncated: {max(index.file_size - offset, 0):,} of {size:,} bytes in the shard")
    return index, offset, size


class _MemberFile(io.RawIOBase):
    """A read-only, seekable view of ``size`` bytes at ``offset`` of an open file (one tar member)."""

    def __init__(self, handle: BinaryIO, offset: int, size: int, name: str):
        super().__init__()
        self._handle, self._offset, self._size, self._position = handle, offset, size, 0
        self.name = name

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, position: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(base + position, 0)
        return self._position

    def readinto(self, buffer) -> int:
        count = max(min(len(buffer), self._size - self._position), 0)
        if not count:
            return 0
        self._handle.seek(self._offset + self._position)
        got = self._handle.readinto(memoryview(buffer)[:count]) or 0
        self._position += got
        return got

    def close(self) -> None:
        if not self.closed:
            self._handle.close()
        super().close()


def open_image_file(path: Path) -> BinaryIO:
    """A binary, seekable file object of an image: the file itself, or the tar member ``path`` names.
    FileNotFoundError / OSError as ``open`` raises them; TarMemberError for a truncated member."""
    path = Path(path)
    located = _locate(path)
    if located is None:
        return open(path, "rb")
    index, offset, size = located
    return io.BufferedReader(_MemberFile(open(index.shard, "rb"), offset, size, str(path)))


@contextmanager
def image_source(path: Path) -> Iterator[Path | BinaryIO]:
    """What ``PIL.Image.open`` should read for ``path``: the path itself for an ordinary file (PIL opens
    it and names it in its errors, as ever), the open member for a tar member (errors as :func:`open_image_file`)."""
    path = Path(path)
    if member_of(path) is None:
        yield path
        return
    with open_image_file(path) as handle:
        yield handle


def image_file_size(path: Path) -> int:
    """Bytes of an image file or tar member (errors as :func:`open_image_file`)."""
    located = _locate(Path(path))
    return os.stat(path).st_size if located is None else located[2]


def read_image_bytes(path: Path) -> bytes:
    """All bytes of an image file or tar member (errors as :func:`open_image_file`)."""
    with open_image_file(path) as handle:
        return handle.read()


def image_identity(path: Path) -> str | None:
    """For a tar member: what changes whenever its bytes may have changed (its shard's size, mtime,
    ctime, inode and device, its offset and size); None for an ordinary path (OSError when unreadable)."""
    located = _locate(Path(path))
    if located is None:
        return None
    index, offset, size = located
    return f"{index.identity}:{offset}:{size}"


def image_exists(path: Path) -> bool:
    """Whether ``path`` is an existing file or a member of a readable shard."""
    path = Path(path)
    if path.exists():
        return True
    try:
        return _locate(path) is not None
    except (OSError, tarfile.TarError):
        return False


@dataclass(frozen=True)
class Sample:
    """One WebDataset sample's image: its key and the member holding the image."""

    key: str
    member: str


def samples(shard: Path, extensions: Sequence[str]) -> tuple[list[Sample], list[str]]:
    """The image of every sample of a WebDataset shard, in shard order, and one line per problem
    (duplicate key, a listing stopped by a truncated or damaged shard). ``extensions`` (lower case,
    no dot, in order of preference) are the image extensions; ``jpg`` should come first, as ILIAS
    reads only ``jpg``. OSError / TarMemberError when the shard cannot be listed at all."""
    index = shard_index(shard)
    groups: list[tuple[str, dict[str, str]]] = []
    for name in index.order:
        if ("/" not in name and name.startswith("__") and name.endswith("__")) or _META.match(name):
            continue
        match = _KEY_EXT.match(name)
        if match is None:
            continue
        key, extension = match.group(1), match.group(2).lower()
        if not groups or groups[-1][0] != key:
            groups.append((key, {}))
        groups[-1][1].setdefault(extension, name)
    found, problems, seen = [], [], set()
    for key, members in groups:
        image = next((members[e] for e in extensions if e in members), None)
        if image is None:
            continue
        if key in seen:
            problems.append(f"{Path(shard) / _normalised(image)}: key {key!r} repeats an earlier sample of the shard")
            continue
        seen.add(key)
        found.append(Sample(key, _normalised(image)))
    if index.problem:
        problems.append(f"{shard}: {index.problem}")
    return found, problems
