"""One Ray node of an allocation, as the batch script starts it (head) or ``srun`` does (workers).

``python -m cedana_ray.plugins.slurm.node head ADDRESS_FILE`` starts ``ray start --head
--block`` in a private temp dir and writes the head's address to ADDRESS_FILE once it
accepts connections; ``... worker ADDRESS`` joins it. Either stays in the foreground
until Ray exits or it is sent SIGTERM, SIGINT or SIGUSR2 (forwarded to Ray as SIGTERM,
which stops its processes), then removes its temp dir: nothing of Ray outlives the
allocation. (USR2 is what the batch script sends the workers through srun, which passes
it on as it is but turns TERM into a SIGKILL of the step.)

Workloads detach from Ray (their supervisor double-forks) so that they outlive an agent
restart; the starter is their child subreaper, so they stay in the job step's process
tree, where SLURM finds and stops them when the job ends (proctrack/linuxproc follows
parent PIDs), and the starter stops any still running when its Ray is gone.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from cedana_ray.actors.launcher import free_port, node_args

HEAD_TIMEOUT_S = 120.0
STOP_GRACE_S = 5
PR_SET_CHILD_SUBREAPER = 36


def _become_subreaper() -> None:
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _reap_orphans(ray: subprocess.Popen[bytes]) -> None:
    """Collect the exit status of adopted orphans (not Ray's: ``ray.wait()`` wants it)."""
    while True:
        with contextlib.suppress(ChildProcessError):
            found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if found is not None and found.si_pid != ray.pid:
                os.waitpid(found.si_pid, 0)
                continue
        return


def _stop_leftovers() -> None:
    """Kill what is left below us once Ray is gone: workloads whose checkpoint did not happen."""
    left = psutil.Process().children(recursive=True)
    for p in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(left, timeout=5)


def _accepts(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except OSError:
        return False


def _publish_when_up(ray: subprocess.Popen[bytes], address: str, out: Path) -> None:
    """Write ``address`` to ``out`` (atomically) once the head's GCS accepts connections."""
    deadline = time.monotonic() + HEAD_TIMEOUT_S
    while not _accepts(address):
        if ray.poll() is not None or time.monotonic() > deadline:
            sys.exit(f"the Ray head at {address} did not come up")
        time.sleep(0.2)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(address + "\n")
    tmp.replace(out)


def _kill_group(ray: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(ray.pid, signal.SIGKILL)


def _stop_ray(ray: subprocess.Popen[bytes]) -> None:
    """Stop Ray within STOP_GRACE_S, or kill its process group: SLURM kills the whole job
    after KillWait (30 s by default), and we want to clean up before."""
    ray.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        ray.wait(STOP_GRACE_S)
    _kill_group(ray)
    ray.wait()


def _ray_command(args: argparse.Namespace, temp: str) -> tuple[list[str], str]:
    """``ray start`` for this node, and the address of the allocation's head."""
    from ray.util import get_node_ip_address

    # a worker takes the address of its interface on the route to the head, which need not be
    # the default route's (compute nodes often have none); the head, the default route's
    ip = get_node_ip_address(None if args.role == "head" else args.target)
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--block", f"--node-ip-address={ip}"]
    cmd += node_args(temp, args.object_store_mb)
    if args.role == "worker":
        return [*cmd, f"--address={args.target}"], args.target
    port = free_port()
    cmd += ["--head", f"--port={port}", "--include-dashboard=false"]
    # the headless dashboard (job server) and the client server still run: no fixed ports
    cmd += [f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}"]
    return cmd, f"{ip}:{port}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cedana_ray.plugins.slurm.node")
    parser.add_argument("role", choices=["head", "worker"])
    parser.add_argument("target", help="head: file to write the address to; worker: the head's address")
    parser.add_argument("--object-store-mb", type=int, default=256)
    args = parser.parse_args(argv)

    temp = tempfile.mkdtemp(prefix="crs-")  # short: Ray's socket paths must stay under 108 chars
    cmd, address = _ray_command(args, temp)
    _become_subreaper()
    # The allocation's Ray goes away as a whole: no node of it needs draining first (for
    # Serve), which on SIGTERM Ray would otherwise wait for, up to 30 s, for every node
    env = {**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    # its own process group, with every Ray process it starts: see _stop_ray
    ray = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    # SLURM stops a job step with SIGTERM: Ray's --block then stops every process it started;
    # should that hang (a raylet trying to reach a GCS that got the same SIGTERM), cut it short
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR2):
        signal.signal(sig, lambda *_: (ray.terminate(), signal.alarm(STOP_GRACE_S)))
    signal.signal(signal.SIGALRM, lambda *_: _kill_group(ray))
    signal.signal(signal.SIGCHLD, lambda *_: _reap_orphans(ray))
    try:
        if args.role == "head":
            _publish_when_up(ray, address, Path(args.target))
        return ray.wait()
    finally:
        _stop_ray(ray)
        _stop_leftovers()
        shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
