"""Shared test helpers: config composition and small fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from loguru import logger

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixtures import make_ilias_fixture  # noqa: E402


def compose_config(overrides: list[str]):
    """Compose configs/config.yaml with overrides, as `python main.py` would."""
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.fixture(scope="session")
def ilias_fixture(tmp_path_factory) -> Path:
    """A small ILIAS-layout folder (4 instances x 3 positives, 4 distractors)."""
    return make_ilias_fixture(tmp_path_factory.mktemp("ilias"))


@pytest.fixture
def smoke_overrides(tmp_path, ilias_fixture) -> list[str]:
    """Smoke experiment on the fixture, with caches in this test's own folder."""
    return ["experiment=smoke", f"dataset.root={ilias_fixture}", "dataset.generate=null", "dataset.name=fixture",
            f"paths.features={tmp_path / 'features'}", f"paths.indices={tmp_path / 'indices'}",
            f"paths.logs={tmp_path / 'logs'}"]


@pytest.fixture
def warnings_log() -> list[str]:
    """Messages logged through loguru at WARNING or above while the test runs."""
    messages: list[str] = []
    sink = logger.add(lambda m: messages.append(m.record["message"]), level="WARNING")
    yield messages
    logger.remove(sink)


@pytest.fixture(scope="module")
def faiss_single_thread():
    """One FAISS thread: k-means on a busy 2-core box is faster and steadier so."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)
