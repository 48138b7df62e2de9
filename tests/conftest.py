"""Shared fixtures: an isolated state dir per test, CRIU availability, job cleanup."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from cedana_ray import criu
from cedana_ray.config import Paths
from cedana_ray.engine import Engine
from cedana_ray.errors import CedanaError


def _criu_ready() -> str | None:
    """Why CRIU tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "CRIU needs root"
    try:
        criu.version()
    except CedanaError as exc:
        return str(exc)
    return None


CRIU_MISSING = _criu_ready()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "criu" in item.keywords and CRIU_MISSING:
            item.add_marker(pytest.mark.skip(reason=f"CRIU unavailable: {CRIU_MISSING}"))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh CEDANA_RAY_HOME; every job started in it is killed afterwards."""
    home = tmp_path / "home"
    monkeypatch.setenv("CEDANA_RAY_HOME", str(home))
    monkeypatch.delenv("CEDANA_RAY_STORAGE", raising=False)
    yield home
    kill_jobs(home)


def kill_jobs(home: Path) -> None:
    if not (home / "state.db").exists():
        return
    for job in Engine(Paths(home)).registry.jobs():
        if job.pid and psutil.pid_exists(job.pid):
            try:
                for p in [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]:
                    p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
    shutil.rmtree(home / "staging", ignore_errors=True)


@pytest.fixture
def engine(home: Path) -> Engine:
    return Engine(Paths(home))
