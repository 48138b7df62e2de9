"""The supervising parent of one ``process`` workload (standard library only).

Started through the process plugin's launcher (``launch.py``): :func:`begin` runs in a
fork of the launcher and forks a small init: PID 1 of new PID and mount
namespaces, with its own ``/proc`` (CUDA and CRIU read ``/proc`` by PID, so it must show
this namespace). The init then either

* ``run``: forks the command in its own session, stdin ``/dev/null``, stdout and
  stderr into a pipe; or
* ``restore``: runs ``criu restore --restore-detached``, whose restored tree it
  inherits; a fresh namespace means the original PIDs are free, so a restore works
  while the original (or its zombie) exists, and any number of times.

Once the workload runs, the init execs this script (``{"init_root": ROOT, "log": LOG}``) to reap
everything and exit as the workload did. :func:`begin` reports ``{"pid": INIT,
"ns_root": ROOT, "start_ticks": T}`` (ROOT: the workload's PID inside the namespace; T:
the init's start time, as in /proc/PID/stat); then the fork execs this script as the
supervisor (:func:`main`), which serves the job's own checkpoint requests, copies the
workload's output to the job log and writes the exit code to the exit file. Dumps run
CRIU inside the namespaces (``nsenter``) on ROOT, so the init is never part of a
checkpoint.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

CLONE_NEWPID = 0x20000000
CLONE_NEWNS = 0x00020000
HOST_PID_NS = "/proc/self/ns/pid"
MS_REC, MS_PRIVATE = 0x4000, 1 << 18
CONTROL_POLL_S = 0.1
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _unshare_pid() -> None:
    if _libc.unshare(CLONE_NEWPID) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(CLONE_NEWPID): {os.strerror(err)}")


def _private_proc() -> None:
    """A mount namespace whose /proc shows our PID namespace (CRIU reads it)."""
    if _libc.unshare(CLONE_NEWNS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNS)")
    for args in ((None, b"/", None, MS_REC | MS_PRIVATE), (b"proc", b"/proc", b"proc", 0)):
        if _libc.mount(*args, None) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mount {args[1]!r}: {os.strerror(err)}")


def close_fds_except(*keep: int) -> None:
    last = 3
    for fd in sorted(k for k in keep if k >= 3):
        os.closerange(last, fd)
        last = fd + 1
    os.closerange(last, os.sysconf("SC_OPEN_MAX"))


def exit_code(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def _read_all(fd: int) -> str:
    data = b""
    while chunk := os.read(fd, 4096):
        data += chunk
    os.close(fd)
    return data.decode(errors="replace")


def _spawn(argv: list[str], out: int, keep: tuple[int, ...] = (), **kw: Any) -> subprocess.Popen[bytes]:
    """Start ``argv``: stdin ``/dev/null``, stdout and stderr ``out``, only the ``keep`` fds
    besides. ``kw``: ``session``, ``cwd``, ``env``. Through subprocess, which vforks: we run in
    a copy of the launcher, whose address space is too big to fork cheaply."""
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            pass_fds=keep,
            start_new_session=kw.get("session", False),
            cwd=kw.get("cwd"),
            env=kw.get("env"),
        )
    except OSError as exc:
        raise RuntimeError(f"cannot run {argv[0]!r}: {exc.strerror or exc}") from None


def _exec_workload(spec: dict, w: int) -> subprocess.Popen[bytes]:
    """The command in its own session, its output into pipe ``w``."""
    env = {**os.environ, **spec.get("env", {})}
    return _spawn(spec["cmd"], w, session=True, cwd=spec.get("cwd"), env=env)


def _high_pids() -> None:
    """Make our next children (CRIU) take PIDs from the top of the range, leaving the
    low ones, where the restored tree's PIDs are, free in this fresh namespace."""
    with open("/proc/sys/kernel/pid_max") as f:
        top = int(f.read())
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(top - 1024))


def _criu_restore(spec: dict, w: int) -> int:
    """Run CRIU; the restored tree's root PID (as CRIU's namespace sees it)."""
    pidfile = os.path.join(spec["work"], "restore.pid")
    _high_pids()
    fds = [os.dup(w) for _ in spec["pipes"]]
    args = [*spec["criu"], "--pidfile", pidfile]
    for fd, key in zip(fds, spec["pipes"], strict=True):
        args += ["--inherit-fd", f"fd[{fd}]:{key}"]
    with open(os.path.join(spec["work"], "criu.out"), "wb") as out:
        criu = _spawn(args, out.fileno(), tuple(fds))
    for fd in fds:
        os.close(fd)
    rc = criu.wait()
    if rc != 0:
        raise RuntimeError(f"criu restore failed (exit {rc})")
    with open(pidfile) as f:
        return int(f.read().strip())


def _init_loop(root: int) -> None:
    """PID 1 of the namespace: reap everything, exit as the root did (128+N for signal N)."""
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(0)
        if pid == root:
            code = exit_code(status)
            os._exit(128 - code if code < 0 else code)


