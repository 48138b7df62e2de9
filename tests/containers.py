"""Shared fixtures' builders for the container runtime tests (and bench/containers.py):
a busybox rootfs, a cached Debian rootfs with Python, OCI bundles and images over them,
and reading a container's output (no registry pulls)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from test_process_criu import wait_for

from cedana_ray.engine import Engine
from cedana_ray.requests import DumpRequest, RestoreRequest

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "sleep", "echo", "cat", "true", "ls")
# Prints a counter to stdout, a pipe owned by the runtime (never a host file: CRIU
# cannot dump a container whose stdout is a host file outside its mounts).
COUNTER = "i=0; while true; do echo count=$i; i=$((i+1)); sleep 0.05; done"

# The Python container: Debian bookworm minbase with python3-minimal, from the machine's
# own Debian mirror (the only archive reachable here), built once and cached.
DEBOOTSTRAP = ("--variant=minbase", "--include=python3-minimal", "bookworm")
MINBASE = ("--variant=minbase", "bookworm")  # what a debian:bookworm-slim image holds, near enough
DEFAULT_MIRROR = "http://deb.debian.org/debian"
STARTUP_S = 60.0  # 256 MiB of urandom and two sha256 passes, on two busy cores
# Not needed to run python3 in a container, and half the rootfs: less for umoci to pack.
# dev: the runtime mounts its own, and copying a device node would read the device.
TRIM = ("dev", "var/cache/apt", "var/lib/apt/lists", "usr/share/doc", "usr/share/locale", "usr/share/man")
# Holds MIB MiB of random bytes and prints their sha256, then counts on stdout like COUNTER
# and re-checks the sha256 every 200 counts and on SIGUSR1 (`verified sha256=...`).
CHECKSUMMED = """
import hashlib, os, signal, sys, time
buf = os.urandom(int(sys.argv[1]) << 20)
print(f"sha256={hashlib.sha256(buf).hexdigest()}", flush=True)
asked = []
signal.signal(signal.SIGUSR1, lambda *_: asked.append(1))
i = 0
while True:
    if asked or i % 200 == 0:
        asked.clear()
        print(f"verified sha256={hashlib.sha256(buf).hexdigest()}", flush=True)
    print(f"count={i}", flush=True)
    i += 1
    time.sleep(0.05)
"""
# Counts to stdout and /dev/shm/count, and nothing else: for containers whose settings are what a test is about.
COUNT = """
import time
i = 0
while True:
    print(f"count={i}", flush=True)
    with open("/dev/shm/count", "w") as f:
        f.write(str(i))
    i += 1
    time.sleep(0.05)
"""


def read_count(path: Path | str) -> int:
    """The number a counter keeps in PATH, or -1 where there is none. `echo $i > FILE`
    truncates before it writes, so an empty read is the counter mid-write: read again."""
    for _ in range(100):
        try:
            text = Path(path).read_text()
        except OSError:
            return -1
        if text.strip():
            return int(text)
        time.sleep(0.005)
    return -1


def missing(*binaries: str) -> str | None:
    """Why these tests cannot run here, or None."""
    gone = [b for b in binaries if not shutil.which(b)]
    if gone:
        return f"{', '.join(gone)} not installed (run `make setup`)"
    if not BUSYBOX.is_file() or b"ld-linux" in BUSYBOX.read_bytes()[:4096]:  # a dynamic one names its loader
        return "busybox-static not installed (run `make setup`)"
    return None


def checksummed_cmd(mib: int = 256) -> list[str]:
    """The command of the Python container holding ``mib`` MiB."""
    return ["python3", "-u", "-c", CHECKSUMMED, str(mib)]


def cache_dir() -> Path:
    """Built test images, kept across test runs and shared with the benchmarks."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cedana-ray"
    return Path(os.environ.get("CEDANA_RAY_TEST_CACHE") or default)


def cached(dest: Path, build: Callable[[Path], None]) -> Path:
    """``dest``, made once by ``build(tmp)`` and renamed into place: a path that exists is
    complete. A lock keeps concurrent test runs from building it twice."""
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not dest.exists():
            for stale in dest.parent.glob(f".{dest.name}.*/"):  # a build that was killed
                shutil.rmtree(stale)
            with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}.") as tmp:
                build(Path(tmp) / dest.name)
                (Path(tmp) / dest.name).rename(dest)
    return dest


