"""Faults and concurrency: a writer killed at each atomic replace in turn, jobs sharing one
feature cache, two jobs unpacking one package, DataLoader workers that fail or die, read-only
folders. What must hold: the next run resumes (same results as an uninterrupted run) or refuses
in one line; nothing hangs; no traceback for a fault the user can fix."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config
from fixtures import make_ilias_fixture
from loguru import logger
from torch.utils.data import DataLoader, Dataset

from patchify import assets, extraction, weights
from patchify.assets import AssetError, pip_package
from patchify.cache import HOST, CacheError, atomic_write_bytes, tmp_path_for
from patchify.console import is_user_error
from patchify.extraction import ExtractionError, ExtractStats
from patchify.index import IndexConfigError, write_index
from patchify.pipeline import run

ROOT = Path(__file__).resolve().parent.parent
SRC = str(ROOT / "src") + os.sep
REAL_REPLACE = os.replace


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A tiny ILIAS-layout folder (2 instances x 2 positives, 2 distractors): 2 queries, 6 gallery images."""
    return make_ilias_fixture(tmp_path_factory.mktemp("faults"), instances=2, positives=2, distractors=2)


def _common(work: Path) -> list[str]:
    return ["experiment=smoke", "pyramid.level=1", f"paths.features={work / 'features'}",
            f"paths.indices={work / 'indices'}", f"paths.logs={work / 'logs'}"]


def _eval_overrides(work: Path, photos: Path) -> list[str]:
    return [*_common(work), "task=eval", f"dataset.root={photos}", "dataset.generate=null", "dataset.name=fixture"]


def _index_overrides(work: Path, photos: Path) -> list[str]:
    return [*_common(work), "task=index", "dataset=folder", f"dataset.root={photos}"]


def _search(work: Path, root: Path, queries: Path, name: str) -> list:
    """task=search of the index of folder ``root`` with every image under ``queries``;
    (query, [(id, score), ...]) per query."""
    cfg = compose_config([*_common(work), "task=search", "dataset=folder", f"dataset.root={root}",
                          f"query.path={queries}"])
    run(cfg, work / name)
    found = json.loads((work / name / "search.json").read_text())
    return [(q["query"], [(r["id"], r["score"]) for r in q["results"]]) for q in found["queries"]]


def _eval_results(run_dir: Path) -> tuple[dict, list]:
    """Metrics (without timings and extract/reuse counts) and per query the ranked ids and scores."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.pop("timing")
    counts = metrics.pop("counts")
    metrics["gallery_patches"] = counts["gallery_patches"]
    ranked = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    return metrics, [(r["query_id"], r["ids"], r["scores"]) for r in ranked]


def _same_search(got: list, want: list) -> bool:
    return [(q, [i for i, _ in hits]) for q, hits in got] == [(q, [i for i, _ in hits]) for q, hits in want] and all(
        np.allclose([s for _, s in g], [s for _, s in w], atol=2e-4) for (_, g), (_, w) in zip(got, want))


def _same_eval(got: tuple, want: tuple) -> bool:
    (got_metrics, got_ranked), (want_metrics, want_ranked) = got, want
    return got_metrics == want_metrics and [(q, ids) for q, ids, _ in got_ranked] == [
        (q, ids) for q, ids, _ in want_ranked] and all(
        np.allclose(g, w, atol=1e-5) for (_, _, g), (_, _, w) in zip(got_ranked, want_ranked))


# ----------------------------------------------------------------------------- a writer killed at each replace


class InjectedKill(BaseException):
    """The process 'dies' at an atomic replace (a BaseException: no error handler takes it; the
    temporary is not renamed, exactly as when a job is killed just before ``os.replace``)."""


def _replace_site(destination) -> tuple | None:
    """Where a replace comes from: the project's calling functions and the kind of file replaced."""
    frames, frame = [], sys._getframe(2)
    while frame is not None and len(frames) < 4:
        if frame.f_code.co_filename.startswith(SRC):
            frames.append(f"{Path(frame.f_code.co_filename).stem}.{frame.f_code.co_name}")
        frame = frame.f_back
    if not frames:
        return None
    return (*frames, re.sub(r"[0-9a-f]{6,}|[0-9]+", "#", Path(destination).name))


