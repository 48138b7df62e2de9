"""Starting a workload under its detached supervisor and waiting for its first word; reading its last.

The launcher's side of :mod:`cedana_ray.supervisor`, shared by the runtime plugins. A
supervisor replies ``{"pid": N, "start_ticks": T, ...}`` once the workload runs, or
``{"error": "..."}``; when the workload is gone it records the exit code in the job dir's
:data:`EXIT_FILE`, which :func:`recorded_exit` reads back (the shared reaper).

:func:`launch` serves supervisors that are scripts with two halves (the ``runc`` shim, the
``containerd`` watcher): ``begin(spec) -> (reply, kept)`` starts the workload in a fork of
the launcher, in a session of its own; the fork then execs the script, whose ``main()``
supervises what ``begin`` started (``spec["kept"]``; the file descriptors it needs are
listed in ``kept["fds"]``), a fresh interpreter that keeps no copy of the launcher's
memory. The ``process`` plugin starts its supervisor another way (``nsinit``), with the
same helpers: :func:`private`, :func:`reply`, :func:`release`.

No supervisor gets the launcher's environment (its keys and credentials) or its spec on a
command line (``ps`` shows those to everyone): it runs with the
:func:`~cedana_ray.environment.defaults` only and reads its spec, as ``SCRIPT JOB_DIR FD``,
from a memory file :func:`private` hands it.

The supervisor stays the launcher's child, reaped by a thread, or by init once the
launcher (a CLI) exits. Only under a Ray worker that kills its children when it exits
does it escape, through a fork that exits at once; our agents turn that killing off
(``cedana_ray/remote.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import psutil

from .environment import defaults
from .errors import CedanaError
from .supervisor import close_fds_except

RAY_KILLS_CHILDREN = "RAY_kill_child_processes_on_worker_exit"
RESET_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
LOG, EXIT_FILE, ERRORS = "log", "exit.json", "supervisor.err"  # in the job dir


class LaunchError(CedanaError):
    """The supervisor could not start the workload."""


def job_files(job_dir: Path) -> dict[str, str]:
    """The spec entries every supervisor writes to: the job log and the exit file."""
    return {"log": str(job_dir / LOG), "exit_file": str(job_dir / EXIT_FILE)}


def private(data: bytes) -> int:
    """A memory file holding ``data``, read from its start by the process it is passed to:
    unlike a command line, only its owner (and root) can read it, and it leaves no file behind."""
    fd = os.memfd_create("cedana-ray", os.MFD_CLOEXEC)
    with open(fd, "wb", closefd=False) as f:
        f.write(data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def launch(spec: dict[str, Any], job_dir: Path, script: ModuleType) -> dict[str, Any]:
    """Start the workload with ``script``'s ``begin`` in a fork, which then becomes
    ``script``'s supervisor; the reply once the workload runs. ``begin`` starts what it
    starts with ``spec["env"]``, the environment the script runs with too."""
    errors = job_dir / ERRORS
    spec = {**job_files(job_dir), **spec, "env": defaults(os.environ)}  # env: for what `begin` starts, and the script
    Path(spec["log"]).touch()  # the supervisor opens it only once it started: `logs` must work at once
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(r)
        _begin_detached(script, spec, w, errors)
    os.close(w)
    with os.fdopen(r, "rb") as status:
        raw = status.read()
    release(lambda: _reap(child), child)
    return reply(raw, errors)


def reply(raw: bytes, errors: Path) -> dict[str, Any]:
    """The supervisor's reply; :class:`LaunchError` with its error, or with the last line it
    wrote to ``errors`` if it died before replying."""
    try:
        answer = json.loads(raw)
    except ValueError:
        tail = errors.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise LaunchError(f"the workload supervisor died: {tail[0]}") from None
    if "error" in answer:
        raise LaunchError(answer["error"])
    return answer


def release(wait: Callable[[], object], pid: int) -> None:
    """Wait for our child now if it escapes (it exits at once), else in a thread: it is
    the supervisor, which leaves no zombie behind."""
    if escapes():
        wait()
    else:
        threading.Thread(target=wait, name=f"reap-{pid}", daemon=True).start()


def escapes() -> bool:
    """Whether the supervisor must not stay our child: Ray workers kill theirs on exit."""
    return "RAY_RAYLET_PID" in os.environ and os.environ.get(RAY_KILLS_CHILDREN) != "0"


def _reap(pid: int) -> None:
    """Wait for a child; a launcher that exits first (the CLI) hands it to init, which reaps it then."""
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
        if escapes() and os.fork():
            os._exit(0)  # the launcher reaps us; the supervisor lives on, re-parented
        os.setsid()
        close_fds_except(status)
        answer, kept = script.begin(spec)
        os.write(status, json.dumps(answer).encode())
        os.close(status)
        held = private(json.dumps({**spec, "kept": kept}).encode())
        for fd in [*kept.get("fds", []), held]:
            os.set_inheritable(fd, True)
        os.execve(sys.executable, [sys.executable, script.__file__, str(errors.parent), str(held)], spec["env"])
    except BaseException as exc:
        try:
            os.write(status, json.dumps({"error": str(exc)}).encode())
        except OSError:  # replied already: only the exec failed
            os.write(2, f"cannot supervise: {exc}\n".encode())
    os._exit(1)


def started_at(answer: dict[str, Any]) -> float:
    """The workload's start time from a supervisor's reply, as psutil's create_time()."""
    return psutil.boot_time() + answer["start_ticks"] / os.sysconf("SC_CLK_TCK")


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