def debian_mirror() -> str:
    """The Debian archive this machine's apt uses for bookworm (deb822 or one-line sources)."""
    lists = Path("/etc/apt/sources.list.d")
    for path in [Path("/etc/apt/sources.list"), *sorted(lists.glob("*.sources")), *sorted(lists.glob("*.list"))]:
        text = path.read_text() if path.is_file() else ""
        for stanza in text.split("\n\n"):
            uris = re.search(r"^URIs:\s*(\S+)", stanza, re.M)
            if uris and re.search(r"^Suites:.*\bbookworm\b", stanza, re.M):
                return uris.group(1)
        if found := re.search(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+bookworm\s", text, re.M):
            return found.group(1)
    return DEFAULT_MIRROR


def debian_rootfs(name: str, args: tuple[str, ...]) -> Path:
    """A trimmed Debian rootfs (`debootstrap ARGS DEST MIRROR`) from this machine's mirror,
    cached as NAME-KEY, KEY a hash of the debootstrap arguments, the mirror and the trim."""
    mirror = debian_mirror()
    key = hashlib.sha256(json.dumps([*args, mirror, TRIM]).encode()).hexdigest()[:12]

    def build(dest: Path) -> None:
        done = subprocess.run(["debootstrap", *args, str(dest), mirror], capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"debootstrap from {mirror} failed: {tail[0]}")
        for path in TRIM:
            shutil.rmtree(dest / path)
            (dest / path).mkdir()

    return cached(cache_dir() / "rootfs" / f"{name}-{key}", build)


def python_rootfs() -> Path:
    """A Debian rootfs with python3 (`debootstrap --variant=minbase --include=python3-minimal
    bookworm`), cached under a key of the debootstrap arguments and the mirror."""
    return debian_rootfs("bookworm-python3", DEBOOTSTRAP)


def minbase_rootfs() -> Path:
    """Plain Debian bookworm minbase (`debootstrap --variant=minbase bookworm`): the local base
    of the cedana-ray image (scripts/build-image.sh) and the bare node of the cluster.yaml test."""
    return debian_rootfs("bookworm-minbase", MINBASE)


def busybox_rootfs(dest: Path) -> Path:
    """A root filesystem holding only a static busybox and its applets."""
    (dest / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, dest / "bin" / "busybox")
    for applet in APPLETS:
        (dest / "bin" / applet).symlink_to("busybox")
    for d in ("proc", "dev", "sys", "tmp"):
        (dest / d).mkdir()
    return dest


def bundle(dest: Path, rootfs: Path, script: str = COUNTER, cmd: list[str] | None = None) -> Path:
    """An OCI bundle (``runc spec``, no terminal) running ``cmd`` (default ``sh -c SCRIPT``) in ``rootfs``."""
    dest.mkdir(parents=True)
    subprocess.run(["runc", "spec", "--bundle", str(dest)], check=True)
    config = dest / "config.json"
    spec = json.loads(config.read_text())
    spec["process"].update(terminal=False, args=cmd or ["sh", "-c", script])
    spec["root"] = {"path": str(rootfs), "readonly": True}
    config.write_text(json.dumps(spec, indent=1))
    return dest


def counts(log: Path) -> list[int]:
    text = log.read_text() if log.exists() else ""
    return [int(m.group(1)) for ln in text.splitlines() if (m := re.fullmatch(r"count=(\d+)", ln))]


def last_count(log: Path) -> int:
    found = counts(log)
    return found[-1] if found else -1


def checksums(text: str) -> list[str]:
    """The Python container's sha256 lines (first, then each re-check), in order."""
    return re.findall(r"^(?:verified )?sha256=([0-9a-f]{64})$", text, re.M)


def assert_checksum_kept(engine: Engine, jid: str, request: DumpRequest) -> None:
    """Dump, kill and restore the Python container job ``jid``: after the restore it counts on
    from where it stopped, and the sha256 of its buffer, re-checked on request, is the one it
    printed before the dump."""
    log = engine.paths.job_dir(jid) / "log"
    wait_for(lambda: last_count(log) >= 3, timeout=STARTUP_S, what=f"{jid} holding its buffer and counting")
    engine.dump(jid, request)
    stopped_at, seen = last_count(log), log.stat().st_size
    job = engine.restore(RestoreRequest(), jid=jid).job
    os.kill(job.pid, signal.SIGUSR1)  # the container's init: python handles it, so it is delivered
    after = lambda: engine.read_log(jid, seen).decode()  # noqa: E731
    wait_for(lambda: checksums(after()) and last_count(log) > stopped_at + 3, timeout=STARTUP_S, what="a re-check")
    found, sums = counts(log), checksums(log.read_text())
    assert found == list(range(len(found))), "counting went on without a restart, a gap or a repeat"
    assert len(sums) >= 3 and set(sums) == {sums[0]}, f"the buffer changed across the restore: {sums}"


def oci_image(rootfs: Path, layout: Path, script: str, cmd: list[str] | None = None, env: tuple[str, ...] = ()) -> Path:
    """An OCI image archive of ``rootfs`` running ``cmd`` (default ``sh -c SCRIPT``) with ``env``
    (``K=V``), built with umoci."""
    tag = f"{layout}:latest"
    unpacked = layout.parent / "unpacked"
    subprocess.run(["umoci", "init", "--layout", str(layout)], check=True)
    subprocess.run(["umoci", "new", "--image", tag], check=True)
    subprocess.run(["umoci", "unpack", "--image", tag, str(unpacked)], check=True, capture_output=True)
    shutil.rmtree(unpacked / "rootfs")
    shutil.copytree(rootfs, unpacked / "rootfs", symlinks=True)
    subprocess.run(["umoci", "repack", "--image", tag, str(unpacked)], check=True)
    config = [a for arg in cmd or ["sh", "-c", script] for a in ("--config.cmd", arg)]
    config += [arg for kv in env for arg in ("--config.env", kv)]
    subprocess.run(["umoci", "config", "--image", tag, *config], check=True)
    archive = layout.with_suffix(".tar")
    subprocess.run(["tar", "-C", str(layout), "-cf", str(archive), "."], check=True)
    return archive


def python_image() -> Path:
    """The OCI archive of the Python container (cached beside its rootfs)."""
    rootfs = python_rootfs()
    cmd = checksummed_cmd()
    key = hashlib.sha256(json.dumps(cmd).encode()).hexdigest()[:12]

    def build(dest: Path) -> None:
        dest.mkdir()
        shutil.move(oci_image(rootfs, dest / "layout", "", cmd), dest / "image.tar")
        shutil.rmtree(dest / "layout")
        shutil.rmtree(dest / "unpacked")

    return cached(cache_dir() / "oci" / f"{rootfs.name}-{key}", build) / "image.tar"


if __name__ == "__main__":  # scripts/build-image.sh builds its local base on this rootfs
    print(minbase_rootfs())
