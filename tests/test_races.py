"""Concurrent requests for one job: exactly one wins, and the registry loses no update."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import psutil
import pytest
from test_cli import cedana
from test_process_criu import ROOT, wait_for

from cedana_ray.config import Paths
from cedana_ray.errors import StateError
from cedana_ray.models import Job, JobState
from cedana_ray.registry import Registry

INTERVAL = "0.0517"  # marks this test's workloads among the machine's processes
WORKLOAD = [sys.executable, str(ROOT / "jobs" / "counter.py"), INTERVAL]
RACERS = 4  # with two, one CLI often finishes before the other starts: the race seldom shows


def workloads() -> int:
    count = 0
    for proc in psutil.process_iter(["cmdline"]):
        count += proc.info["cmdline"] == WORKLOAD
    return count


def together(*commands: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """The CLI commands, started at the same time; their results in order."""
    results: list[subprocess.CompletedProcess[str]] = [None] * len(commands)  # type: ignore[list-item]
    barrier = threading.Barrier(len(commands))

    def one(i: int) -> None:
        barrier.wait()
        results[i] = cedana(*commands[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(commands))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def exactly_one_won(results: list[subprocess.CompletedProcess[str]]) -> None:
    codes = sorted(r.returncode for r in results)
    assert codes == [0] + [StateError.exit_code] * (len(results) - 1), [(r.returncode, r.stderr) for r in results]
    assert all("d1" in r.stderr for r in results if r.returncode)


@pytest.mark.criu
@pytest.mark.parametrize("attempt", range(3))
def test_two_runs_of_one_id_start_one_workload(home: Path, attempt: int) -> None:
    run = ["run", "process", "--jid", "d1", "--local", "--", *WORKLOAD]
    exactly_one_won(together(*[run] * RACERS))
    wait_for(lambda: workloads() >= 1, what="the workload")
    assert workloads() == 1


@pytest.mark.criu
def test_two_restores_of_one_job_start_one_workload(home: Path) -> None:
    assert cedana("run", "process", "--jid", "d1", "--local", "--", *WORKLOAD).returncode == 0
    dumped = cedana("dump", "job", "d1", "--local", "--json")
    assert dumped.returncode == 0, dumped.stderr
    for attempt in range(3):
        restore = ["restore", "job", "d1", "--local"]
        exactly_one_won(together(*[restore] * RACERS))
        assert workloads() == 1, f"attempt {attempt}"
        again = cedana("dump", "job", "d1", "--local", "--json")
        assert again.returncode == 0 and json.loads(again.stdout)["checkpoint"], again.stderr


def test_concurrent_updates_of_a_job_are_all_kept(tmp_path: Path) -> None:
    """Each writer sets its own detail: none overwrites another's with a stale copy."""
    db = Paths(tmp_path).ensure().db
    Registry(db).add_job(Job(jid="j1", type="process", state=JobState.running))

    def writer(name: str) -> None:
        registry = Registry(db)  # its own connection, as another process has
        for i in range(40):
            registry.update_job("j1", details={f"{name}-{i}": i})

    threads = [threading.Thread(target=writer, args=(f"w{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(Registry(db).job("j1").details) == 4 * 40
