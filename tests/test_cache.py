"""Tests for src/patchify/cache.py: content keys, atomic writes, npz loading, temp-file sweeping, unwritable folders."""

from __future__ import annotations

import builtins
import errno
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from patchify import cache
from patchify.cache import (
    CacheError,
    atomic_write_bytes,
    atomic_write_text,
    check_writable,
    content_key,
    list_key,
    load_arrays,
    open_cache_folder,
    save_arrays,
    sweep_temporaries,
)

ROOT = Path(__file__).resolve().parent.parent

FIELDS = {"model": {"timm_name": "test_vit", "tag": None, "layer": -1, "preprocess": {"input_size": [3, 160, 160]}},
          "level": 3, "mode": "crop", "precision": "fp32"}


def _temporaries(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp-*"))


# ----------------------------------------------------------------------------- keys


def test_content_key_is_stable_under_key_order():
    reordered = {"precision": "fp32", "mode": "crop", "level": 3,
                 "model": {"preprocess": {"input_size": [3, 160, 160]}, "layer": -1, "tag": None,
                           "timm_name": "test_vit"}}
    key = content_key(FIELDS)
    assert key == content_key(reordered) == content_key(dict(FIELDS))
    assert len(key) == 12 and all(c in "0123456789abcdef" for c in key)
    assert len(content_key(FIELDS, length=20)) == 20 and content_key(FIELDS, length=20).startswith(key)


@pytest.mark.parametrize("change", [
    {"level": 2},
    {"mode": "pool"},
    {"precision": "fp16"},
    {"model": {**FIELDS["model"], "layer": 5}},
    {"model": {**FIELDS["model"], "tag": "webli"}},
    {"model": {**FIELDS["model"], "preprocess": {"input_size": [3, 224, 224]}}},
    {"model": {**FIELDS["model"], "preprocess": {"input_size": [3, 160, 161]}}},
    {"level": "3"},     # type matters
    {"level": 3.5},
    {"extra": None},    # an added field
])
def test_content_key_differs_on_any_value_change(change):
    assert content_key({**FIELDS, **change}) != content_key(FIELDS)


def test_content_key_removed_field_and_list_order():
    assert content_key({k: v for k, v in FIELDS.items() if k != "mode"}) != content_key(FIELDS)
    assert content_key({"a": [1, 2]}) != content_key({"a": [2, 1]})


def test_content_key_is_a_fixed_function():
    # The key names cache folders on disk: it must not change between runs or versions.
    assert content_key({"a": 1, "b": [1, 2]}) == content_key({"b": [1, 2], "a": 1})
    assert content_key({"b": 2, "a": 1}) == hashlib.sha1(b'{"a":1,"b":2}').hexdigest()[:12]


def test_list_key_is_order_sensitive_and_unambiguous():
    assert list_key(["a", "b"]) == list_key(["a", "b"])
    assert list_key(["a", "b"]) != list_key(["b", "a"])
    assert list_key(["ab", "c"]) != list_key(["a", "bc"])
    assert list_key([]) != list_key([""])


# ----------------------------------------------------------------------------- atomic writes


def test_atomic_write_creates_folders_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "deep" / "er" / "file.bin"
    atomic_write_bytes(path, b"payload")
    assert path.read_bytes() == b"payload"
    atomic_write_text(path, "replaced ✓")
    assert path.read_text(encoding="utf-8") == "replaced ✓"
    assert _temporaries(path.parent) == []
    assert sorted(p.name for p in path.parent.iterdir()) == ["file.bin"]


def test_atomic_write_no_space_on_replace_keeps_old_content(tmp_path, monkeypatch):
    path = tmp_path / "index.faiss"
    path.write_bytes(b"previous")

    def full_disk(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cache.os, "replace", full_disk)
    with pytest.raises(CacheError, match="no space left") as err:
        atomic_write_bytes(path, b"new content")
    assert str(path) in str(err.value)
    assert path.read_bytes() == b"previous"
    assert _temporaries(tmp_path) == []


def test_atomic_write_no_space_while_writing(tmp_path, monkeypatch):
    path = tmp_path / "chunk-000000.npz"
    path.write_bytes(b"previous")
    real_open = builtins.open

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            self.handle.write(data[: len(data) // 2])  # half written, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.handle, name)

    def fake_open(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        return FullDisk(handle) if ".tmp-" in str(file) else handle

    monkeypatch.setattr(builtins, "open", fake_open)
    with pytest.raises(CacheError, match="no space left"):
        atomic_write_bytes(path, b"x" * 1000)
    monkeypatch.undo()
    assert path.read_bytes() == b"previous"
    assert _temporaries(tmp_path) == []


def test_atomic_write_no_space_on_fsync_of_new_file(tmp_path, monkeypatch):
    path = tmp_path / "meta.json"

    def fail(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache.os, "fsync", fail)
    with pytest.raises(CacheError, match="no space left"):
        atomic_write_text(path, "{}")
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_other_os_error(tmp_path, monkeypatch):
    path = tmp_path / "x.bin"
    path.write_bytes(b"old")

    def denied(src, dst):
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(cache.os, "replace", denied)
    with pytest.raises(CacheError, match="cannot write cache file") as err:
        atomic_write_bytes(path, b"new")
    assert "Permission denied" in str(err.value) and str(path) in str(err.value)
    assert path.read_bytes() == b"old" and _temporaries(tmp_path) == []


def test_atomic_write_interrupted_removes_temporary(tmp_path, monkeypatch):
    path = tmp_path / "x.bin"
    path.write_bytes(b"old")

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(cache.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old" and _temporaries(tmp_path) == []


# ----------------------------------------------------------------------------- arrays


def test_save_and_load_arrays_round_trip(tmp_path):
    arrays = {"vectors": np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32),
              "ids": np.asarray(["a/b.jpg", "c.jpg"], dtype=str), "offsets": np.arange(3, dtype=np.int64)}
    path = tmp_path / "chunk.npz"
    save_arrays(path, **arrays)
    loaded = load_arrays(path)
    assert set(loaded) == set(arrays)
    for name, value in arrays.items():
        assert loaded[name].dtype == value.dtype and np.array_equal(loaded[name], value)
    assert _temporaries(tmp_path) == []


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.1])
def test_load_arrays_truncated(tmp_path, cut):
    path = tmp_path / "chunk-000001.npz"
    save_arrays(path, vectors=np.ones((200, 16), np.float32), ids=np.asarray(["x"] * 200))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(CacheError, match="corrupt or truncated") as err:
        load_arrays(path)
    assert str(err.value).startswith(str(path))


@pytest.mark.parametrize("content", [b"", b"not a zip file at all", b"PK\x03\x04garbage"])
def test_load_arrays_garbage(tmp_path, content):
    path = tmp_path / "chunk.npz"
    path.write_bytes(content)
    with pytest.raises(CacheError) as err:
        load_arrays(path)
    assert str(path) in str(err.value)


def test_load_arrays_corrupted_payload(tmp_path):
    path = tmp_path / "chunk.npz"
    save_arrays(path, vectors=np.arange(4000, dtype=np.float32))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip a byte inside the array data: the zip CRC must catch it
    path.write_bytes(bytes(data))
    with pytest.raises(CacheError) as err:
        load_arrays(path)
    assert str(path) in str(err.value)


def test_load_arrays_refuses_pickled_objects(tmp_path):
    path = tmp_path / "chunk.npz"
    np.savez(path, things=np.asarray([{"a": 1}], dtype=object))
    with pytest.raises(CacheError):
        load_arrays(path)


# ----------------------------------------------------------------------------- sweeping


def _dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_tmp_path_for_names_host_and_pid(tmp_path):
    tmp = cache.tmp_path_for(tmp_path / "chunk-000000.npz")
    assert tmp.parent == tmp_path
    assert tmp.name == f".chunk-000000.npz.tmp-{cache.HOST}-{os.getpid()}"
    match = cache.TEMP_NAME.search(tmp.name)
    assert match["host"] == cache.HOST and int(match["pid"]) == os.getpid()


def test_sweep_removes_only_temporaries_whose_writer_is_gone(tmp_path, monkeypatch):
    dead = _dead_pid()
    keep = ["chunk-000000.npz", "meta.json", "notes.tmp", ".hidden", "tmp-1", f".a.tmp-{cache.HOST}-x1",
            f".live.npz.tmp-{cache.HOST}-{os.getpid()}",   # this process: a live writer
            f".other.npz.tmp-node-17.cluster-{dead}",      # another host's, fresh: its writer may be alive
            f"x.faiss.tmp-{dead}", f".gallery.npz.tmp-{dead}"]  # older names without a host, fresh
    drop = [f".chunk-000001.npz.tmp-{cache.HOST}-{dead}"]      # this host, writer gone
    for name in keep + drop:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / f".a.tmp-{cache.HOST}-{dead}").write_bytes(b"x")
    assert sweep_temporaries(tmp_path) == [tmp_path / name for name in drop]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep + ["sub"])
    assert (tmp_path / "sub" / f".a.tmp-{cache.HOST}-{dead}").exists()  # not recursive: only the given folder

    monkeypatch.setattr(cache, "FOREIGN_TEMP_AGE_S", -1.0)  # as if a day had passed
    sweep_temporaries(tmp_path)
    foreign = {f".other.npz.tmp-node-17.cluster-{dead}", f"x.faiss.tmp-{dead}", f".gallery.npz.tmp-{dead}"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(keep) - foreign | {"sub"})