class ReplaceFault:
    """``os.replace`` that records the project's replaces (site, and whether the file is in the
    run's own folder, ``run_dir``) and raises InjectedKill at the ``fail_at``-th."""

    def __init__(self, run_dir: Path, fail_at: int | None = None):
        self.sites: list[tuple] = []
        self.in_run_dir: list[bool] = []
        self.run_dir, self.fail_at = str(run_dir) + os.sep, fail_at

    def __call__(self, src, dst, **kwargs):
        site = _replace_site(dst)
        if site is not None:
            self.sites.append(site)
            self.in_run_dir.append(os.fspath(dst).startswith(self.run_dir))
            if len(self.sites) == self.fail_at:
                raise InjectedKill(f"killed at replace {self.fail_at}: {site}")
        return REAL_REPLACE(src, dst, **kwargs)


def _kill_points(counter: ReplaceFault) -> list[int]:
    """1-based numbers of the first replace of each distinct site, and of the last one, leaving out
    the files of the run's own folder (config.yaml, metrics.json, ...: no later run reads them)."""
    first: dict[tuple, int] = {}
    for number, site in enumerate(counter.sites, 1):
        first.setdefault(site, number)
    last = max(n for n in range(1, len(counter.sites) + 1) if not counter.in_run_dir[n - 1])
    return sorted(n for n in set(first.values()) | {last} if not counter.in_run_dir[n - 1])


class _Compared:
    """Results whose ``==`` is the tolerant comparison ``same``."""

    def __init__(self, value, same):
        self.value, self.same = value, same

    def __eq__(self, other):
        return self.same(self.value, other.value)


def _kill_at_each_replace(tmp_path, monkeypatch, overrides, results, prepare=None,
                          after_kill=None) -> tuple[int, list[str]]:
    """Count the project's replaces in an uninterrupted run of ``overrides(work)`` (after
    ``prepare(work)``); then, for each distinct one, a run killed there, ``after_kill(work,
    reference)`` (a problem or None), the same run without the fault, and ``results(work, run_dir)``
    compared with the uninterrupted run's (``reference``). Returns (how many resumed, problems)."""
    for work in [tmp_path / "reference"] if prepare else []:
        prepare(work)
    counter = ReplaceFault(tmp_path / "reference" / "run")
    monkeypatch.setattr(os, "replace", counter)
    run(compose_config(overrides(tmp_path / "reference")), tmp_path / "reference" / "run")
    monkeypatch.setattr(os, "replace", REAL_REPLACE)
    reference = results(tmp_path / "reference", tmp_path / "reference" / "run")
    resumed, problems = 0, []
    for number in _kill_points(counter):
        work, site = tmp_path / f"killed-at-{number}", counter.sites[number - 1]
        if prepare:
            prepare(work)
        monkeypatch.setattr(os, "replace", ReplaceFault(work / "killed", fail_at=number))
        with pytest.raises(InjectedKill):
            run(compose_config(overrides(work)), work / "killed")
        monkeypatch.setattr(os, "replace", REAL_REPLACE)
        problem = after_kill(work, reference) if after_kill else None
        if problem:
            problems.append(f"killed at {number} {site}: {problem}")
        try:
            run(compose_config(overrides(work)), work / "run")
        except Exception as err:  # refusing in one line is allowed
            if not is_user_error(err) or "\n" in str(err):
                problems.append(f"killed at {number} {site}: the next run failed: {type(err).__name__}: {err}")
            continue
        if results(work, work / "run") == reference:
            resumed += 1
        else:
            problems.append(f"killed at {number} {site}: results differ from an uninterrupted run's")
    return resumed, problems


def test_index_killed_at_each_replace_resumes_or_refuses(tmp_path, monkeypatch, photos):
    resumed, problems = _kill_at_each_replace(
        tmp_path, monkeypatch, lambda work: _index_overrides(work, photos),
        lambda work, run_dir: _Compared(_search(work, photos, photos / "ilias_core", "search"), _same_search))
    assert not problems, "\n".join(problems)
    assert resumed >= 3


