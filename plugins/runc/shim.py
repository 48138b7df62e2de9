"""The shim of one ``runc`` container (standard library only): its reaper and its output.

Started by the runc plugin through the shared launcher (:mod:`cedana_ray.spawn`):
:func:`begin`, in the launcher's fork, makes itself a child subreaper and runs
the given ``runc run --detach`` or ``runc restore --detach`` with the container's stdout
and stderr on a pipe it owns: runc hands the pipe to the container (and, on restore,
CRIU re-attaches the restored container to the new shim's pipe), and the container's
init is re-parented to the shim once runc exits. It replies ``{"pid": INIT,
"start_ticks": T}``; then the fork execs this script (:func:`main`), which copies the
output to the job log, reaps the init and writes its exit code.

A pipe, not a file: CRIU cannot dump a container whose stdout is a host file
outside the container's mounts.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys

from cedana_ray.supervisor import copy_output, exit_code, read_spec, record_exit, start_ticks

PR_SET_CHILD_SUBREAPER = 36


def _runc_error(log: str, rc: int) -> str:
    """The last error runc logged (``--log-format json``)."""
    message = f"runc exited with status {rc}"
    try:
        with open(log) as f:
            for line in f:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if entry.get("level") in ("error", "fatal"):
                    message = entry.get("msg", message)
    except OSError:
        pass
    return message


def start(spec: dict) -> tuple[int, int]:
    """Run runc with the output pipe; (the container init's PID, the pipe's read end)."""
    r, w = os.pipe()
    with open(os.devnull, "rb") as null:
        rc = subprocess.run(spec["argv"], stdin=null, stdout=w, stderr=w, env=spec["env"]).returncode
    os.close(w)
    if rc != 0:
        raise RuntimeError(_runc_error(spec["runc_log"], rc))
    with open(spec["pid_file"]) as f:
        return int(f.read().strip()), r


def supervise(spec: dict, pid: int, out: int) -> None:
    """Copy the output until every writer is gone, then reap the init and record its exit."""
    copy_output(out, spec["log"])
    code = None
    while code is None:
        try:
            reaped, status = os.waitpid(-1, 0)  # orphans of the container land here too
        except ChildProcessError:
            break  # reaped by someone else: unknown
        if reaped == pid:
            code = exit_code(status)
    record_exit(spec["exit_file"], pid, code)


def _subreaper() -> None:
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def begin(spec: dict) -> tuple[dict, dict]:
    """The launcher's first half (in its fork): the container runs; the reply, and what :func:`main` keeps."""
    _subreaper()
    pid, out = start(spec)
    return {"pid": pid, "start_ticks": start_ticks(pid)}, {"pid": pid, "out": out, "fds": [out]}


def main() -> None:
    spec = read_spec(sys.argv[2])
    _subreaper()  # the container's orphans land here too
    supervise(spec, spec["kept"]["pid"], spec["kept"]["out"])


if __name__ == "__main__":
    main()
