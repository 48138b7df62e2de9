"""``ps`` without the models (cedana_ray.listing): what it reads from the registry is what the
engine lists, and where the engine would record something first, ``ps`` leaves it to the
engine. Real jobs, real processes; through a cluster's gateway: tests/test_cluster_cli.py."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
from pathlib import Path

import psutil
import pytest
from test_cache import loaded_modules
from test_cli import cedana
from test_process_criu import wait_for

from cedana_ray import listing
from cedana_ray.config import Paths
from cedana_ray.engine import Engine
from cedana_ray.recovery import CLEARED, mark


def ps_json() -> list[dict]:
    done = cedana("ps", "--local", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def run(*cmd: str) -> dict:
    done = cedana("run", "process", "--local", "--json", "--", *cmd)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def engine_rows(home: Path) -> list[dict]:
    return [{**j.row(), "gpus": []} for j in Engine(Paths(home)).jobs()]


def test_ps_of_a_fresh_state_dir_lists_nothing_and_creates_nothing(home: Path) -> None:
    assert ps_json() == [] and listing.listed(local=True) == ([], {})
    assert not home.exists()


def test_ps_lists_what_the_engine_lists_without_the_models(home: Path) -> None:
    sleeping = run("sleep", "300")
    ended = run("true")
    wait_for(lambda: not psutil.pid_exists(ended["pid"]), 10, "true ending")
    assert cedana("job", "kill", "--local", sleeping["jid"]).returncode == 0
    sleeping = run("sleep", "300")
    Engine(Paths(home)).jobs()  # records `ended` exited
    assert listing.listed(local=True) is not None, "nothing to record: ps reads the registry"
    assert [(r["jid"], r["state"]) for r in ps_json()][-2:] == [(ended["jid"], "exited"), (sleeping["jid"], "running")]
    assert ps_json() == engine_rows(home)
    assert "pydantic" not in loaded_modules("ps", "--local", "--json", home=home)
    table = cedana("ps", "--local").stdout
    assert sleeping["jid"] in table and "exited" in table


def test_a_job_whose_process_is_gone_is_left_to_the_engine_which_records_it(home: Path) -> None:
    job = run("sleep", "300")
    os.kill(job["pid"], signal.SIGKILL)
    wait_for(lambda: not psutil.pid_exists(job["pid"]), 10, "its init reaping it")
    assert listing.listed(local=True) is None
    [row] = ps_json()
    assert row["jid"] == job["jid"] and row["state"] in ("exited", "lost")
    assert listing.listed(local=True) is not None, "recorded once: the next ps reads it"
    assert ps_json() == [row]


def test_a_job_with_a_dump_s_mark_is_left_to_the_engine_which_clears_it(home: Path) -> None:
    job = run("sleep", "300")
    registry = Engine(Paths(home)).registry
    registry.update_job(job["jid"], details=mark(f"{job['jid']}-dead", f"file://{home}/checkpoints"))
    assert listing.listed(local=True) is None, "a dump runs, or died: recovery looks at it"
    assert [r["state"] for r in ps_json()] == ["running"]
    assert registry.job(job["jid"]).details.get("dump") is None, "the engine put the dead dump right"
    registry.update_job(job["jid"], details=CLEARED)
    assert listing.listed(local=True) is not None


def test_live_jobs_on_a_machine_with_an_nvidia_driver_are_left_to_the_gpu_plugin(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # no NVIDIA driver can load here (no GPU): an existing directory stands for its /proc entry
    monkeypatch.setattr(listing, "NVIDIA_DRIVER", tmp_path)
    job = run("sleep", "300")
    assert listing.listed(local=True) is None
    assert cedana("job", "kill", "--local", job["jid"]).returncode == 0
    assert listing.listed(local=True) is not None, "no live job: no GPU to show"


def test_a_record_this_version_does_not_write_is_read_by_the_models(home: Path) -> None:
    job = run("sleep", "300")
    with sqlite3.connect(Paths(home).db) as conn:  # as a version before exit codes wrote it
        (data,) = conn.execute("SELECT data FROM jobs").fetchone()
        conn.execute(
            "UPDATE jobs SET data = ?", (json.dumps({k: v for k, v in json.loads(data).items() if k != "exit_code"}),)
        )
    conn.close()
    assert listing.listed(local=True) is None
    assert [(r["jid"], r["exit_code"]) for r in ps_json()] == [(job["jid"], None)]
