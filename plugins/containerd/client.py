"""containerd through ``ctr``: one socket, one namespace, errors as one line.

Why ``ctr`` and not the gRPC API: ``ctr`` ships with containerd (so its version always
matches the daemon's), it already implements the checkpoint and restore flows we need
(``ctr c checkpoint --task --rw``, ``ctr c restore --live --rw``, OCI export/import of
the checkpoint image), and it needs no Python dependency: the gRPC route would add
grpcio plus generated containerd protobufs and re-implement those flows client-side.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cedana_ray.errors import CedanaError, PrerequisiteError, StateError
from cedana_ray.retry import until

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
DEFAULT_NAMESPACE = "cedana-ray"
INSTALL_HINT = "run `make setup` (scripts/install-containers.sh) to install containerd"


def binary() -> str:
    path = shutil.which("ctr")
    if not path:
        raise PrerequisiteError("ctr not found on PATH", hint=INSTALL_HINT)
    return path


def error_line(text: str) -> str:
    """ctr's own message: its last ``ctr: ...`` line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    found = [ln.removeprefix("ctr: ") for ln in lines if ln.startswith("ctr: ")]
    return (found or lines or ["no output"])[-1]


@dataclass(frozen=True)
class Ctr:
    """``ctr --address ADDRESS --namespace NAMESPACE``."""

    address: str
    namespace: str

    @classmethod
    def from_env(cls) -> Ctr:
        """The daemon of ``CONTAINERD_ADDRESS`` (default the system's) and ``CONTAINERD_NAMESPACE``."""
        return cls(
            os.environ.get("CONTAINERD_ADDRESS") or DEFAULT_ADDRESS,
            os.environ.get("CONTAINERD_NAMESPACE") or DEFAULT_NAMESPACE,
        )

    def argv(self, *args: str) -> list[str]:
        """The command line of ``ctr ARGS`` against our daemon and namespace."""
        if not os.path.exists(self.address):
            raise PrerequisiteError(f"containerd is not listening on {self.address}", hint="set CONTAINERD_ADDRESS")
        return [binary(), "--address", self.address, "--namespace", self.namespace, *args]

    def call(self, *args: str, error: type[CedanaError] = StateError) -> str:
        """Run ``ctr ARGS``; its stdout, or ``error`` with ctr's own message."""
        res = subprocess.run(self.argv(*args), capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if res.returncode != 0:
            raise error(f"ctr {' '.join(args[:2])} failed: {error_line(res.stderr or res.stdout)}")
        return res.stdout

    def tasks(self) -> dict[str, tuple[int, str]]:
        """Container id -> (task PID, status: RUNNING, PAUSED, STOPPED...)."""
        rows = [ln.split() for ln in self.call("tasks", "ls").splitlines()[1:]]
        return {r[0]: (int(r[1]), r[2]) for r in rows if len(r) >= 3}

    def containers(self) -> dict[str, str]:
        """Container id -> image."""
        rows = [ln.split() for ln in self.call("containers", "ls").splitlines()[1:]]
        return {r[0]: r[1] for r in rows if len(r) >= 2}

    def images(self) -> set[str]:
        return set(self.call("images", "ls", "-q").split())

    def image(self, ref: str) -> dict[str, str]:
        """The media type and digest of image ``ref``'s target."""
        for row in self.call("images", "ls").splitlines()[1:]:
            fields = row.split()
            if fields and fields[0] == ref:
                return {"mediaType": fields[1], "digest": fields[2]}
        raise StateError(f"no image {ref} in containerd namespace {self.namespace}")

    def content_root(self) -> Path:
        """The directory of the daemon's content store (the content plugin exports it)."""
        for line in self.call("plugins", "ls", "--detailed", "id==content").splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[0] == "root":
                return Path(fields[1])
        raise PrerequisiteError(f"containerd at {self.address} does not say where its content store is")

    def snapshots(self) -> set[str]:
        return {ln.split()[0] for ln in self.call("snapshots", "ls").splitlines()[1:] if ln.strip()}

    def remove(self, cid: str) -> None:
        """Delete the container's task, the container and its snapshot; missing ones are fine
        (the ctr of a task's watcher deletes the task once it exits, maybe meanwhile). A task
        that never ran (CREATED, as a failed restore leaves it) is deleted without --force:
        that would wait forever for it to exit."""
        started = self.tasks().get(cid, (0, "STOPPED"))[1] not in ("CREATED", "STOPPED")
        for args in (("tasks", "rm", *(["--force"] if started else []), cid), ("containers", "rm", cid)):
            try:
                self.call(*args)
            except StateError as exc:
                if "not found" in str(exc) or ("ttrpc: closed" in str(exc) and self._task_gone(cid)):
                    continue
                raise

    def _task_gone(self, cid: str, wait_s: float = 3.0) -> bool:
        """Whether the task goes within ``wait_s``: its shim closing the connection mid-call
        ("ttrpc: closed") means it exits along with a task the watcher deleted meanwhile."""
        return until(lambda: cid not in self.tasks(), wait_s, 0.1)
