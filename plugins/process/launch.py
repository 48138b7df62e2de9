"""Starting a ``process`` job under its supervisor, in namespaces of its own.

The native ``nsinit`` (``nsinit.c``), spawned without forking the launcher, puts the
workload, or CRIU restoring it, under an init of its own in new PID and mount namespaces,
replies, and execs the shared supervisor (:mod:`cedana_ray.supervisor`). No copy of the
launcher and no Python interpreter runs before CRIU does. The reply, the spec handed over
privately and the supervisor's release are those of every runtime (:mod:`cedana_ray.spawn`);
the workload's environment reaches ``nsinit`` through a memory file too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from cedana_ray import supervisor
from cedana_ray.environment import defaults
from cedana_ray.errors import PrerequisiteError
from cedana_ray.spawn import ERRORS, escapes, private, release, reply

NSINIT = Path(__file__).with_name("nsinit")


def nsinit() -> Path:
    """The native namespace init, built with the package (setup.py)."""
    if not os.access(NSINIT, os.X_OK):
        raise PrerequisiteError(f"{NSINIT} is not built", hint="reinstall cedana-ray (`make setup`): it needs cc")
    return NSINIT


def launch_in_namespaces(spec: dict[str, Any], job_dir: Path) -> dict[str, Any]:
    """Start a ``process`` job (``spec["mode"]``: ``run`` or ``restore``) under ``nsinit``,
    which then becomes its supervisor (:mod:`cedana_ray.supervisor`); the reply once the workload runs. A run's
    ``spec["env"]`` is the workload's whole environment."""
    binary = nsinit()
    Path(spec["log"]).touch()  # the supervisor opens it only once it started: `logs` must work at once
    status_r, status_w = os.pipe()
    out_r, out_w = os.pipe()
    fds: list[int] = []
    errors = job_dir / ERRORS
    try:
        child, fds = _run_child(spec, out_w) if spec["mode"] == "run" else _restore_child(spec, out_w)
        fds.append(private(json.dumps(_supervisor_spec(spec, out_r)).encode()))
        words = [sys.executable, "-I", "-S", supervisor.__file__, str(job_dir), str(fds[-1])]
        args = [str(binary), "-s", str(status_w), *(["-d"] if escapes() else []), *_each("-c", words), *child]
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
    release(proc.wait, proc.pid)
    return reply(raw, errors)


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
