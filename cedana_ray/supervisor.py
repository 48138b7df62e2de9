"""The supervisor of one workload (standard library only): the parent that copies its output
into the job log and records its exit code (``exit.json``), which the shared reaper
(:mod:`cedana_ray.runtime`) reads. Its launcher's side is :mod:`cedana_ray.spawn`.

Run as a script by path, ``python -I -S supervisor.py JOB_DIR SPEC_FD INIT``, by the
``process`` plugin's ``nsinit``: nsinit puts the workload, or CRIU restoring it, under
PID 1 of new PID and mount namespaces (its own small init, with its own ``/proc``: CUDA
and CRIU read ``/proc`` by PID, so it must show this namespace), replies to the
launcher, and execs this script as the init's parent (the job dir names the job in
``ps``; the spec, which may hold the environment the job's own dumps need, comes through
the descriptor, see :func:`read_spec`). :func:`main` serves the job's own checkpoint
requests, copies the workload's output (``SPEC["out"]``) to the job log and writes the
exit code to the exit file.

The supervisors of other runtimes (the ``runc`` shim, the ``containerd`` watcher) are
scripts of their own that import its helpers; so this module imports nothing of
cedana-ray, and stays cheap to import.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time

CONTROL_POLL_S = 0.1
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def read_spec(fd: str) -> dict:
    """The spec the launcher handed over in a memory file (never on the command line,
    where ``ps`` shows it to everyone); the descriptor is closed."""
    with open(int(fd), "rb") as f:
        return json.load(f)


def close_fds_except(*keep: int) -> None:
    last = 3
    for fd in sorted(k for k in keep if k >= 3):
        os.closerange(last, fd)
        last = fd + 1
    os.closerange(last, os.sysconf("SC_OPEN_MAX"))


def exit_code(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


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
            argv = [*control["argv"], *_labels(os.path.join(folder, entry))]
            os.unlink(os.path.join(folder, entry))
            done = subprocess.run(argv, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
            try:
                result = {"checkpoint": json.loads(done.stdout)["checkpoint"]}
            except (ValueError, KeyError):
                result = {"error": (done.stderr.strip().splitlines() or ["dump failed"])[-1]}
            tmp = os.path.join(folder, name + ".tmp")
            with open(tmp, "w") as f:
                json.dump(result, f)
            os.replace(tmp, os.path.join(folder, name + ".result"))
        time.sleep(CONTROL_POLL_S)


def _labels(request: str) -> list[str]:
    """The dump's ``--metadata K=V`` options for the request in file ``request`` (the job's
    own words: the dump command checks them)."""
    try:
        with open(request) as f:
            metadata = json.load(f).get("metadata") or {}
    except (OSError, ValueError, AttributeError):
        return []
    return [arg for key, value in metadata.items() for arg in ("--metadata", f"{key}={json.dumps(value)}")]


def start_control(control: dict) -> int:
    """Fork the control server, in the host PID namespace (``nsinit`` made sure of it):
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


def main() -> None:
    spec, init = read_spec(sys.argv[2]), int(sys.argv[3])
    if spec.get("control"):
        start_control(spec["control"])
    supervise(spec, init, spec["out"])


if __name__ == "__main__":
    main()
