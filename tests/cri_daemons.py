"""CRI runtimes for tests/test_cri.py, each under a temp dir and stopped by PID: containerd
2.x (sid's, unpacked by scripts/install-cri.sh) whose CRI checkpoints, Debian 12's
containerd 1.6 whose CRI does not, and the local registry a CRI restore pulls from."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
from cedana_ray.actors.launcher import free_port
from cedana_ray.plugins.crio.client import IMAGES, Cri, messages
from servers import stop_process
from test_process_criu import wait_for

CONTAINERD2 = Path(os.environ.get("CEDANA_RAY_CONTAINERD2", "/opt/cedana-ray/containerd2")) / "bin"
COUNTER = "i=0; while true; do echo $i > /count; echo count=$i; i=$((i+1)); sleep 0.05; done"
PATH_ENV = ("PATH=/bin",)  # the CRI adds no PATH of its own
PAUSE = "exec sleep 2147483647"  # the sandbox's process; ours run in their own PID namespace
# Pods' cgroup parent (else the CRI's machine-wide /k8s.io), removed when the daemon stops
CGROUP_PARENT = f"/cedana-ray-cri-{os.getpid()}"


def config_v3(base: Path) -> str:
    """containerd 2.x: CRI with runc (its state under base), no CNI (host-network pods),
    the locally built pause image, and oom_score_adj left alone: this machine's root lacks
    CAP_SYS_RESOURCE, so the CRI default of -998 for sandboxes fails in runc."""
    return f"""version = 3
root = '{base}/root'
state = '{base}/state'
[grpc]
  address = '{base}/cri.sock'
[ttrpc]
  address = '{base}/cri.sock.ttrpc'
[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = 'localhost/pause:latest'
[plugins.'io.containerd.cri.v1.runtime']
  enable_cdi = false
  restrict_oom_score_adj = true
[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
  Root = '{base}/runc'
[plugins.'io.containerd.cri.v1.runtime'.cni]
  bin_dirs = ['{base}/cni']
  conf_dir = '{base}/cni'
[plugins.'io.containerd.internal.v1.opt']
  path = '{base}/opt'
[plugins.'io.containerd.nri.v1.nri']
  disable = true
"""


def config_v2(base: Path) -> str:
    """containerd 1.6 with its CRI plugin on (it is off in tests/containers.py)."""
    return f"""version = 2
root = "{base}/root"
state = "{base}/state"
[grpc]
  address = "{base}/cri.sock"
[ttrpc]
  address = "{base}/cri.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/pause:latest"
  restrict_oom_score_adj = true
[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = "{base}/cni"
  conf_dir = "{base}/cni"
[plugins."io.containerd.internal.v1.opt"]
  path = "{base}/opt"
"""


def _spawn(argv: list[str], base: Path, name: str, ready: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    with open(base / f"{name}.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env, stdin=subprocess.DEVNULL)
    wait_for(lambda: ready.exists() or proc.poll() is not None, what=name)
    if proc.poll() is not None:
        raise RuntimeError(f"{name} exited: {(base / f'{name}.log').read_text()[-500:]}")
    return proc


def _kill_shims(sock: Path) -> None:
    """The runc shims of this daemon outlive it: kill those still running, by PID."""
    for p in psutil.process_iter(["cmdline"]):
        if str(sock) in (p.info["cmdline"] or []) and "containerd-shim" in " ".join(p.info["cmdline"] or []):
            p.kill()


def _remove_pods(cri: Cri) -> None:
    pb = messages()
    for pod in cri.call("ListPodSandbox", pb.ListPodSandboxRequest()).items:
        cri.call("StopPodSandbox", pb.StopPodSandboxRequest(pod_sandbox_id=pod.id))
        cri.call("RemovePodSandbox", pb.RemovePodSandboxRequest(pod_sandbox_id=pod.id))
    for parent in Path("/sys/fs/cgroup").glob(f"*{CGROUP_PARENT}"):  # empty once the pods are gone
        with contextlib.suppress(OSError):
            parent.rmdir()


@contextmanager
def cri_containerd(base: Path, binary: str, config: str, images: dict[str, Path]) -> Iterator[Cri]:
    """containerd ``binary`` with ``config``, its CRI at ``base/cri.sock``; ``images`` (ref ->
    OCI archive) imported into the CRI namespace. Pods are removed and the daemon and its
    shims stopped afterwards."""
    base.mkdir(parents=True, exist_ok=True)
    (base / "config.toml").write_text(config)
    bindir = str(Path(binary).parent)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}  # its own shim, not the system's
    sock = base / "cri.sock"
    daemon = _spawn([binary, "--config", str(base / "config.toml")], base, "containerd", sock, env)
    cri = Cri(f"unix://{sock}")
    try:
        ctr = [shutil.which("ctr", path=bindir) or "ctr", "--address", str(sock), "--namespace", "k8s.io"]
        for ref, archive in images.items():
            subprocess.run([*ctr, "images", "import", "--base-name", ref.rsplit(":", 1)[0], str(archive)], check=True)
        yield cri
    finally:
        try:
            _remove_pods(cri)
        finally:
            stop_process(daemon)
            _kill_shims(sock)


@contextmanager
def registry(base: Path) -> Iterator[str]:
    """A local registry (Debian's docker-registry); yields its ``localhost:PORT``."""
    base.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (base / "registry.yml").write_text(
        f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {base}/data\nhttp:\n  addr: 127.0.0.1:{port}\n"
    )
    proc = _spawn([str(CONTAINERD2 / "docker-registry"), "serve", str(base / "registry.yml")], base, "registry", base)
    try:
        wait_for(lambda: _listening(port), what="the registry")
        yield f"localhost:{port}"
    finally:
        stop_process(proc)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def publish(cri: Cri, ref: str, archive: Path, address: str) -> str:
    """Push OCI ``archive`` to the registry at ``address`` and pull it back through the CRI:
    a CRI checkpoint then names its base image NAME@DIGEST, which a restore pulls (containerd
    2.1 pulls it even when it is present; an imported image gets a bare digest it cannot)."""
    remote = f"{address}/{ref.split('/', 1)[-1]}"
    sock = cri.target.removeprefix("unix://")
    ctr = [str(CONTAINERD2 / "ctr"), "--address", sock, "--namespace", "cedana-ray-push"]
    subprocess.run([*ctr, "images", "import", "--base-name", remote.rsplit(":", 1)[0], str(archive)], check=True)
    subprocess.run([*ctr, "images", "push", "--plain-http", remote], check=True, capture_output=True)
    subprocess.run([*ctr, "images", "rm", remote], check=True, capture_output=True)
    pb = messages()
    cri.call("PullImage", pb.PullImageRequest(image=pb.ImageSpec(image=remote)), service=IMAGES, timeout=60)
    return remote
