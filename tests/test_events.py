"""A job's history (`cedana-ray events`): what happened to it, kept in the registry, with
real CRIU dumps and restores in local mode (tests/test_cluster.py covers migrations)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import cedana
from test_process_criu import COUNTER, start, wait_for

from cedana_ray.config import Paths
from cedana_ray.engine import Engine
from cedana_ray.errors import CedanaError
from cedana_ray.models import EventKind, JobState
from cedana_ray.requests import DumpRequest, RestoreRequest, RunRequest

pytestmark = pytest.mark.criu


def test_a_job_s_history_says_what_happened_and_why(engine: Engine) -> None:
    start(engine, COUNTER, ready="count=3")
    dumped = engine.dump("j1", DumpRequest(leave_running=True))
    with pytest.raises(CedanaError):
        engine.dump("j1", DumpRequest(storage="nowhere://x"))
    engine.kill("j1")
    engine.restore(RestoreRequest(), jid="j1")
    engine.kill("j1")
    engine.delete("j1")

    history = engine.events("j1")
    assert [e.kind for e in history] == [
        EventKind.started,
        EventKind.checkpointed,
        EventKind.failed,
        EventKind.killed,
        EventKind.restored,
        EventKind.killed,
        EventKind.deleted,
    ]
    assert [e.id for e in history] == sorted(e.id for e in history)
    checkpointed, failed, restored = history[1], history[2], history[4]
    assert checkpointed.detail["checkpoint"] == dumped.checkpoint
    assert checkpointed.detail["size_bytes"] == dumped.size_bytes and checkpointed.detail["duration_s"] > 0
    assert failed.detail["what"] == "dump" and "nowhere" in failed.detail["error"]
    assert "\n" not in failed.detail["error"]
    assert restored.detail == {"checkpoint": dumped.checkpoint, "node": "local"}
    assert engine.events("j1", after=history[-2].id) == [history[-1]]


def test_an_exit_is_noted_once_with_its_code(engine: Engine) -> None:
    engine.run("process", RunRequest(cmd=[sys.executable, "-c", "import sys; sys.exit(3)"], jid="quits"))
    wait_for(lambda: engine.job("quits").state is JobState.exited, what="the exit")
    other = Engine(Paths(engine.paths.home))  # another command, noticing it too
    assert other.job("quits").state is JobState.exited
    [exited] = [e for e in engine.events("quits") if e.kind is EventKind.exited]
    assert exited.detail["exit_code"] == 3


def test_events_command_lists_and_follows(engine: Engine, home: Path) -> None:
    start(engine, COUNTER, jid="f1", ready="count=1")
    listed = cedana("events", "f1", "--local", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [e["kind"] for e in json.loads(listed.stdout)] == ["started"]

    follow = subprocess.Popen(
        [sys.executable, "-m", "cedana_ray.cli", "events", "--follow", "--local", "--json"],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )
    try:
        assert json.loads(follow.stdout.readline())["kind"] == "started"  # what was there
        engine.dump("f1", DumpRequest(leave_running=True))
        new = json.loads(follow.stdout.readline())  # and what comes
        assert (new["jid"], new["kind"]) == ("f1", "checkpointed")
    finally:
        follow.terminate()
        follow.wait(timeout=10)
    engine.kill("f1")
    human = cedana("events", "--local")
    assert human.returncode == 0 and "checkpointed" in human.stdout and "killed" in human.stdout
