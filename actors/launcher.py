"""``cedana-ray up`` and ``down``: the control plane on a Ray cluster.

``up`` joins the Ray cluster at an address (or ``RAY_ADDRESS``), or starts a local
head with a private temp dir when there is none, then starts the coordinator
(detached, named, on the head node) and waits until every alive node has its agent.
``down`` stops the actors ``up`` started, and the head only if ``up`` started it,
found by its private temp dir: never another Ray on the machine.

Ray runs with its token authentication on (see cedana_ray.auth): ``up`` finds the token,
or creates one for a head it starts, and starts and joins Ray with it; the dashboard
(Ray's job submission API) listens on loopback unless told otherwise.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from cedana_ray import auth, ray_private
from cedana_ray.backend import Progress
from cedana_ray.cluster import connect
from cedana_ray.cluster_state import ClusterState, load_state, save_state, state_file
from cedana_ray.config import paths
from cedana_ray.crypto import load_key
from cedana_ray.errors import PrerequisiteError, StateError, UsageError
from cedana_ray.models import LIVE_STATES, NodeStatus

AGENTS_TIMEOUT_S = 60.0
LOOPBACK = "127.0.0.1"


_handed_out: set[int] = set()


def free_port() -> int:
    """A port free now that this process has not handed out before. The kernel may give a
    port it just freed again: two of a node's services would then be told the same port,
    and the clients of the one that lost the race reach the other (Ray's runtime env agent
    answered by its metrics exporter: HTTP 405)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def node_args(temp: str, object_store_mb: int) -> list[str]:
    """`ray start` options of every node we start: a private temp dir, a bounded object
    store, and free ports where Ray's fixed defaults collide with any other Ray on the machine."""
    agent_http, agent_grpc, metrics, runtime_env = (free_port() for _ in range(4))
    return [
        f"--temp-dir={temp}",
        f"--object-store-memory={object_store_mb << 20}",
        f"--dashboard-agent-listen-port={agent_http}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}",
        f"--runtime-env-agent-port={runtime_env}",
        "--disable-usage-stats",
    ]


