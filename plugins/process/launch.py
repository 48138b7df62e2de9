"""Starting a workload under its detached supervisor and waiting for its first word; reading its last.

Two ways, one reply: ``{"pid": N, "start_ticks": T, ...}``, or ``{"error": "..."}``.

* :func:`launch_in_namespaces`, for ``process`` jobs: the native ``nsinit``
  (``nsinit.c``), spawned without forking the launcher, puts the workload, or CRIU
  restoring it, under an init of its own in new PID and mount namespaces, replies,
  and execs :mod:`.supervisor`. No copy of the launcher and no Python interpreter
  runs before CRIU does.
* :func:`launch`, for the ``runc`` shim and ``containerd`` watcher, scripts with two
  halves: ``begin(spec) -> (reply, kept)`` starts the workload in a fork of the
  launcher, in a session of its own; the fork then execs the script, whose ``main()``
  supervises what ``begin`` started (``spec["kept"]``; the file descriptors it needs
  are listed in ``kept["fds"]``), a fresh interpreter that keeps no copy of the
  launcher's memory.

Neither gets the launcher's environment (its keys and credentials) or its spec on a
command line (``ps`` shows those to everyone): a supervisor runs with the
:func:`~cedana_ray.environment.defaults` only and reads its spec, as ``SCRIPT JOB_DIR
FD``, from a memory file :func:`private` hands it; the workload's environment
reaches ``nsinit`` the same way.

The supervisor stays the launcher's child, reaped by a thread, or by init once the
launcher (a CLI) exits. Only under a Ray worker that kills its children when it exits
does it escape, through a fork that exits at once; our agents turn that killing off
(``actors/remote.py``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import psutil

from cedana_ray.environment import defaults
from cedana_ray.errors import CedanaError, PrerequisiteError

from . import supervisor

RAY_KILLS_CHILDREN = "RAY_kill_child_processes_on_worker_exit"
RESET_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
NSINIT = Path(__file__).with_name("nsinit")


class LaunchError(CedanaError):
    """The supervisor could not start the workload."""


def nsinit() -> Path:
    """The native namespace init, built with the package (setup.py)."""
    if not os.access(NSINIT, os.X_OK):
        raise PrerequisiteError(f"{NSINIT} is not built", hint="reinstall cedana-ray (`make setup`): it needs cc")
    return NSINIT


def launch_in_namespaces(spec: dict[str, Any], job_dir: Path) -> dict[str, Any]:
    """Start a ``process`` job (``spec["mode"]``: ``run`` or ``restore``) under ``nsinit``,
    which then becomes its :mod:`.supervisor`; the reply once the workload runs. A run's
    ``spec["env"]`` is the workload's whole environment."""
    binary = nsinit()
    Path(spec["log"]).touch()  # the supervisor opens it only once it started: `logs` must work at once
    status_r, status_w = os.pipe()
    out_r, out_w = os.pipe()
    fds: list[int] = []
    errors = job_dir / "supervisor.err"
    try:
        child, fds = _run_child(spec, out_w) if spec["mode"] == "run" else _restore_child(spec, out_w)
        fds.append(private(json.dumps(_supervisor_spec(spec, out_r)).encode()))
        words = [sys.executable, "-I", "-S", supervisor.__file__, str(job_dir), str(fds[-1])]
        args = [str(binary), "-s", str(status_w), *(["-d"] if _escapes() else []), *_each("-c", words), *child]
        with open(errors, "ab") as err:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                pass_fds=(status_w, out_r, *fds),
                start_new_session=True,
                env=defaults(os.environ),
            )
    except BaseException:
        os.close(status_r)
        raise
    finally:
        for fd in {status_w, out_r, out_w, *fds}:
            os.close(fd)
    with os.fdopen(status_r, "rb") as status:
        raw = status.read()
    _release(proc.wait, proc.pid)
    return _reply(raw, errors)


