"""The watcher of one containerd task: its output into the job log, its exit code.

Started by the containerd plugin as ``python watch.py SPEC_JSON`` through the process
plugin's launcher, and speaks its protocol (``supervisor.serve``). containerd's shim is
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

import json
import os
import subprocess
import sys
import time

from cedana_ray.plugins.containerd.client import Ctr, error_line
from cedana_ray.plugins.process.supervisor import copy_output, record_exit, serve, start_ticks

START_TIMEOUT_S = 60.0  # a 256 MiB restore is well under this on a busy 2-core machine
POLL_S = 0.05


def _wait_running(ctr: Ctr, cid: str, waiter: subprocess.Popen[bytes], out: int) -> int:
    """The task's PID once it runs or is paused; ctr's own error if it exits first."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        pid, status = ctr.tasks().get(cid, (0, ""))
        if status in ("RUNNING", "PAUSED"):
            return pid
        if waiter.poll() is not None:
            said = os.read(out, 65536).decode(errors="replace")
            raise RuntimeError(error_line(said))
        time.sleep(POLL_S)
    raise RuntimeError(f"task {cid} did not start within {START_TIMEOUT_S:.0f} s")


def _start(spec: dict) -> tuple[dict, tuple[subprocess.Popen[bytes], int, int]]:
    r, w = os.pipe()
    with open(os.devnull, "rb") as null:
        waiter = subprocess.Popen(spec["argv"], stdin=null, stdout=w, stderr=w)
    os.close(w)  # ctr is the only writer: EOF once it exits
    pid = _wait_running(Ctr(spec["address"], spec["namespace"]), spec["container"], waiter, r)
    return {"pid": pid, "start_ticks": start_ticks(pid)}, (waiter, pid, r)


def main() -> None:
    spec = json.loads(sys.argv[1])
    waiter, pid, out = serve(spec, _start)
    copy_output(out, spec["log"])
    rc = waiter.wait()
    record_exit(spec["exit_file"], pid, rc if rc >= 0 else None)


if __name__ == "__main__":
    main()
