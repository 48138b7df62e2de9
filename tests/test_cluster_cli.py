"""`cedana-ray up` / `down`, the CLI against a cluster, and `ray job submit` as an entrypoint.

`up` starts its own Ray head here (no address given); `down` must stop exactly that.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from test_cli import assert_one_error, cedana
from test_process_criu import COUNTER, wait_for

from cedana_ray.errors import StateError, UsageError

pytestmark = [pytest.mark.criu, pytest.mark.ray, pytest.mark.timeout(240)]
RAY = str(Path(sys.executable).with_name("ray"))


def cli_json(*args: str) -> object:
    done = cedana(*args, "--json", timeout=180)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def head_processes(temp_dir: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]


@pytest.fixture
def up(home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict]:
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        state = cli_json("up")
    except BaseException:
        cedana("down")  # stops a head an interrupted `up` left
        raise
    assert isinstance(state, dict)
    yield state
    if (home / "cluster.json").exists():
        cedana("down", "--kill-jobs", timeout=180)


def test_up_job_submit_ps_dump_and_down(up: dict, home: Path) -> None:
    assert len(up["nodes"]) == 1 and up["head_temp_dir"] and up["storage"].startswith("file://")
    assert cli_json("up")["address"] == up["address"], "up is idempotent"
    entrypoint = ["cedana-ray", "run", "process", "--jid", "sub", "--checkpoint-every", "1s", "--keep", "2", "--"]
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", up["dashboard"], "--", *entrypoint, *COUNTER],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    [job] = cli_json("ps")  # type: ignore[misc]
    assert job["jid"] == "sub" and job["state"] == "running" and job["node"] == up["nodes"][0]["node"]
    wait_for(lambda: len(cli_json("checkpoint", "list", "sub")) >= 1, 30, "a policy checkpoint")  # type: ignore[arg-type]
    dumped = cli_json("dump", "job", "sub", "--leave-running")
    assert dumped["checkpoint"].startswith("sub-")  # type: ignore[index]
    assert "count=" in cedana("logs", "sub").stdout
    assert_one_error(cedana("migrate", "sub", "--to", "ffff"), type("E", (StateError,), {"exit_code": 3}))

    assert_one_error(cedana("down"), StateError)  # a running job: refused
    report = cli_json("down", "--kill-jobs")
    assert report["killed_jobs"] == ["sub"]  # type: ignore[index]
    time.sleep(0.5)
    assert head_processes(up["head_temp_dir"]) == [], "down stopped the head it started"
    assert not (home / "cluster.json").exists()
    assert_one_error(cedana("down"), StateError)
    assert_one_error(cedana("nodes"), UsageError)
    assert cli_json("ps") == [], "back in local mode"
