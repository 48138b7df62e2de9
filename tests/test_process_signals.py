"""Signals a user sends reach a ``process`` job's workload through its namespace init
(``nsinit``), before and after a restore; ``job kill --signal`` sends any of them."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from test_cli import cedana
from test_process_criu import wait_for

from cedana_ray.engine import Engine
from cedana_ray.models import Job, JobState

pytestmark = pytest.mark.criu

GRACEFUL = [sys.executable, str(Path(__file__).with_name("workloads") / "graceful.py")]


def run_graceful(saved: Path, jid: str = "g1") -> int:
    """``run process --json`` of a workload that saves to ``saved`` on TERM or INT, once it
    ticks; the PID it reports."""
    reply = cedana("run", "process", "--jid", jid, "--json", "--", *GRACEFUL, str(saved))
    assert reply.returncode == 0, reply.stderr
    wait_for(lambda: "tick 3" in Path(Engine().log_path(jid)).read_text(), what="the workload ticking")
    return json.loads(reply.stdout)["pid"]


def ended(jid: str) -> Job:
    return wait_for(lambda: (j := Engine().job(jid)).state is JobState.exited and j, what=f"{jid} to exit")


def test_term_to_the_reported_pid_reaches_the_workload(home: Path, tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    os.kill(run_graceful(saved), signal.SIGTERM)
    assert ended("g1").exit_code == 100 + signal.SIGTERM
    assert saved.read_text() == "SIGTERM"


def test_term_reaches_a_restored_workload(home: Path, tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    run_graceful(saved)
    assert cedana("dump", "job", "g1").returncode == 0
    reply = cedana("restore", "job", "g1", "--json")
    assert reply.returncode == 0, reply.stderr
    os.kill(json.loads(reply.stdout)["pid"], signal.SIGTERM)
    assert ended("g1").exit_code == 100 + signal.SIGTERM
    assert saved.read_text() == "SIGTERM"


def test_job_kill_sends_a_chosen_signal_and_leaves_the_state_to_the_reaper(home: Path, tmp_path: Path) -> None:
    saved = tmp_path / "saved"
    run_graceful(saved)
    sent = cedana("job", "kill", "g1", "--signal", "INT", "--json")
    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout)["state"] == "running"
    assert ended("g1").exit_code == 100 + signal.SIGINT
    assert saved.read_text() == "SIGINT"


def test_other_signals_keep_the_workload_running(home: Path, tmp_path: Path) -> None:
    os.kill(run_graceful(tmp_path / "saved"), signal.SIGWINCH)  # forwarded; the workload ignores it, as by default
    log = Path(Engine().log_path("g1"))
    ticks = log.read_text().count("tick")
    wait_for(lambda: log.read_text().count("tick") > ticks + 3, what="ticking on")
    assert Engine().job("g1").state is JobState.running


def test_a_workload_that_does_not_trap_term_ends_by_it(home: Path) -> None:
    reply = cedana("run", "process", "--jid", "s1", "--json", "--", "sleep", "100")
    assert reply.returncode == 0, reply.stderr
    os.kill(json.loads(reply.stdout)["pid"], signal.SIGTERM)
    assert ended("s1").exit_code == 128 + signal.SIGTERM


COUNTS_USR1 = """
import signal, time
n = 0
def count(sig, frame):
    global n
    n += 1
    print("usr1", n, flush=True)
signal.signal(signal.SIGUSR1, count)
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


def test_each_signal_sent_is_handled_once_before_and_after_a_restore(home: Path) -> None:
    reply = cedana("run", "process", "--jid", "u1", "--json", "--", sys.executable, "-c", COUNTS_USR1)
    assert reply.returncode == 0, reply.stderr
    log = Path(Engine().log_path("u1"))
    wait_for(lambda: "ready" in log.read_text(), what="the workload's handler")

    def send(first: int) -> None:
        for n in range(first, first + 3):  # one at a time: a signal pending twice is delivered once
            assert cedana("job", "kill", "u1", "--signal", "USR1").returncode == 0
            wait_for(lambda n=n: f"usr1 {n}\n" in log.read_text(), what=f"signal {n} handled")

    send(1)
    assert cedana("dump", "job", "u1").returncode == 0
    assert cedana("restore", "job", "u1").returncode == 0
    send(4)
    time.sleep(1)  # time for a signal handled twice to show
    assert log.read_text().count("usr1") == 6
