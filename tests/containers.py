"""Shared fixtures' builders for the container runtime tests: a busybox rootfs, OCI
bundles over it, and reading a counter container's output (no registry pulls)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "sleep", "echo", "cat", "true", "ls")
# Prints a counter to stdout, a pipe owned by the runtime (never a host file: CRIU
# cannot dump a container whose stdout is a host file outside its mounts).
COUNTER = "i=0; while true; do echo count=$i; i=$((i+1)); sleep 0.05; done"


def missing(*binaries: str) -> str | None:
    """Why these tests cannot run here, or None."""
    gone = [b for b in binaries if not shutil.which(b)]
    if gone:
        return f"{', '.join(gone)} not installed (run `make setup`)"
    if not BUSYBOX.is_file() or b"ld-linux" in BUSYBOX.read_bytes()[:4096]:  # a dynamic one names its loader
        return "busybox-static not installed (run `make setup`)"
    return None


def busybox_rootfs(dest: Path) -> Path:
    """A root filesystem holding only a static busybox and its applets."""
    (dest / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, dest / "bin" / "busybox")
    for applet in APPLETS:
        (dest / "bin" / applet).symlink_to("busybox")
    for d in ("proc", "dev", "sys", "tmp"):
        (dest / d).mkdir()
    return dest


def bundle(dest: Path, rootfs: Path, script: str = COUNTER) -> Path:
    """An OCI bundle (``runc spec``, no terminal) running ``sh -c SCRIPT`` in ``rootfs``."""
    dest.mkdir(parents=True)
    subprocess.run(["runc", "spec", "--bundle", str(dest)], check=True)
    config = dest / "config.json"
    spec = json.loads(config.read_text())
    spec["process"].update(terminal=False, args=["sh", "-c", script])
    spec["root"] = {"path": str(rootfs), "readonly": True}
    config.write_text(json.dumps(spec, indent=1))
    return dest


def wait_for(check: Callable[[], object], timeout: float = 15.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def counts(log: Path) -> list[int]:
    text = log.read_text() if log.exists() else ""
    return [int(m.group(1)) for ln in text.splitlines() if (m := re.fullmatch(r"count=(\d+)", ln))]


def last_count(log: Path) -> int:
    found = counts(log)
    return found[-1] if found else -1
