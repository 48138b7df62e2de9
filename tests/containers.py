"""Shared fixtures' builders for the container runtime tests: a busybox rootfs, OCI
bundles over it, and reading a counter container's output (no registry pulls)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from test_process_criu import wait_for

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


def counts(log: Path) -> list[int]:
    text = log.read_text() if log.exists() else ""
    return [int(m.group(1)) for ln in text.splitlines() if (m := re.fullmatch(r"count=(\d+)", ln))]


def last_count(log: Path) -> int:
    found = counts(log)
    return found[-1] if found else -1


def oci_image(rootfs: Path, layout: Path, script: str, env: tuple[str, ...] = ()) -> Path:
    """An OCI image archive of ``rootfs`` running ``sh -c SCRIPT`` with ``env`` (``K=V``), built with umoci."""
    tag = f"{layout}:latest"
    unpacked = layout.parent / "unpacked"
    subprocess.run(["umoci", "init", "--layout", str(layout)], check=True)
    subprocess.run(["umoci", "new", "--image", tag], check=True)
    subprocess.run(["umoci", "unpack", "--image", tag, str(unpacked)], check=True, capture_output=True)
    shutil.rmtree(unpacked / "rootfs")
    shutil.copytree(rootfs, unpacked / "rootfs", symlinks=True)
    subprocess.run(["umoci", "repack", "--image", tag, str(unpacked)], check=True)
    config = ["--config.cmd", "sh", "--config.cmd", "-c", "--config.cmd", script]
    config += [arg for kv in env for arg in ("--config.env", kv)]
    subprocess.run(["umoci", "config", "--image", tag, *config], check=True)
    archive = layout.with_suffix(".tar")
    subprocess.run(["tar", "-C", str(layout), "-cf", str(archive), "."], check=True)
    return archive


def start_containerd(base: Path) -> subprocess.Popen[bytes]:
    """containerd with its config, root, state and socket under ``base`` (CRI disabled)."""
    config = base / "config.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{base}/root"\nstate = "{base}/state"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{base}/containerd.sock"\n'
        f'[ttrpc]\n  address = "{base}/containerd.sock.ttrpc"\n'
        f'[debug]\n  address = "{base}/debug.sock"\n'
    )
    with open(base / "containerd.log", "wb") as log:
        daemon = subprocess.Popen(["containerd", "--config", str(config)], stdout=log, stderr=log)
    wait_for(lambda: (base / "containerd.sock").exists() or daemon.poll() is not None, what="containerd")
    if daemon.poll() is not None:
        raise RuntimeError(f"containerd exited: {(base / 'containerd.log').read_text()[-500:]}")
    return daemon
