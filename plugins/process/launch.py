"""Starting a workload's supervisor and waiting for its first word; reading its last.

Shared by the runtime plugins whose workloads are watched by a detached supervisor
(``process``'s namespace init, ``runc``'s shim): both speak the same protocol.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from cedana_ray.errors import CedanaError

SUPERVISOR = Path(__file__).with_name("supervisor.py")


class LaunchError(CedanaError):
    """The supervisor could not start the workload."""


def launch(spec: dict[str, Any], job_dir: Path, script: Path = SUPERVISOR) -> dict[str, Any]:
    """Start the detached supervisor ``script`` for ``spec``; its reply once the
    workload runs: ``{"pid": N, "start_ticks": T, ...}``."""
    r, w = os.pipe()
    errors = job_dir / "supervisor.err"
    # the process supervisor is standard library only: skipping site saves about 20 ms of every run and restore
    flags = ["-S"] if script == SUPERVISOR else []
    with open(errors, "ab") as err:
        starter = subprocess.Popen(
            [sys.executable, *flags, str(script), json.dumps({**spec, "status_fd": w})],
            pass_fds=(w,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    os.close(w)
    with os.fdopen(r, "rb") as status:
        raw = status.read()
    starter.wait()
    try:
        reply = json.loads(raw)
    except ValueError:
        tail = errors.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise LaunchError(f"the workload supervisor died: {tail[0]}") from None
    if "error" in reply:
        raise LaunchError(reply["error"])
    return reply


def started_at(reply: dict[str, Any]) -> float:
    """The workload's start time from a supervisor's reply, as psutil's create_time()."""
    return psutil.boot_time() + reply["start_ticks"] / os.sysconf("SC_CLK_TCK")


def recorded_exit(exit_file: str, pid: int | None, grace_s: float) -> int | None:
    """The exit code a supervisor recorded for ``pid``; it may take a moment to write
    it after the workload is gone, so wait up to ``grace_s`` before giving up (None)."""
    deadline = time.monotonic() + grace_s
    while True:
        try:
            with open(exit_file) as f:
                record = json.load(f)
            if record.get("pid") == pid:
                return record["exit_code"]
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)
