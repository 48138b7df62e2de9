"""`run --wait` and `cedana-ray wait`: the job's output as it comes, and its exit status, through
a dump and a restore (real CRIU, local mode; tests/test_cluster.py follows one across a
migration, tests/test_cluster_cli.py under `ray job submit`)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest
from test_cli import cedana
from test_process_criu import wait_for

from cedana_ray.engine import Engine
from cedana_ray.errors import CedanaError
from cedana_ray.models import JobState
from cedana_ray.requests import DumpRequest, RestoreRequest

pytestmark = pytest.mark.criu


def counts_to(n: int, status: int, interval: float = 0.05) -> list[str]:
    """A workload that prints count=0..n-1 and exits with ``status``."""
    code = f"import sys, time\nfor i in range({n}):\n    print(f'count={{i}}', flush=True); time.sleep({interval})\n"
    return [sys.executable, "-c", code + f"sys.exit({status})"]


def run_waiting(jid: str, cmd: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "cedana_ray.cli", "run", "process", "--local", "--wait", "--jid", jid, "--", *cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )


def printed(engine: Engine, jid: str, what: str) -> bool:
    """Whether job ``jid`` (started by another process, maybe not yet) printed ``what``."""
    try:
        return what in engine.read_log(jid).decode()
    except CedanaError:
        return False


def counts(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"count=(\d+)", text)]


def test_run_wait_prints_the_output_and_exits_as_the_workload(home: object) -> None:
    done = cedana("run", "process", "--local", "--wait", "--jid", "w", "--", *counts_to(5, 3, 0.01))
    assert done.returncode == 3, done.stderr
    assert counts(done.stdout) == [0, 1, 2, 3, 4]
    again = cedana("wait", "w", "--local", "--json")
    assert again.returncode == 3 and '"exit_code": 3' in again.stdout and counts(again.stderr) == [0, 1, 2, 3, 4]


def test_wait_follows_the_job_through_a_dump_and_a_restore(engine: Engine) -> None:
    waiting = run_waiting("moves", counts_to(60, 4))
    wait_for(lambda: printed(engine, "moves", "count=10"), what="ten counts")
    engine.dump("moves", DumpRequest())  # stopped: the wait goes on, for the restore
    assert waiting.poll() is None
    engine.restore(RestoreRequest(), jid="moves")
    out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 4, err
    assert counts(out) == list(range(60)), "every line once, in order, across the restore"


def test_a_killed_job_ends_the_wait_with_137_and_ctrl_c_detaches(engine: Engine) -> None:
    waiting = run_waiting("detach", counts_to(10_000, 0))
    wait_for(lambda: printed(engine, "detach", "count=3"), what="the job running")
    waiting.send_signal(signal.SIGINT)
    _, err = waiting.communicate(timeout=30)
    assert waiting.returncode == 130 and "cedana-ray wait detach" in err
    assert engine.job("detach").state is JobState.running, "the job goes on"
    engine.kill("detach")
    assert cedana("wait", "detach", "--local").returncode == 137