def test_reindex_killed_at_each_replace_never_mixes_bundles(tmp_path, monkeypatch, photos):
    """The issue's case: a folder indexed, one photo renamed and one added, re-indexed and killed
    (e.g. between the index and the gallery of the bundle): the next search must not mix them."""
    gallery = sorted(photos.glob("ilias_core/*/pos/*.jpg")) + sorted(photos.glob("distractors/*.jpg"))
    queries = photos / "ilias_core"

    def indexed_then_changed(work: Path, change: bool = True) -> None:
        folder = work / "photos"
        folder.mkdir(parents=True)
        for path in gallery[:4]:
            (folder / path.name).write_bytes(path.read_bytes())
        run(compose_config(_index_overrides(work, folder)), work / "first")
        if change:
            (folder / gallery[0].name).rename(folder / f"renamed-{gallery[0].name}")
            (folder / gallery[4].name).write_bytes(gallery[4].read_bytes())

    def search(work: Path, name: str) -> _Compared:
        return _Compared(_search(work, work / "photos", queries, name), _same_search)

    indexed_then_changed(tmp_path / "before", change=False)
    before = search(tmp_path / "before", "search")

    def search_after_kill(work: Path, after: _Compared) -> str | None:
        """The killed re-index leaves the previous bundle, or refuses in one line: never a mix."""
        try:
            found = search(work, "search-after-kill")
        except Exception as err:
            return None if is_user_error(err) and "\n" not in str(err) else f"search failed: {err!r}"
        return None if found == before or found == after else "a search mixed the previous and the new bundle"

    resumed, problems = _kill_at_each_replace(
        tmp_path, monkeypatch, lambda work: _index_overrides(work, work / "photos"),
        lambda work, run_dir: search(work, "search"), prepare=indexed_then_changed, after_kill=search_after_kill)
    assert not problems, "\n".join(problems)
    assert resumed >= 3


def test_eval_killed_at_each_replace_resumes_or_refuses(tmp_path, monkeypatch, photos):
    resumed, problems = _kill_at_each_replace(
        tmp_path, monkeypatch, lambda work: _eval_overrides(work, photos),
        lambda work, run_dir: _Compared(_eval_results(run_dir), _same_eval))
    assert not problems, "\n".join(problems)
    assert resumed >= 3


# ----------------------------------------------------------------------------- jobs sharing one feature cache