def start_head(dashboard_host: str = LOOPBACK, object_store_mb: int = 256) -> tuple[str, str, str]:
    """Start a local Ray head in a private temp dir: (address, temp dir, dashboard address).
    Ray's auth settings come from this process's environment (cedana_ray.auth.use)."""
    temp = tempfile.mkdtemp(prefix="cr-ray-")  # short: Ray's socket paths must stay under 108 chars
    port, dashboard = free_port(), free_port()
    ray_bin = Path(sys.executable).with_name("ray")
    args = [
        str(ray_bin),
        "start",
        "--head",
        f"--port={port}",
        "--include-dashboard=true",
        f"--dashboard-host={dashboard_host}",
        f"--dashboard-port={dashboard}",
        *node_args(temp, object_store_mb),
    ]
    # jobs (`ray job submit` entrypoints) find this cedana-ray and this Python first
    env = {**os.environ, "PATH": f"{ray_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(args, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env)
    if done.returncode != 0:
        shutil.rmtree(temp, ignore_errors=True)
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise PrerequisiteError(f"`ray start --head` failed: {last}")
    reach = LOOPBACK if dashboard_host in ("0.0.0.0", "::") else dashboard_host
    return f"127.0.0.1:{port}", temp, f"http://{reach}:{dashboard}"


def stop_head(temp_dir: str, timeout: float = 15.0) -> int:
    """Stop the Ray processes of the head started with ``temp_dir``; how many there were."""
    procs = [
        p
        for p in psutil.process_iter(["cmdline"])
        if temp_dir in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid()
    ]
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, left = psutil.wait_procs(procs, timeout=timeout)
    for p in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    shutil.rmtree(temp_dir, ignore_errors=True)
    return len(procs)


def _head_node() -> str:
    import ray

    for n in ray.nodes():
        if n["Alive"] and "node:__internal_head__" in n.get("Resources", {}):
            return n["NodeID"]
    raise PrerequisiteError("the Ray cluster has no alive head node")


def start_coordinator(base: str, storage: str, encrypt: bool = False, key: bytes | None = None) -> Any:
    from cedana_ray.remote import COORDINATOR, detached

    from .coordinator import Coordinator

    return detached(Coordinator, COORDINATOR, _head_node(), base, storage, encrypt, key, concurrency=64)


def wait_for_agents(
    coordinator: Any, timeout: float = AGENTS_TIMEOUT_S, progress: Progress | None = None
) -> list[NodeStatus]:
    """Until every alive node's agent answers."""
    import ray

    from cedana_ray.remote import call

    deadline = time.monotonic() + timeout
    while True:
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        nodes: list[NodeStatus] = call(coordinator.nodes.remote(), timeout=timeout)
        ready = {n.node for n in nodes if n.error is None}
        if progress:
            progress(f"agents ready: {len(ready & alive)} of {len(alive)} nodes", 0, 0)
        if ready >= alive:
            return nodes
        if time.monotonic() > deadline:
            raise StateError(f"agents did not start on every node within {timeout:.0f} s")
        time.sleep(0.5)


def wait_for_job_server(timeout: float = AGENTS_TIMEOUT_S) -> None:
    """Until the head's dashboard agent is registered: `ray job submit` fails before that."""
    head = _head_node()
    deadline = time.monotonic() + timeout
    while not ray_private.job_server_registered(head):
        if time.monotonic() > deadline:
            raise StateError(f"the Ray job server did not start within {timeout:.0f} s")
        time.sleep(0.5)


def _auth_token(started: bool, previous: ClusterState | None, no_auth: bool) -> Path | None:
    """The Ray auth token's file for this cluster (None: without auth), and this process set to use it."""
    # the auth of a cluster an earlier `up` joined or started does not change while it runs
    off = no_auth or auth.opted_out() or (previous is not None and previous.auth_token_file is None)
    token = None if off else auth.token_file(create=started, known=previous.auth_token_file if previous else None)
    auth.use(token)
    return token


def up(
    address: str | None = None,
    storage: str | None = None,
    dashboard_host: str | None = None,
    no_auth: bool = False,
    encrypt: bool = False,
    key: bytes | None = None,
    progress: Progress | None = None,
) -> tuple[ClusterState, list[NodeStatus]]:
    """Join (or start) Ray and start the control plane; idempotent.

    Args:
        address: the Ray cluster to join (default: ``RAY_ADDRESS``, an earlier ``up``'s,
            else start a local head).
        storage: the cluster's checkpoint store URL.
        dashboard_host: where the head's dashboard listens (default: loopback); only for a
            head ``up`` starts.
        no_auth: run Ray without token authentication (single-user machines).
        encrypt: encrypt every checkpoint of the cluster, with ``key`` (default:
            ``CEDANA_RAY_KEY``, else one made and kept in the head's state dir,
            ``cluster/encryption.key``). ``CEDANA_RAY_KEY`` set means ``encrypt``.
        progress: told each stage as it starts.

    Raises:
        UsageError: ``dashboard_host`` with a cluster ``up`` does not start.
        PrerequisiteError: Ray did not start, or there is no token to join with.
    """
    from cedana_ray.remote import call

    report = progress or (lambda stage, done, total: None)
    key = key or load_key(None)
    encrypt = encrypt or key is not None
    previous = load_state()
    address = address or os.environ.get("RAY_ADDRESS") or (previous.address if previous else None)
    if address and dashboard_host:
        raise UsageError("--dashboard-host is for a head that `up` starts, not one it joins")
    head_temp = dashboard = None
    if previous and previous.address == address:
        head_temp, dashboard = previous.head_temp_dir, previous.dashboard
    else:
        previous = None  # another cluster's: nothing of it applies
    base = str(paths().home / "cluster")
    storage = storage or os.environ.get("CEDANA_RAY_STORAGE") or f"file://{base}/checkpoints"
    started = not address
    token = _auth_token(started, previous, no_auth)
    token_file = str(token) if token else None
    if started:
        report("starting a Ray head", 0, 0)
        address, head_temp, dashboard = start_head(dashboard_host or LOOPBACK)
        # recorded at once, so that `down` finds this head even if `up` is interrupted
        save_state(
            ClusterState(
                address=address, storage=storage, base=base, head_temp_dir=head_temp, auth_token_file=token_file
            )
        )
    try:
        report(f"connecting to Ray at {address}", 0, 0)
        connect(address)
        report("starting the coordinator", 0, 0)
        coordinator = start_coordinator(base, storage, encrypt, key)
        info = call(coordinator.info.remote(), timeout=AGENTS_TIMEOUT_S)
        if encrypt and not info["encrypted"]:
            raise UsageError(
                "the control plane is already running without encryption",
                hint="`cedana-ray down` it, then `up --encrypt`",
            )
        nodes = wait_for_agents(coordinator, progress=progress)
        if dashboard:
            report("waiting for Ray's job server", 0, 0)
            wait_for_job_server()
    except BaseException:
        if started:  # a head this call started; never one an earlier `up` left running
            stop_head(head_temp)  # type: ignore[arg-type]
            state_file().unlink(missing_ok=True)
        raise
    state = ClusterState(
        address=address,
        storage=info["storage"],
        base=info["base"],
        head_temp_dir=head_temp,
        dashboard=dashboard,
        auth_token_file=token_file,
        encrypted=info["encrypted"],
        gateway=info["gateway"],
    )
    save_state(state)
    return state, nodes


def down(kill_jobs: bool = False) -> dict[str, Any]:
    """Stop what ``up`` started: the coordinator, the agents, and the head if it was ours."""
    import ray

    from cedana_ray.cluster import Cluster
    from cedana_ray.remote import NAMESPACE

    state = load_state()
    if state is None:
        raise StateError("no cluster was started from here", hint=f"{state_file()} is missing")
    try:
        client: Cluster | None = Cluster(state.address)
    except PrerequisiteError:
        client = None  # an interrupted `up`, or the head is gone: no control plane to stop
    live = [j for j in client.jobs() if j.state in LIVE_STATES] if client else []
    if live and not kill_jobs:
        raise StateError(
            f"{len(live)} job(s) still running: {', '.join(j.jid for j in live)}",
            hint="dump or kill them first, or `cedana-ray down --kill-jobs`",
        )
    for job in live:
        client.kill(job.jid)  # type: ignore[union-attr]
    actors = []
    if client:
        actors = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE]
        for name in actors:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
    ray.shutdown()
    stopped = stop_head(state.head_temp_dir) if state.head_temp_dir else 0
    state_file().unlink()
    return {"actors": len(actors), "killed_jobs": [j.jid for j in live], "head_processes": stopped}
