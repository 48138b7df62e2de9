"""Starting a workload's supervisor and waiting for its first word."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from cedana_ray.errors import CedanaError

SUPERVISOR = Path(__file__).with_name("supervisor.py")


class LaunchError(CedanaError):
    """The supervisor could not start the workload."""


def launch(spec: dict[str, Any], job_dir: Path) -> dict[str, Any]:
    """Start a detached supervisor for ``spec``; its reply once the workload runs:
    ``{"pid": N, "ns_root": M | None}``."""
    r, w = os.pipe()
    errors = job_dir / "supervisor.err"
    with open(errors, "ab") as err:
        starter = subprocess.Popen(
            [sys.executable, str(SUPERVISOR), json.dumps({**spec, "status_fd": w})],
            pass_fds=(w,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
    os.close(w)
    with os.fdopen(r, "rb") as status:
        raw = status.read()
    starter.wait()
    try:
        reply = json.loads(raw)
    except ValueError:
        tail = errors.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise LaunchError(f"the workload supervisor died: {tail[0]}") from None
    if "error" in reply:
        raise LaunchError(reply["error"])
    return reply
