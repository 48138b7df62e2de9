"""The supervisor of one QEMU (standard library and :mod:`cedana_ray.supervisor` only).

Started by the qemu plugin through the shared launcher (:mod:`cedana_ray.spawn`):
:func:`begin`, in the launcher's fork, starts QEMU in the job dir with the guest's serial
console (QEMU's stdout) on a pipe it owns and QEMU's own messages (stderr) in a file of
their own (``spec["errors"]``: a message must not cut a console line in two), and replies
``{"pid": QEMU, "start_ticks": T}`` once QEMU listens on its QMP socket, which is when the
plugin can talk to it; or the error QEMU wrote if it exited first. The fork then execs this
script (:func:`main`): it copies the console into the job log, reaps QEMU and records its exit
code for the shared reaper.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from cedana_ray.supervisor import read_spec, start_ticks, supervise

READY_TIMEOUT_S = 60.0  # QEMU opens its QMP socket before the guest runs: seconds even on a busy node
READY_POLL_S = 0.02


def last_line(path: str, fallback: str = "") -> str:
    """The last non-blank line of the file at ``path`` (QEMU's last word), else ``fallback``."""
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f.read()[-4096:].splitlines() if line.strip()]
    except OSError:
        return fallback
    return lines[-1] if lines else fallback


def wait_ready(proc: subprocess.Popen[bytes], qmp: str, errors: str) -> None:
    """Return once QEMU listens on ``qmp``; raise with QEMU's last word if it exited instead."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not os.path.exists(qmp):
        if proc.poll() is not None:
            raise RuntimeError(last_line(errors, f"QEMU exited with status {proc.returncode}"))
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"QEMU did not open its QMP socket in {READY_TIMEOUT_S:.0f} s")
        time.sleep(READY_POLL_S)


def begin(spec: dict) -> tuple[dict, dict]:
    """The launcher's first half (in its fork): QEMU runs; the reply, and what :func:`main` keeps."""
    r, w = os.pipe()
    errors = os.open(spec["errors"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # this QEMU's alone
    with open(os.devnull, "rb") as null:
        proc = subprocess.Popen(spec["argv"], cwd=spec["cwd"], stdin=null, stdout=w, stderr=errors, env=spec["env"])
    os.close(w)
    os.close(errors)
    wait_ready(proc, os.path.join(spec["cwd"], spec["qmp"]), spec["errors"])
    return {"pid": proc.pid, "start_ticks": start_ticks(proc.pid)}, {"pid": proc.pid, "out": r, "fds": [r]}


def hold(path: str, pid: int) -> None:
    """A live migration's target: the guest's console waits in its pipe until the job's log
    so far is in the job log (the plugin then removes ``path``), or QEMU is gone."""
    while os.path.exists(path) and not _ended(pid):
        time.sleep(READY_POLL_S)


def _ended(pid: int) -> bool:
    """Whether our child ``pid`` exited (a zombie until :func:`supervise` reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def main() -> None:
    spec = read_spec(sys.argv[2])
    if spec.get("hold"):
        hold(os.path.join(spec["cwd"], spec["hold"]), spec["kept"]["pid"])
    supervise(spec, spec["kept"]["pid"], spec["kept"]["out"])


if __name__ == "__main__":
    main()