def start(spec: dict) -> tuple[int, int, int]:
    """Start the namespace init and, in it, the workload; (init's PID, its start ticks, output pipe)."""
    r, w = os.pipe()
    errr, errw = os.pipe2(os.O_CLOEXEC)
    host = os.open(HOST_PID_NS, os.O_RDONLY)
    _unshare_pid()
    init = os.fork()
    if init == 0:
        close_fds_except(w, errw)
        os.setsid()
        try:
            _private_proc()
            if spec["mode"] == "run":
                # kept until the exec: a Popen that is dropped reaps its child if it already exited
                workload = _exec_workload(spec, w)
                root = workload.pid
            else:
                root = _criu_restore(spec, w)
        except BaseException as exc:
            os.write(errw, json.dumps({"error": str(exc)}).encode())
            os._exit(1)
        os.write(errw, json.dumps({"root": root}).encode())
        os.close(w)
        os.close(errw)
        _become_init(root, spec["log"])
    ticks = start_ticks(init)  # now: reading its stat while it execs itself waits for the exec
    _setns(host, CLONE_NEWPID)  # our later children (the control server) stay out of the job's namespace
    os.close(host)
    os.close(w)
    os.close(errw)
    reply = json.loads(_read_all(errr) or '{"error": "the namespace init died"}')
    if "error" in reply:
        os.waitpid(init, 0)
        raise RuntimeError(reply["error"])
    spec["ns_root"] = reply["root"]
    return init, ticks, r


def _setns(fd: int, kind: int) -> None:
    if _libc.setns(fd, kind) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _become_init(root: int, log: str) -> None:
    """Exec this script as the namespace's init (a fresh interpreter, not a copy of the
    launcher); in place if that fails. Its command line names the job's log, so that
    `ps` tells whose init it is."""
    try:
        os.execv(sys.executable, [sys.executable, "-S", __file__, json.dumps({"init_root": root, "log": log})])
    except OSError:
        _init_loop(root)


def serve_control(control: dict) -> None:
    """Run the job's own checkpoint requests (``NAME.request`` files, see cedana_ray.inside)
    from out here, where the dump cannot catch us, and write ``NAME.result`` back."""
    folder = control["dir"]
    os.makedirs(folder, exist_ok=True)
    env = {**os.environ, **control["env"]}
    while True:
        for entry in sorted(os.listdir(folder)):
            if not entry.endswith(".request"):
                continue
            name = entry.removesuffix(".request")
            os.unlink(os.path.join(folder, entry))
            done = subprocess.run(control["argv"], env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            try:
                result = {"checkpoint": json.loads(done.stdout)["checkpoint"]}
            except (ValueError, KeyError):
                result = {"error": (done.stderr.strip().splitlines() or ["dump failed"])[-1]}
            tmp = os.path.join(folder, name + ".tmp")
            with open(tmp, "w") as f:
                json.dump(result, f)
            os.replace(tmp, os.path.join(folder, name + ".result"))
        time.sleep(CONTROL_POLL_S)


def start_control(control: dict) -> int:
    """Fork the control server, in the host PID namespace (:func:`start` made sure of it):
    what it runs must not land in the job's namespace. It dies with us."""
    pid = os.fork()
    if pid == 0:
        close_fds_except()
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        try:
            serve_control(control)
        finally:
            os._exit(0)
    return pid


def copy_output(out: int, log_path: str) -> None:
    """Append what ``out`` yields to the job log until every writer of it is gone."""
    with open(log_path, "ab", buffering=0) as log:
        while chunk := os.read(out, 65536):
            log.write(chunk)


def start_ticks(pid: int) -> int:
    """When ``pid`` started, in clock ticks since boot (field 22 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:  # a child of ours stays readable until reaped
        return int(f.read().rsplit(")", 1)[1].split()[19])


def supervise(spec: dict, pid: int, out: int) -> None:
    copy_output(out, spec["log"])
    _, status = os.waitpid(pid, 0)
    record_exit(spec["exit_file"], pid, exit_code(status))


def record_exit(exit_file: str, pid: int, code: int | None) -> None:
    """The workload's exit code (None: unknown), for the plugin's reaper; written atomically."""
    tmp = exit_file + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"pid": pid, "exit_code": code}, f)
    os.replace(tmp, exit_file)


def begin(spec: dict) -> tuple[dict, dict]:
    """The launcher's first half (in its fork): the workload runs; the reply, and what :func:`main` keeps."""
    init, ticks, out = start(spec)
    reply = {"pid": init, "ns_root": spec["ns_root"], "start_ticks": ticks}
    return reply, {"init": init, "out": out, "fds": [out]}


def main() -> None:
    spec = json.loads(sys.argv[1])
    if "init_root" in spec:
        _init_loop(spec["init_root"])
    if spec.get("control"):
        start_control(spec["control"])
    supervise(spec, spec["kept"]["init"], spec["kept"]["out"])


if __name__ == "__main__":
    main()
