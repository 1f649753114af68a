"""Tests for src/cache.py: content keys, atomic writes, npz loading, temp-file sweeping."""

from __future__ import annotations

import builtins
import errno
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

from src import cache
from src.cache import (
    CacheError,
    atomic_write_bytes,
    atomic_write_text,
    content_key,
    list_key,
    load_arrays,
    save_arrays,
    sweep_temporaries,
)

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


def test_sweep_temporaries_removes_only_temporaries(tmp_path):
    keep = ["chunk-000000.npz", "meta.json", "notes.tmp", ".hidden", "tmp-1"]
    drop = [".chunk-000001.npz.tmp-123", ".meta.json.tmp-99999"]
    for name in keep + drop:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".a.tmp-1").write_bytes(b"x")
    sweep_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep + ["sub"])
    assert (tmp_path / "sub" / ".a.tmp-1").exists()  # not recursive: only the given folder


def test_sweep_temporaries_on_missing_folder_is_a_no_op(tmp_path):
    sweep_temporaries(tmp_path / "absent")
    assert not (tmp_path / "absent").exists()


def test_killed_writer_leftover_is_swept_and_never_the_final_name(tmp_path):
    path = tmp_path / "chunk-000000.npz"
    leftover = cache._tmp_path(path)
    assert leftover.parent == tmp_path and leftover.name.startswith(".") and ".tmp-" in leftover.name
    leftover.write_bytes(b"half")
    assert not path.exists()
    sweep_temporaries(tmp_path)
    assert not leftover.exists()
