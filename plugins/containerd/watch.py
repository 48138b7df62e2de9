"""The watcher of one containerd task: its output into the job log, its exit code.

Started by the containerd plugin through the shared launcher (:mod:`cedana_ray.spawn`):
:func:`begin` runs in the launcher's fork, :func:`main` in the script it execs. containerd's shim is
the task's parent, so only containerd learns how the task ended; a ``ctr`` that waits on
the task hears it and exits with the task's status (128+N for signal N):

* a new container: ``ctr run`` without ``--detach`` (the task writes the job log itself
  through ``--log-uri``);
* a restored one: ``ctr tasks attach``. ``ctr c restore`` gives the task FIFOs that only
  that ``ctr`` read, and it exits at once; attach re-opens them (containerd's shim holds
  them open meanwhile, so nothing written in between is lost).

The watcher runs that ``ctr`` with stdout and stderr on a pipe it copies to the job log,
replies ``{"pid": TASK, "start_ticks": T}`` once the task runs (or ``{"error": ...}`` with
ctr's message if ctr exits first), and records the exit code when ctr exits. A ``ctr``
killed by a signal leaves the code unknown.
"""

from __future__ import annotations

import os
import sys
import time

from cedana_ray.plugins.containerd.client import Ctr, error_line

from cedana_ray.supervisor import copy_output, exit_code, read_spec, record_exit, start_ticks

START_TIMEOUT_S = 60.0  # a 256 MiB restore is well under this on a busy 2-core machine
POLL_S = 0.05


def _wait_running(ctr: Ctr, cid: str, waiter: int, out: int) -> int:
    """The task's PID once it runs or is paused; ctr's own error if it exits first."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        pid, status = ctr.tasks().get(cid, (0, ""))
        if status in ("RUNNING", "PAUSED"):
            return pid
        if os.waitpid(waiter, os.WNOHANG)[0]:
            said = os.read(out, 65536).decode(errors="replace")
            raise RuntimeError(error_line(said))
        time.sleep(POLL_S)
    raise RuntimeError(f"task {cid} did not start within {START_TIMEOUT_S:.0f} s")


def begin(spec: dict) -> tuple[dict, dict]:
    """The launcher's first half (in its fork): ``ctr`` waits on the running task; the reply,
    and what :func:`main` keeps."""
    r, w = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    # posix_spawn, not subprocess: a dropped Popen reaps its child if it can, and main() must
    dups = [(os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, w, 1), (os.POSIX_SPAWN_DUP2, w, 2)]
    waiter = os.posix_spawn(spec["argv"][0], spec["argv"], spec["env"], file_actions=dups)
    os.close(null)
    os.close(w)  # ctr is the only writer: EOF once it exits
    pid = _wait_running(Ctr(spec["address"], spec["namespace"]), spec["container"], waiter, r)
    return {"pid": pid, "start_ticks": start_ticks(pid)}, {"waiter": waiter, "pid": pid, "out": r, "fds": [r]}


def main() -> None:
    spec = read_spec(sys.argv[2])
    kept = spec["kept"]
    copy_output(kept["out"], spec["log"])
    code = exit_code(os.waitpid(kept["waiter"], 0)[1])
    record_exit(spec["exit_file"], kept["pid"], code if code >= 0 else None)


if __name__ == "__main__":
    main()
