"""The cedana-ray OCI image and a cluster node's setup, in privileged podman containers.

The image (Containerfile, built by scripts/build-image.sh on a local debootstrap base, as
`make image` builds it) holds CRIU and cedana-ray: `check` passes inside it, and a process
job there is dumped and restored and counts on. cluster.yaml's setup_commands, run as Ray's
launcher runs them, leave a bare Debian node (the image's base, before cedana-ray) with a
working cedana-ray, and refuse to start without a checkpoint store.
"""

from __future__ import annotations

import io
import json
import os
import re
import resource
import secrets
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "scripts" / "build-image.sh"
PODMAN = ("podman", "--storage-driver", "vfs")  # the storage scripts/build-image.sh builds into
STORAGE = "file:///srv/checkpoints"  # the test node's "shared" store: no S3 or GCS is reachable from it
COUNTER = "i=0; while true; do echo count=$i; i=$((i+1)); sleep 0.1; done"
# The first build takes minutes (debootstrap, then Debian's and PyPI's packages); a build of
# the same inputs is skipped (scripts/build-image.sh), and so is a base rootfs already made.
BUILD_TIMEOUT_S = 900

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="builds images and runs privileged containers: needs root"),
]


def run(*argv: object, ok: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run ``argv``; its output is shown only when it fails (``ok``) and the test with it."""
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kwargs)
    if ok:
        assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def build(*args: str) -> str:
    """scripts/build-image.sh ARGS: the name of the image it built (or found already built)."""
    done = run("bash", BUILD, *args, env={**os.environ, "PYTHON": sys.executable}, timeout=BUILD_TIMEOUT_S)
    return done.stdout.strip().splitlines()[-1]


def privileged() -> list[str]:
    """`podman run` options of a privileged container as CRIU needs one (every capability,
    no seccomp filter, /proc and /sys writable), on the host's network.

    runc is the runtime `make setup` installs (podman's default, crun, is not installed).
    Podman asks the runtime for nofile and nproc limits of 1048576; raising a hard limit
    needs CAP_SYS_RESOURCE, which root lacks on our machines, so the container keeps ours
    (nofile) or a lower one (nproc: the runtime itself runs under a lower one than ours)."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    limits = ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", "nproc=4096:4096"]
    return ["--privileged", "--runtime", "runc", "--network", "host", *limits]


def container(image: str) -> Iterator[str]:
    """A privileged container of ``image`` that idles until the test is done, then goes."""
    name = f"cedana-ray-test-{os.getpid()}-{secrets.token_hex(3)}"
    run(*PODMAN, "run", "-d", "--name", name, *privileged(), "--entrypoint", "sleep", image, "infinity", timeout=300)
    try:
        yield name
    finally:
        run(*PODMAN, "rm", "-f", "-t", "0", name, ok=False, timeout=120)


def inside(name: str, *argv: str, ok: bool = True, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """``argv`` run in container ``name``."""
    if stdin is None:
        return run(*PODMAN, "exec", name, *argv, ok=ok, timeout=600)
    done = subprocess.run([*PODMAN, "exec", "-i", name, *argv], input=stdin, capture_output=True, timeout=600)
    assert not ok or done.returncode == 0, done.stderr.decode()[-3000:]
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def node() -> Iterator[str]:
    """A privileged container of the cedana-ray image."""
    yield from container(build())


def counts(name: str, jid: str) -> list[int]:
    log = inside(name, "cedana-ray", "logs", jid).stdout
    return [int(n) for n in re.findall(r"^count=(\d+)$", log, re.M)]


@pytest.mark.timeout(BUILD_TIMEOUT_S + 120)
def test_the_image_holds_criu_and_cedana_ray_with_its_extras(node: str) -> None:
    check = json.loads(inside(node, "cedana-ray", "check", "--json").stdout)
    assert check["ok"], check
    by = {(c["component"], c["name"]): c for c in check["checks"]}
    assert by[("criu", "version")]["ok"] and by[("plugin process", "nsinit")]["ok"], by
    version = inside(node, "criu", "--version").stdout
    assert re.search(r"^Version: (4\.([2-9]|\d\d)|[5-9])", version, re.M), version
    assert inside(node, "cedana-ray", "--version").stdout.startswith("cedana-ray, version ")
    errors = json.loads(inside(node, "cedana-ray", "features", "--errors", "--json").stdout)["errors"]
    # the extras are in: what is left is credentials (storage) or a CRI endpoint (crio, k8s)
    for plugin in ("storage/s3", "storage/gcs", "crio", "k8s"):
        assert "extra" not in " ".join(errors.get(plugin, [])), errors[plugin]


@pytest.mark.timeout(BUILD_TIMEOUT_S + 120)
def test_a_process_job_in_the_image_is_dumped_and_restored(node: str) -> None:
    inside(node, "cedana-ray", "run", "process", "--jid", "counter", "--", "sh", "-c", COUNTER)
    wait_for(lambda: len(counts(node, "counter")) >= 5, 30, "the job counting")
    dump = json.loads(inside(node, "cedana-ray", "dump", "job", "counter", "--json").stdout)
    stopped = counts(node, "counter")
    time.sleep(0.5)
    assert counts(node, "counter") == stopped, "the dump stopped the job"
    restore = json.loads(inside(node, "cedana-ray", "restore", "job", "counter", "--json").stdout)
    assert restore["checkpoint"] == dump["checkpoint"] and restore["state"] == "running", restore
    wait_for(lambda: len(counts(node, "counter")) >= len(stopped) + 5, 30, "the restored job counting")
    found = counts(node, "counter")
    assert found == list(range(len(found))), "it counted on from where it stopped: no restart, gap or repeat"


def checkout() -> bytes:
    """This checkout as Ray's `file_mounts` would copy it (git's files; no .venv or .git), as a tar."""
    listed = run("git", "-C", ROOT, "ls-files", "-z", "-co", "--exclude-standard").stdout.split("\0")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in filter(None, listed):
            if (ROOT / path).exists():
                tar.add(ROOT / path, arcname=path, recursive=False)
    return buf.getvalue()


def as_ray_runs_it(command: str) -> list[str]:
    """``command`` as Ray's launcher runs a setup command over SSH: its own wrapper, in the remote shell."""
    from ray.autoscaler._private.command_runner import _with_interactive

    return ["sh", "-c", " ".join(_with_interactive(command))]


def mount_files(name: str, env: str) -> None:
    """cluster.yaml's file_mounts: the checkout, the auth token, and cluster.env holding ``env``."""
    inside(name, "sh", "-c", "mkdir -p ~/cedana-ray && tar -C ~/cedana-ray -xf -", stdin=checkout())
    state = "~/.local/state/cedana-ray"
    inside(name, "sh", "-c", f"mkdir -p {state} && cat > {state}/ray-auth-token", stdin=secrets.token_hex(32).encode())
    inside(name, "sh", "-c", f"cat > {state}/cluster.env", stdin=env.encode())


def setup_commands() -> list[str]:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())["setup_commands"]


@pytest.fixture(scope="module")
def bare_node() -> Iterator[str]:
    """A privileged container of a bare Debian bookworm (the image's base, before cedana-ray)."""
    yield from container(build("--base"))


@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_cluster_setup_refuses_a_node_without_a_checkpoint_store(bare_node: str) -> None:
    mount_files(bare_node, "# no CEDANA_RAY_STORAGE\n")
    for command in setup_commands():  # as Ray's launcher: up to the first that fails
        done = inside(bare_node, *as_ray_runs_it(command), ok=False)
        if done.returncode != 0:
            break
    assert done.returncode != 0, "setup went through without a checkpoint store"
    assert "cedana-ray: set CEDANA_RAY_STORAGE (an s3://, gs:// or shared file:// URL) in " in done.stderr
    assert inside(bare_node, "test", "-e", "/opt/cedana-ray/venv", ok=False).returncode != 0, "nothing was installed"


@pytest.mark.timeout(BUILD_TIMEOUT_S)
def test_cluster_setup_leaves_a_bare_debian_node_with_a_working_cedana_ray(bare_node: str) -> None:
    mount_files(bare_node, f"CEDANA_RAY_STORAGE={STORAGE}\n")
    for command in setup_commands():
        done = inside(bare_node, *as_ray_runs_it(command), ok=False)
        assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    login = lambda cmd: inside(bare_node, *as_ray_runs_it(cmd))  # noqa: E731 -- a later SSH login, as Ray's
    check = json.loads(login("cedana-ray check --json").stdout)
    assert check["ok"], check
    store = next(c for c in check["checks"] if c["name"] == "default store")
    assert store["detail"].startswith(f"{STORAGE}: "), store  # cluster.env reaches every shell
    assert login("cedana-ray --version").stdout.startswith("cedana-ray, version ")
    features = json.loads(login("cedana-ray features --errors --json").stdout)
    assert features["features"]["Dump command"]["process"] == "implemented", features
    assert "extra" not in " ".join(features["errors"].get("storage/s3", [])), features["errors"]
    assert login("echo $RAY_AUTH_MODE").stdout.split()[-1] == "token"