def _each(option: str, values: list[str]) -> list[str]:
    return [word for value in values for word in (option, value)]


def _supervisor_spec(spec: dict[str, Any], out: int) -> dict[str, Any]:
    """What the supervisor reads: ``spec`` without the workload's environment, and with
    ours for the job's own dumps (``spec["control"]``), which need what we have (a store's
    credentials, Ray's token) and which the supervisor's own environment no longer holds."""
    own = {k: v for k, v in spec.items() if k != "env"}
    if control := spec.get("control"):
        own["control"] = {**control, "env": {**os.environ, **control["env"]}}
    return {**own, "out": out}


def private(data: bytes) -> int:
    """A memory file holding ``data``, read from its start by the process it is passed to:
    unlike a command line, only its owner (and root) can read it, and it leaves no file behind."""
    fd = os.memfd_create("cedana-ray", os.MFD_CLOEXEC)
    with open(fd, "wb", closefd=False) as f:
        f.write(data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _run_child(spec: dict[str, Any], out: int) -> tuple[list[str], list[int]]:
    """``nsinit`` options for the workload: its output into ``out``, its environment
    privately; the descriptors they name."""
    env = private(b"".join(f"{key}={value}\0".encode() for key, value in spec["env"].items()))
    return ["-o", str(out), "-C", spec["cwd"], "-e", str(env), "--", *spec["cmd"]], [out, env]


def _restore_child(spec: dict[str, Any], out: int) -> tuple[list[str], list[int]]:
    """``nsinit`` options for CRIU, its output in ``criu.out``; the restored tree's pipes
    (``spec["pipes"]``) become ``out``. The descriptors they name."""
    work = Path(spec["work"])
    log = os.open(work / "criu.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    pipes = [os.dup(out) for _ in spec["pipes"]]
    pidfile = str(work / "restore.pid")
    criu = [*spec["criu"], "--pidfile", pidfile]
    criu += _each("--inherit-fd", [f"fd[{fd}]:{key}" for fd, key in zip(pipes, spec["pipes"], strict=True)])
    options = ["-o", str(log), "-p", pidfile, *_each("-i", [str(fd) for fd in pipes])]
    return [*options, "--", *criu], [log, *pipes]


def launch(spec: dict[str, Any], job_dir: Path, script: ModuleType) -> dict[str, Any]:
    """Start the workload with ``script``'s ``begin`` in a fork, which then becomes
    ``script``'s supervisor; the reply once the workload runs. ``begin`` starts what it
    starts with ``spec["env"]``, the environment the script runs with too."""
    errors = job_dir / "supervisor.err"
    Path(spec["log"]).touch()  # the supervisor opens it only once it started: `logs` must work at once
    spec = {**spec, "env": defaults(os.environ)}  # for what `begin` starts, and the script
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(r)
        _begin_detached(script, spec, w, errors)
    os.close(w)
    with os.fdopen(r, "rb") as status:
        raw = status.read()
    _release(lambda: _reap(child), child)
    return _reply(raw, errors)


def _reply(raw: bytes, errors: Path) -> dict[str, Any]:
    try:
        reply = json.loads(raw)
    except ValueError:
        tail = errors.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise LaunchError(f"the workload supervisor died: {tail[0]}") from None
    if "error" in reply:
        raise LaunchError(reply["error"])
    return reply


def _release(wait: Callable[[], object], pid: int) -> None:
    """Wait for our child now if it escapes (it exits at once), else in a thread: it is
    the supervisor, which leaves no zombie behind."""
    if _escapes():
        wait()
    else:
        threading.Thread(target=wait, name=f"reap-{pid}", daemon=True).start()


def _escapes() -> bool:
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
        if _escapes() and os.fork():
            os._exit(0)  # the launcher reaps us; the supervisor lives on, re-parented
        os.setsid()
        supervisor.close_fds_except(status)
        reply, kept = script.begin(spec)
        os.write(status, json.dumps(reply).encode())
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
