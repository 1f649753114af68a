"""The quick cases of scripts/robustness.py (``TEST_CASES``; docs/ROBUSTNESS.md), each expected to end ``ok``.

Each case runs ``main.py`` in subprocesses on a tiny synthetic folder (smoke model, no downloads);
a failure message is the case's verdict and what the user saw.
"""

from __future__ import annotations

import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import robustness  # noqa: E402

@pytest.mark.parametrize("case_id", robustness.TEST_CASES)
def test_case_is_ok(case_id, tmp_path):
    result = robustness.run_case(robustness.BY_ID[case_id], tmp_path)
    if result.verdict == "skipped":
        pytest.skip(result.seen)
    assert result.verdict == "ok", f"{case_id}: {result.verdict}: {result.seen} [{result.command}]"


def test_stderr_parsing_counts_error_lines_and_tracebacks():
    stderr = ("12:00:00 INFO    run folder: /nowhere\r"
              "gallery L0:  50%|#####     | 1/2 [00:00<00:00]\r"
              "12:00:01 WARNING skipped /x/a.jpg: unreadable image\n"
              "12:00:02 ERROR   extract.batch_size=0: must be an integer >= 1\n")
    run = robustness.Run("main.py", 2, "", stderr, 1.0, False)
    assert run.errors == ["extract.batch_size=0: must be an integer >= 1"]
    assert run.warnings == ["skipped /x/a.jpg: unreadable image"]
    assert not run.traceback and robustness.user_error(run, "extract.batch_size", "0").verdict == "ok"
    crashed = robustness.Run("main.py", 1, "", "Traceback (most recent call last):\n  File x\nZeroDivisionError: "
                             "division by zero\n", 1.0, False)
    assert crashed.exception == "ZeroDivisionError: division by zero"
    assert robustness.user_error(crashed, "batch_size").verdict == "traceback"
    assert robustness.user_error(robustness.Run("main.py", 0, "", "", 1.0, False), "k").verdict == "accepted"


def test_every_case_has_a_known_category_and_a_unique_id():
    ids = [case.id for case in robustness.CASES]
    assert len(ids) == len(set(ids)) and set(robustness.TEST_CASES) <= set(ids)
    assert {case.category for case in robustness.CASES} <= set(robustness.CATEGORIES)
    assert all(robustness.BY_ID[i].cost <= 10 for i in robustness.TEST_CASES)
