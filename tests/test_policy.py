"""Checkpoint policies in local mode: periodic leave-running dumps, keep the last K."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import psutil
import pytest

from cedana_ray.engine import Engine
from cedana_ray.errors import UsageError
from cedana_ray.models import JobState
from cedana_ray.policy import parse_duration
from cedana_ray.requests import RestoreRequest, RunRequest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(("text", "seconds"), [("30s", 30), ("5m", 300), ("1h", 3600), ("250ms", 0.25), ("2", 2)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0s", "-1s", "5 minutes", "1d", "s"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(UsageError, match="invalid duration"):
        parse_duration(text)


def wait_for(check, timeout: float = 30.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.1)
    raise AssertionError("timed out")


@pytest.mark.criu
def test_periodic_checkpoints_are_kept_to_k_and_restorable(engine: Engine) -> None:
    cmd = [sys.executable, str(ROOT / "jobs" / "counter.py"), "0.05"]
    job = engine.run("process", RunRequest(cmd=cmd, jid="p1", checkpoint_every=0.5, keep=2))
    runner = job.details["policy"]["pid"]
    log = engine.paths.job_dir("p1") / "policy.log"
    wait_for(lambda: log.exists() and log.read_text().count(" checkpoint p1-") >= 4)
    assert engine.job("p1").state is JobState.running, "policy dumps leave the job running"
    engine.kill("p1")  # no more periodic dumps; one in flight finishes with its pruning
    kept = wait_for(lambda: (found := engine.checkpoints("p1")) and len(found) == 2 and found)
    assert engine.job("p1").last_checkpoint == kept[-1].checkpoint
    assert engine.restore(RestoreRequest(checkpoint=kept[-1].checkpoint), jid="p1").job.state is JobState.running
    engine.kill("p1")
    wait_for(lambda: not psutil.pid_exists(runner) or psutil.Process(runner).status() == psutil.STATUS_ZOMBIE)


def test_keep_needs_an_interval(home: Path) -> None:
    from click.testing import CliRunner

    from cedana_ray.cli.main import cli

    result = CliRunner().invoke(cli, ["run", "process", "--keep", "2", "--", "true"])
    assert result.exit_code == 2 and "--checkpoint-every" in result.output