def test_sweep_temporaries_on_missing_folder_is_a_no_op(tmp_path):
    assert sweep_temporaries(tmp_path / "absent") == []
    assert not (tmp_path / "absent").exists()


def test_sweep_never_raises_when_it_cannot_remove(tmp_path, monkeypatch):
    leftover = tmp_path / f".chunk.npz.tmp-{cache.HOST}-{_dead_pid()}"
    leftover.write_bytes(b"x")

    def read_only(self, missing_ok=False):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(Path, "unlink", read_only)
    assert sweep_temporaries(tmp_path) == []
    monkeypatch.undo()
    assert leftover.exists()


_WRITER = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from patchify.cache import tmp_path_for
path = Path(sys.argv[2])
tmp = tmp_path_for(path)
tmp.write_bytes(b"half written")
print(tmp, flush=True)
if sys.argv[3] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
sys.stdin.read()  # until the test lets it go on
os.replace(tmp, path)
"""


def _writer(path: Path, mode: str) -> tuple[subprocess.Popen, Path]:
    child = subprocess.Popen([sys.executable, "-c", _WRITER, str(ROOT / "src"), str(path), mode], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    return child, Path(child.stdout.readline().strip())


def test_killed_writer_leftover_is_swept_and_never_the_final_name(tmp_path):
    path = tmp_path / "chunk-000000.npz"
    child, leftover = _writer(path, "kill")
    assert child.wait() == -9
    assert leftover.parent == tmp_path and leftover.name.startswith(".") and leftover.exists()
    assert not path.exists()
    assert sweep_temporaries(tmp_path) == [leftover]
    assert not leftover.exists()


def test_another_jobs_temporary_survives_opening_the_folder(tmp_path):
    """Two jobs share one cache folder: the second opening it must not sweep the first's
    temporary, whose rename would then fail."""
    folder = tmp_path / "store"
    open_cache_folder(folder, {"a": 1})
    path = folder / "chunk-0001-000000.npz"
    child, tmp = _writer(path, "wait")
    open_cache_folder(folder, {"a": 1})  # the second job
    assert tmp.exists()
    child.stdin.close()
    assert child.wait() == 0
    assert path.read_bytes() == b"half written" and not tmp.exists()


# ----------------------------------------------------------------------------- unwritable folders


def test_check_writable_leaves_nothing(tmp_path):
    check_writable(tmp_path / "new" / "store")
    assert list((tmp_path / "new" / "store").iterdir()) == []


def test_check_writable_names_the_folder_and_the_setting(tmp_path, monkeypatch):
    real_open = builtins.open

    def read_only(file, mode="r", *args, **kwargs):
        if "w" in mode and ".tmp-" in str(file):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", read_only)
    with pytest.raises(CacheError) as err:
        check_writable(tmp_path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(tmp_path))
    assert "Read-only file system" in message and "paths.features=DIR" in message


def test_unwritable_cache_folder_is_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(CacheError) as err:
        open_cache_folder(blocker / "store", {"a": 1})
    message = str(err.value)
    assert "\n" not in message and str(blocker / "store") in message and "paths.features=DIR" in message
    with pytest.raises(CacheError, match="not writable"):
        check_writable(blocker / "store")
    with pytest.raises(CacheError, match="cannot write cache file"):
        atomic_write_text(blocker / "store" / "meta.json", "{}")


def test_read_only_folder_with_everything_cached_still_opens(tmp_path, monkeypatch):
    folder = tmp_path / "store"
    open_cache_folder(folder, {"a": 1})
    leftover = folder / f".chunk.npz.tmp-{cache.HOST}-{_dead_pid()}"
    leftover.write_bytes(b"x")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(Path, "unlink", read_only)
    monkeypatch.setattr(cache.os, "replace", read_only)
    open_cache_folder(folder, {"a": 1})  # reads meta.json; the sweep cannot remove and says nothing
    monkeypatch.undo()
    assert leftover.exists()