def test_four_jobs_extracting_into_one_cache_match_a_single_job(tmp_path, photos):
    shared = tmp_path / "shared"
    jobs = [subprocess.Popen([sys.executable, "main.py", *_common(shared), f"paths.logs={tmp_path / f'logs{j}'}",
                              "task=extract", f"dataset.root={photos}", "dataset.generate=null", "dataset.name=fixture",
                              "extract.chunk_size=1"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for j in range(4)]  # started together; each extracts every image (the most overlap)
    outputs = [job.communicate(timeout=600)[0] for job in jobs]
    for job, output in zip(jobs, outputs):
        assert job.returncode == 0, output[-3000:]

    run(compose_config(_eval_overrides(shared, photos)), tmp_path / "eval-shared")
    single = tmp_path / "single"
    run(compose_config(_eval_overrides(single, photos)), tmp_path / "eval-single")
    assert _same_eval(_eval_results(tmp_path / "eval-shared"), _eval_results(tmp_path / "eval-single"))
    assert json.loads((tmp_path / "eval-shared" / "metrics.json").read_text())["counts"]["extracted_images"] == 0
    stores = [p for p in (shared / "features").iterdir() if (p / "meta.json").is_file()]
    assert stores and not [p for store in stores for p in store.iterdir() if ".tmp-" in p.name]


# ----------------------------------------------------------------------------- packages unpacked by two jobs


def _fake_pip(downloads: list, go_on: threading.Event):
    """Stands for ``pip download``: writes a small wheel once ``go_on`` is set (or after 20 s)."""

    def fake_run(cmd, **kwargs):
        downloads.append(cmd)
        go_on.wait(timeout=20)
        wheels = Path(cmd[cmd.index("-d") + 1])
        wheels.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels / "fake_pkg-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr("fake_pkg/data.txt", "hello")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return types.SimpleNamespace(run=fake_run, CompletedProcess=subprocess.CompletedProcess)


def test_two_jobs_unpacking_one_package_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("PATCHIFY_ASSETS", str(tmp_path / "assets"))
    leftover = tmp_path / "assets" / "pip" / ".fake-pkg-1.0.k1lled_0"  # a temporary folder a killed job left
    leftover.mkdir(parents=True)
    downloads: list = []
    other_waits = threading.Event()  # set when the second job says it waits for the first
    monkeypatch.setattr(assets, "subprocess", _fake_pip(downloads, other_waits))
    sink = logger.add(lambda m: other_waits.set() if "waiting for another job" in m.record["message"] else None,
                      level="INFO")
    results, errors = [None, None], []

    def job(i: int) -> None:
        try:
            results[i] = pip_package("fake-pkg==1.0")
        except BaseException as err:  # noqa: BLE001 (reported below)
            errors.append(err)

    threads = [threading.Thread(target=job, args=(i,)) for i in range(2)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    finally:
        logger.remove(sink)
    assert not errors, errors
    target = tmp_path / "assets" / "pip" / "fake-pkg-1.0"
    assert results == [target, target] and (target / "fake_pkg" / "data.txt").read_text() == "hello"
    assert len(downloads) == 1 and other_waits.is_set()  # the second waited, then found it
    assert sorted(p.name for p in target.parent.iterdir()) == ["fake-pkg-1.0", "fake-pkg-1.0.lock"]


def test_lock_that_cannot_be_made_is_one_line(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("PATCHIFY_ASSETS", str(blocker / "assets"))
    monkeypatch.setattr(assets, "subprocess", _fake_pip([], threading.Event()))
    with pytest.raises(AssetError) as err:
        pip_package("fake-pkg==1.0")
    assert "\n" not in str(err.value) and "lock" in str(err.value) and "PATCHIFY_ASSETS" in str(err.value)
    monkeypatch.setattr(weights, "assets_root", lambda: blocker / "assets")
    with pytest.raises(AssetError, match="cannot create the lock file"):
        weights.packaged_checkpoint("efficientnet_lite0")


# ----------------------------------------------------------------------------- DataLoader workers


class _Samples(Dataset):
    """40 small samples; sample 7 kills its worker, raises, or exits, as asked."""

    def __init__(self, fault: str):
        self.fault = fault

    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int):
        if index == 7:
            if self.fault == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif self.fault == "raise":
                raise ValueError("bad sample 7")
            elif self.fault == "exit":
                os._exit(3)
        return torch.ones(3), (np.zeros((1, 4), np.float32), np.zeros(1, np.int8)), ""


@pytest.mark.parametrize("fault, says", [("kill", "DataLoader worker"), ("exit", "DataLoader worker"),
                                         ("raise", "ValueError: bad sample 7")])
def test_worker_failure_ends_the_run_in_one_line(fault, says):
    records = [types.SimpleNamespace(id=str(i)) for i in range(40)]
    loader = DataLoader(_Samples(fault), batch_size=None, num_workers=2, collate_fn=extraction._collate_shared,
                        timeout=60)  # a guard: a regression fails here instead of hanging the suite
    written: list[int] = []
    started = time.perf_counter()
    with pytest.raises(ExtractionError) as err:
        extraction._feed_chunks(records, loader, desc="gallery", chunk_size=4, stats=ExtractStats(),
                                take=lambda payload: None, write=lambda pending: written.append(len(pending)))
    assert time.perf_counter() - started < 30
    message = str(err.value)
    assert "\n" not in message and says in message and "finished cache chunks are kept" in message
    assert is_user_error(err.value)
    assert written and all(n == 4 for n in written)  # chunks finished before the failure were written


def test_file_size_limit_in_a_worker_ends_the_run_in_one_line(tmp_path, photos):
    """Under ``ulimit -f 16`` a worker cannot make its shared-memory file (EFBIG); this hung for
    minutes (the sample was dropped in the result queue's feeder thread)."""
    command = shlex.join([sys.executable, "main.py", *_eval_overrides(tmp_path, photos), "extract.num_workers=2"])
    done = subprocess.run(["bash", "-c", f"ulimit -f 16 && exec {command}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "Traceback" not in done.stderr and "DataLoader worker" in last and "File too large" in last


# ----------------------------------------------------------------------------- read-only folders


def _read_only(monkeypatch, root: Path) -> None:
    """Every write under ``root`` fails with EROFS, as on a read-only mount (the tests may run as
    root, whom permission bits do not stop)."""
    root_text = str(root)

    def under(path) -> bool:
        return isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(root_text)

    def refuse(path):
        return OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    real = {"open": builtins.open, "os_open": os.open, "mkdir": os.mkdir, "replace": os.replace,
            "rename": os.rename, "unlink": os.unlink, "link": os.link}

    def open_(file, mode="r", *args, **kwargs):
        if under(file) and any(flag in mode for flag in "wax+"):
            raise refuse(file)
        return real["open"](file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if under(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise refuse(path)
        return real["os_open"](path, flags, *args, **kwargs)

    def mkdir(path, *args, **kwargs):
        if under(path):
            if os.path.isdir(path):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), os.fspath(path))
            raise refuse(path)
        return real["mkdir"](path, *args, **kwargs)

    def two_paths(name):
        def call(src, dst, *args, **kwargs):
            if under(src) or under(dst):
                raise refuse(dst)
            return real[name](src, dst, *args, **kwargs)
        return call

    def unlink(path, *args, **kwargs):
        if under(path):
            raise refuse(path)
        return real["unlink"](path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "unlink", unlink)
    for name in ("replace", "rename", "link"):
        monkeypatch.setattr(os, name, two_paths(name))


def test_clean_up_that_fails_does_not_hide_the_error(tmp_path, monkeypatch):
    path = tmp_path / "gallery.json"
    _read_only(monkeypatch, tmp_path)
    with pytest.raises(CacheError) as err:  # creating the temporary fails, and so does removing it
        atomic_write_bytes(path, b"{}")
    message = str(err.value)
    assert message.startswith(str(path)) and "Read-only file system" in message and "\n" not in message


def test_read_only_features_with_new_work_fail_before_encoding(tmp_path, monkeypatch, photos):
    folder = tmp_path / "photos"
    folder.mkdir()
    gallery = sorted(photos.glob("ilias_core/*/pos/*.jpg"))
    for path in gallery[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    overrides = [*_common(tmp_path), "task=index", "dataset=folder", f"dataset.root={folder}"]
    run(compose_config(overrides), tmp_path / "first")
    encoded: list[int] = []
    real_encode = extraction.encode
    monkeypatch.setattr(extraction, "encode", lambda *a, **k: encoded.append(1) or real_encode(*a, **k))

    _read_only(monkeypatch, tmp_path / "features")
    run(compose_config(overrides), tmp_path / "cached")  # everything cached: a read-only cache still serves
    assert encoded == []
    (folder / gallery[3].name).write_bytes(gallery[3].read_bytes())  # new work
    with pytest.raises(CacheError) as err:
        run(compose_config(overrides), tmp_path / "new")
    message = str(err.value)
    assert "\n" not in message and str(tmp_path / "features") in message and "Read-only file system" in message
    assert "paths.features=" in message and encoded == []


def test_features_folder_that_cannot_be_created_is_one_line(tmp_path, photos):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    overrides = [*_eval_overrides(tmp_path, photos), f"paths.features={blocker / 'features'}"]
    with pytest.raises(CacheError) as err:
        run(compose_config(overrides), tmp_path / "run")
    message = str(err.value)
    assert "\n" not in message and str(blocker / "features") in message and "paths.features=" in message


def test_index_folder_that_cannot_be_written_is_one_line(tmp_path):
    import faiss

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    index = faiss.IndexFlatIP(4)
    index.add(np.eye(4, dtype=np.float32))
    path = blocker / "faiss_indices" / "x.faiss"
    with pytest.raises(IndexConfigError) as err:
        write_index(index, path)
    assert "\n" not in str(err.value) and str(err.value).startswith(str(path))


def test_index_write_sweeps_only_dead_writers_leftovers(tmp_path):
    import faiss

    folder = tmp_path / "faiss_indices"
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    gone = folder / f".a.faiss.tmp-{HOST}-{dead}"
    live = tmp_path_for(folder / "b.faiss")
    for leftover in (gone, live):
        leftover.write_bytes(b"half")
    index = faiss.IndexFlatIP(4)
    write_index(index, folder / "c.faiss")
    assert not gone.exists() and live.exists() and (folder / "c.faiss").is_file()
