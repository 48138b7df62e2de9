"""The ``runc`` binary: commands under our own ``--root``, errors as one line, bundles.

Every call goes through :func:`Runc.call`, the one place where runc's failures
become cedana-ray errors (runc logs ``level=error msg="..."``; we report the msg).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cedana_ray import criu
from cedana_ray.config import paths
from cedana_ray.errors import CedanaError, JobNotFound, PrerequisiteError, StateError, UsageError

INSTALL_HINT = "run `make setup` (scripts/install-containers.sh) to install runc"
_MSG = re.compile(r'msg="((?:[^"\\]|\\.)*)"')


def default_root() -> Path:
    """Our runc state dir: under the cedana-ray home, so we never touch the system's containers."""
    return Path(os.environ.get("CEDANA_RAY_RUNC_ROOT") or paths().home / "runc")


def binary() -> str:
    path = os.environ.get("CEDANA_RAY_RUNC") or shutil.which("runc")
    if not path:
        raise PrerequisiteError("runc not found on PATH", hint=INSTALL_HINT)
    return path


def error_line(text: str) -> str:
    """runc's own error message out of its log output (the last ``msg="..."``)."""
    found = _MSG.findall(text)
    if found:
        return found[-1].encode().decode("unicode_escape").strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else "no output"


@dataclass(frozen=True)
class Runc:
    """runc with one state root."""

    root: Path

    def argv(self, *args: str) -> list[str]:
        return [binary(), "--root", str(self.root), *args]

    def call(self, *args: str, error: type[CedanaError] = StateError) -> str:
        """Run ``runc ARGS``; its stdout, or ``error`` with runc's own message."""
        res = subprocess.run(self.argv(*args), capture_output=True, text=True)
        if res.returncode != 0:
            raise error(f"runc {args[0]} failed: {error_line(res.stderr or res.stdout)}")
        return res.stdout

    def state(self, cid: str) -> dict[str, Any]:
        """``runc state``: id, pid, status (running, paused, stopped...), bundle, rootfs."""
        res = subprocess.run(self.argv("state", cid), capture_output=True, text=True)
        if res.returncode != 0:
            raise JobNotFound(f"no runc container {cid!r} under {self.root}")
        return json.loads(res.stdout)

    def live_state(self, cid: str) -> dict[str, Any]:
        """The state of a running or paused container, or a clear error."""
        state = self.state(cid)
        if state["status"] not in ("running", "paused"):
            raise StateError(f"runc container {cid} is {state['status']}, not running")
        return state

    def containers(self) -> list[dict[str, Any]]:
        if not self.root.exists():
            return []
        return json.loads(self.call("list", "--format", "json") or "null") or []

    def delete(self, cid: str) -> None:
        """Remove a container whatever its state; a missing one is fine."""
        res = subprocess.run(self.argv("delete", "--force", cid), capture_output=True, text=True)
        if res.returncode != 0 and "does not exist" not in res.stderr + res.stdout:
            raise StateError(f"runc delete failed: {error_line(res.stderr)}")


def load_bundle(bundle: Path) -> dict[str, Any]:
    """The OCI config of ``bundle``, checked enough to give one clear error."""
    config = bundle / "config.json"
    if not config.is_file():
        raise UsageError(f"{bundle} is not an OCI bundle: no config.json")
    try:
        spec = json.loads(config.read_text())
        rootfs = bundle / spec["root"]["path"]
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{config} is not a valid OCI config: {exc}") from exc
    if not rootfs.is_dir():
        raise UsageError(f"the rootfs of bundle {bundle} is missing: {rootfs}")
    if spec.get("process", {}).get("terminal"):
        raise UsageError(f"{config} asks for a terminal", hint="set process.terminal to false: no tty is kept")
    return spec


def derive_bundle(bundle: Path, dest: Path, criu_config: Path, cgroup: str) -> Path:
    """A bundle in ``dest`` that runs ``bundle``'s rootfs with our CRIU configuration file.

    runc reads the CRIU options it cannot pass itself (the network lock, leave-stopped)
    from the file the container's ``org.criu.config`` annotation names; the user's
    bundle stays untouched. Without a cgroups path runc would use ``/ID``, shared by
    every runc root on the machine: the container gets ``cgroup`` instead.
    """
    spec = load_bundle(bundle)
    spec["root"]["path"] = str((bundle / spec["root"]["path"]).resolve())
    spec.setdefault("annotations", {})[criu.CONFIG_ANNOTATION] = str(criu_config)
    spec.setdefault("linux", {}).setdefault("cgroupsPath", cgroup)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(spec, indent=1))
    return dest
