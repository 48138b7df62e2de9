"""Starting a workload under its detached supervisor and waiting for its first word; reading its last.

Shared by the runtime plugins whose workloads are watched by a detached supervisor
(``process``'s namespace init, ``runc``'s shim, ``containerd``'s watcher). Each is a
script with two halves:

* ``begin(spec) -> (reply, kept)`` starts the workload (or CRIU or runc restoring it).
  It runs in a fork of the launcher, in a session of its own, so no Python interpreter
  has to start before the workload runs (that start was a fifth of a 256 MiB restore);
* its ``main()`` supervises what ``begin`` started (``spec["kept"]``; the file
  descriptors it needs are listed in ``kept["fds"]``). The fork execs the script once
  ``begin`` replied, so the long-lived supervisor is a fresh interpreter that keeps no
  copy of the launcher's memory.

The reply is ``{"pid": N, "start_ticks": T, ...}``, or ``{"error": "..."}``.

The supervisor stays the launcher's child, reaped by a thread, or by init once the
launcher (a CLI) exits. Only under a Ray worker that kills its children when it exits
does it escape with a second fork, a few milliseconds of every start and restore; our
agents turn that killing off (``actors/remote.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import psutil

from cedana_ray.errors import CedanaError

from . import supervisor

RAY_KILLS_CHILDREN = "RAY_kill_child_processes_on_worker_exit"
RESET_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


class LaunchError(CedanaError):
    """The supervisor could not start the workload."""


def launch(spec: dict[str, Any], job_dir: Path, script: ModuleType = supervisor) -> dict[str, Any]:
    """Start the workload with ``script``'s ``begin`` in a fork, which then becomes
    ``script``'s supervisor; the reply once the workload runs."""
    errors = job_dir / "supervisor.err"
    Path(spec["log"]).touch()  # the supervisor opens it only once it started: `logs` must work at once
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(r)
        _begin_detached(script, spec, w, errors)
    os.close(w)
    with os.fdopen(r, "rb") as status:
        raw = status.read()
    if _escapes():
        os.waitpid(child, 0)
    else:
        threading.Thread(target=_reap, args=(child,), name=f"reap-{child}", daemon=True).start()
    try:
        reply = json.loads(raw)
    except ValueError:
        tail = errors.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise LaunchError(f"the workload supervisor died: {tail[0]}") from None
    if "error" in reply:
        raise LaunchError(reply["error"])
    return reply


def _escapes() -> bool:
    """Whether the supervisor must not stay our child: Ray workers kill theirs on exit."""
    return "RAY_RAYLET_PID" in os.environ and os.environ.get(RAY_KILLS_CHILDREN) != "0"


def _reap(pid: int) -> None:
    """Wait for a supervisor that is our child, so that it leaves no zombie behind. A
    launcher that exits first (the CLI) hands it to init, which reaps it then."""
    with contextlib.suppress(ChildProcessError):  # SIGCHLD ignored: reaped already
        os.waitpid(pid, 0)


def _begin_detached(script: ModuleType, spec: dict[str, Any], status: int, errors: Path) -> NoReturn:
    """In the fork: a new session, ``begin``, reply on ``status``, exec ``script`` to supervise.

    Only this thread exists here, copied from a launcher that may run others: nothing here
    touches what they might have held (stdout, logging, Ray), and all else is replaced by
    the exec."""
    try:
        for sig in RESET_SIGNALS:  # the launcher's handlers (an agent drains on SIGTERM)
            signal.signal(sig, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDWR)
        err = os.open(errors, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        for fd, target in ((null, 0), (null, 1), (err, 2)):
            os.dup2(fd, target)
        if _escapes() and os.fork():
            os._exit(0)  # the launcher reaps us; the supervisor lives on, re-parented
        os.setsid()
        supervisor.close_fds_except(status)
        reply, kept = script.begin(spec)
        os.write(status, json.dumps(reply).encode())
        os.close(status)
        for fd in kept.get("fds", []):
            os.set_inheritable(fd, True)
        os.execv(sys.executable, [sys.executable, script.__file__, json.dumps({**spec, "kept": kept})])
    except BaseException as exc:
        try:
            os.write(status, json.dumps({"error": str(exc)}).encode())
        except OSError:  # replied already: only the exec failed
            os.write(2, f"cannot supervise: {exc}\n".encode())
    os._exit(1)


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
