"""The parent of one sleeper workload: starts or restores it, reaps it, records its exit code.

Run with the standard library only (``python -I -S reaper.py JOB_DIR run|restore ARGV...``),
in a session of its own. ``run`` starts ARGV in a new session with its output discarded;
``restore`` runs ARGV, a ``criu restore --restore-detached --restore-sibling --pidfile FILE``,
so that the restored tree becomes this process's child. Either way it prints one JSON line
(``{"pid": N, "start_ticks": T}`` or ``{"error": "..."}``), then waits for the workload and writes
``JOB_DIR/exit-<its own PID>.json``. Being the parent is what lets anyone know the exit code.
It is also a child subreaper: the workload's orphaned descendants become its children and
it reaps them, so that no zombie keeps a PID that a restore on this machine needs again
(not every init reaps: a container's may not).
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def start(argv: list[str]) -> int:
    """Spawn ARGV in a session of its own, its stdio on /dev/null. Not with subprocess.Popen:
    a dropped Popen object reaps its child when collected, and the exit code with it."""
    null = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)]
    return os.posix_spawnp(argv[0], argv, os.environ, file_actions=null, setsid=True)


def restore(argv: list[str]) -> int:
    pidfile = argv[argv.index("--pidfile") + 1]
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0:
        raise OSError(f"criu restore failed (exit {done.returncode}): {done.stderr.strip()[-300:]}")
    with open(pidfile) as f:
        return int(f.read())


def start_ticks(pid: int) -> int:
    """When ``pid`` started, in clock ticks after boot (``/proc/PID/stat``, field 22). Read before
    it is reaped, so even a workload that is already gone has one."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def reply(doc: dict[str, object]) -> None:
    """Answer the plugin, then let go of its pipe: it reads one line."""
    print(json.dumps(doc), flush=True)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)


def record(path: str, pid: int, code: int) -> None:
    with open(f"{path}.tmp", "w") as f:
        json.dump({"pid": pid, "exit_code": code}, f)
    os.replace(f"{path}.tmp", path)  # whole or absent: the reaper hook may be reading it now


def reap(pid: int, exit_file: str) -> None:
    """Reap every child until none is left; record the workload's own exit."""
    while True:
        try:
            child, status = os.wait()
        except ChildProcessError:
            return
        if child == pid:
            record(exit_file, pid, os.waitstatus_to_exitcode(status))


def main() -> None:
    job_dir, mode, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    try:
        become_subreaper()
        pid = start(argv) if mode == "run" else restore(argv)
        ticks = start_ticks(pid)
    except OSError as exc:
        reply({"error": str(exc)})
        sys.exit(1)
    reply({"pid": pid, "start_ticks": ticks})
    reap(pid, os.path.join(job_dir, f"exit-{os.getpid()}.json"))


if __name__ == "__main__":
    main()
