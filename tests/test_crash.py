"""A dump whose process is killed at any stage loses nothing: afterwards the job runs (with
its checkpoint kept if the manifest made it), never stopped forever, and nothing is left over."""

from __future__ import annotations

import json
import re
import signal
import time
from pathlib import Path

import pytest
from test_cli import cedana
from test_process_criu import COUNTER, wait_for

from cedana_ray.failpoint import ENV as FAILPOINT
from cedana_ray.store import MANIFEST

pytestmark = [pytest.mark.criu, pytest.mark.usefixtures("own_staging")]


def count(home: Path) -> int:
    counts = re.findall(r"count=(\d+)", (home / "jobs" / "c1" / "log").read_text())
    return int(counts[-1]) if counts else -1


def counting(home: Path) -> bool:
    before = count(home)
    time.sleep(0.3)
    return count(home) > before


def state(home: Path) -> dict[str, object]:
    """The job as ``ps`` shows it: the first command after the crash, which puts things right."""
    ps = cedana("ps", "--local", "--json")
    assert ps.returncode == 0, ps.stderr
    return next(j for j in json.loads(ps.stdout) if j["jid"] == "c1")


@pytest.mark.parametrize("compression", ["zstd", "none"])
@pytest.mark.parametrize("stage", ["dump:criu", "dump:store", "dump:committed"])
def test_a_dump_killed_midway_loses_nothing(
    home: Path, own_staging: Path, monkeypatch: pytest.MonkeyPatch, stage: str, compression: str
) -> None:
    assert cedana("run", "process", "--jid", "c1", "--local", "--", *COUNTER).returncode == 0
    wait_for(lambda: count(home) >= 3, what="counting")
    monkeypatch.setenv(FAILPOINT, stage)
    killed = cedana("dump", "job", "c1", "--local", "--compression", compression)
    monkeypatch.delenv(FAILPOINT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    # an orphaned CRIU holds the job's lock until it is done: until then commands leave it be
    wait_for(lambda: state(home)["state"] == "running" and counting(home), what="the job running again")
    kept = json.loads(cedana("checkpoint", "list", "c1", "--local", "--json").stdout)
    assert len(kept) == (stage == "dump:committed"), kept
    store = home / "checkpoints"
    checkpoints = [entry for entry in store.iterdir() if not entry.name.startswith(".")]  # .chunks: shared
    assert all((ckpt / MANIFEST).exists() for ckpt in checkpoints), "no partial checkpoint is left"
    assert not list(store.glob(".pending/*")), "no dump is left pending: a sweep may free what it stored"
    assert [p for p in own_staging.rglob("*") if p.is_dir() and p.parent != own_staging] == [], "no staging is left"

    dumped = cedana("dump", "job", "c1", "--local", "--json")
    assert dumped.returncode == 0, dumped.stderr
    stopped = count(home)
    assert cedana("restore", "job", "c1", "--local").returncode == 0
    wait_for(lambda: count(home) > stopped + 3, what="counting after a restore")
