"""The Ray control plane on a real multi-node Ray cluster (several raylets on this machine).

Nodes come from ``ray.cluster_utils.Cluster``, which starts and stops its own processes;
jobs are real CRIU-checkpointed processes started by the agents.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import ray
from cedana_ray.actors import launcher
from cedana_ray.actors.migration import through_store_by_default
from cedana_ray.actors.placement import named
from cedana_ray.actors.store_server import STORE
from cedana_ray.plugins.containerd.client import Ctr
from cedana_ray.plugins.containerd.plugin import ContainerdRunRequest
from cedana_ray.plugins.crio.client import Cri
from cedana_ray.plugins.runc.plugin import RuncRunRequest
from cedana_ray.plugins.runc.runtime import Runc
from conftest import kill_jobs
from containerd_daemon import start_containerd
from containers import bundle, busybox_rootfs, missing, oci_image
from ray.cluster_utils import Cluster as RayCluster
from servers import stop_process
from test_containerd import IMAGE as COUNTER_IMAGE
from test_containerd import NEEDS as CONTAINERD_NEEDS
from test_containerd import SCRIPT as CONTAINERD_COUNTER
from test_cri import WHY as NO_CRI
from test_cri import count as cri_count
from test_cri import run_counter as run_cri_counter
from test_process_criu import COUNTER, WORKLOADS, wait_for
from test_wait import counts_to

from cedana_ray import ray_private
from cedana_ray.cluster import Cluster
from cedana_ray.crypto import ALGORITHM
from cedana_ray.errors import CedanaError, JobNotFound, NotFoundError, PrerequisiteError, StateError, UsageError
from cedana_ray.follow import follow
from cedana_ray.models import Compression, EventKind, Job, JobState
from cedana_ray.remote import COORDINATOR, NAMESPACE, agent_name, call
from cedana_ray.requests import DumpRequest, ManageRequest, MigrateRequest, Resources, RestoreRequest, RunRequest
from cedana_ray.signing import KEY_FILE as SIGNING_KEY
from cedana_ray.signing import Signer
from cedana_ray.store import MANIFEST, CheckpointStore, split_url
from cedana_ray.working_dir import pack

pytestmark = [pytest.mark.criu, pytest.mark.ray, pytest.mark.timeout(180)]
HEAVY = [sys.executable, str(WORKLOADS / "heavy_counter.py"), "256"]
NODE_ARGS = {"num_cpus": 1, "object_store_memory": 80 << 20}


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    home = tmp_path_factory.mktemp("cluster-home")
    with cedana_cluster(home, [NODE_ARGS, NODE_ARGS], encrypt=True) as cluster:  # every test checks encryption too
        yield cluster


@contextlib.contextmanager
def cedana_cluster(
    home: Path, nodes: list[dict[str, Any]], env: dict[str, str] | None = None, **up: Any
) -> Iterator[RayCluster]:
    """A Ray cluster of ``nodes`` (``add_node`` arguments, the head's first) on this machine, with
    cedana-ray up on it (``up``: :func:`launcher.up`'s options) and its state under ``home``;
    ``env`` for every process it starts. What it started is stopped after, by PID."""
    with pytest.MonkeyPatch.context() as mp:
        for var, value in {"CEDANA_RAY_HOME": str(home), "RAY_AUTH_MODE": "disabled", **(env or {})}.items():
            mp.setenv(var, value)
        mp.delenv("RAY_ADDRESS", raising=False)
        before = ray_processes()
        cluster = RayCluster(initialize_head=True, head_node_args=nodes[0])
        for args in nodes[1:]:
            cluster.add_node(**args)
        try:
            launcher.up(address=cluster.address, **up)
            yield cluster
        finally:
            ray.shutdown()
            cluster.shutdown()
            stop_leftovers(before)
            for node_home in (home / "cluster" / "nodes").glob("*"):
                kill_jobs(node_home)
            kill_supervised_under(home)


def ray_processes() -> set[psutil.Process]:
    """Ray's processes in this session (ours, or our children's, even once re-parented)."""
    found = set()
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            mine = os.getsid(p.pid) == os.getsid(0) and p.pid != os.getpid()
        except ProcessLookupError:
            continue
        if mine and ("ray" in (p.info["name"] or "") or any("/ray/" in a for a in p.info["cmdline"] or [])):
            found.add(p)
    return found


def kill_supervised_under(home: Path) -> None:
    """Workloads whose supervisor works under ``home`` but no registry knows: a restore an agent
    finished on a node removed before it could record it (the target dying mid-migration)."""
    for p in psutil.process_iter(["cmdline"]):
        if str(home) in " ".join(p.info["cmdline"] or []):
            with contextlib.suppress(psutil.NoSuchProcess):
                for q in [*p.children(recursive=True), p]:
                    q.kill()


def stop_leftovers(before: set[psutil.Process]) -> None:
    """Stop the Ray processes the fixture started that outlived ``Cluster.shutdown()`` (under
    load, a removed node's dashboard agent or the head's client server can)."""
    left = list(ray_processes() - before)
    for p in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(left, timeout=10)


@pytest.fixture
def client(ray_cluster: RayCluster) -> Cluster:
    return Cluster(ray_cluster.address)


def cluster_store(client: Cluster, url: str) -> CheckpointStore:
    """The store at ``url`` as the cluster sees it: trusting what the cluster's key signed."""
    base = Path(call(client.coordinator.info.remote())["base"])
    return CheckpointStore(url, Signer.load(base / SIGNING_KEY))


def counts(client: Cluster, jid: str) -> list[int]:
    text = client.read_log(jid, 0, 1 << 24).decode()
    return [int(m.group(1)) for m in re.finditer(r"count=(\d+)", text)]


def last(client: Cluster, jid: str) -> int:
    found = counts(client, jid)
    return found[-1] if found else -1


def run_counter(client: Cluster, jid: str, cmd: list[str] = COUNTER, **kw: object) -> str:
    client.run("process", RunRequest(cmd=cmd, jid=jid, **kw))  # type: ignore[arg-type]
    wait_for(lambda: last(client, jid) >= 3, what=f"{jid} counting")
    return jid


def alive_nodes() -> list[str]:
    return sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])


def other(node: str) -> str:
    """An alive node, other than ``node``, that can take process jobs."""
    client = Cluster(ray.get_runtime_context().gcs_address)

    def fit() -> list[str]:
        nodes = client.nodes()
        return sorted(
            n.node for n in nodes if n.node != node and "process" in n.types and not n.draining and not n.error
        )

    try:
        return wait_for(fit, 60, "another node for process jobs")[0]  # type: ignore[index]
    except AssertionError as exc:
        raise AssertionError(f"{exc}; the nodes: {client.nodes()}") from None


def assert_continuous(client: Cluster, jid: str, more_than: int) -> None:
    wait_for(lambda: last(client, jid) > more_than + 3, what=f"{jid} counting on")
    found = counts(client, jid)
    assert found == list(range(len(found))), "the count went on without a restart or a gap"


def test_one_agent_per_node_including_late_joiners(ray_cluster: RayCluster, client: Cluster) -> None:
    nodes = client.nodes()
    assert sorted(n.node for n in nodes) == alive_nodes()
    assert all("process" in n.types and n.error is None for n in nodes)
    ray_cluster.add_node(**NODE_ARGS)
    wait_for(lambda: len(alive_nodes()) == 3, what="the third node")
    wait_for(lambda: sorted(n.node for n in client.nodes() if n.error is None) == alive_nodes(), 60, "its agent")
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE}
    assert names == {COORDINATOR, STORE, *(agent_name(n) for n in alive_nodes())}


def test_run_dump_and_restore_on_another_node(client: Cluster) -> None:
    jid = run_counter(client, "c-restore")
    job = client.job(jid)
    assert job.node in alive_nodes() and job.state is JobState.running
    assert [j.node for j in client.jobs() if j.jid == jid] == [job.node]
    result = client.dump(jid, DumpRequest())
    assert client.job(jid).state is JobState.checkpointed
    assert client.job(jid).last_checkpoint == result.checkpoint
    stopped = last(client, jid)
    with pytest.raises(StateError):
        client.dump(jid, DumpRequest())
    target = other(job.node)
    restored = client.restore(RestoreRequest(), jid=jid, node=target[:10]).job
    assert restored.node == target and restored.state is JobState.running
    assert_continuous(client, jid, stopped)  # the log came along from the first node
    assert [c.checkpoint for c in client.checkpoints(jid)] == [result.checkpoint]
    client.kill(jid)


def test_wait_follows_a_job_across_a_migration(client: Cluster) -> None:
    client.run("process", RunRequest(cmd=counts_to(80, 5), jid="c-wait"))
    out: list[bytes] = []
    ended: list[Job] = []
    waiting = threading.Thread(target=lambda: ended.append(follow(client, "c-wait", out.append)))
    waiting.start()
    wait_for(lambda: last(client, "c-wait") >= 10, what="ten counts")
    source = client.job("c-wait").node
    client.migrate("c-wait", other(source))
    waiting.join(60)
    assert ended and (ended[0].state, ended[0].exit_code, ended[0].node) == (JobState.exited, 5, other(source))
    assert [int(n) for n in re.findall(rb"count=(\d+)", b"".join(out))] == list(range(80)), "each line once, in order"


def test_progress_comes_from_the_node_as_it_happens(client: Cluster) -> None:
    """Dump, restore and migration report their stages and bytes from the agent to the caller
    while they run, not at the end."""
    jid = run_counter(client, "c-progress", HEAVY)
    seen: list[tuple[float, str, int, int]] = []

    def progress(stage: str, done: int, total: int) -> None:
        seen.append((time.monotonic(), stage, done, total))

    dumped = client.dump(jid, DumpRequest(leave_running=True, compression=Compression.none), progress=progress)
    arrived = {stage: at for at, stage, _, _ in reversed(seen)}  # each stage's first report
    assert arrived["store"] - arrived["criu_dump"] >= dumped.timings["criu_dump"] / 2, "reported as it ran"
    assert [(d, t) for _, s, d, t in seen if s == "store" and t][-1] == (dumped.image_bytes, dumped.image_bytes)

    seen.clear()
    client.migrate(jid, other(client.job(jid).node), progress=progress)
    stages = {stage for _, stage, _, _ in seen}
    assert {"criu_dump", "send", "received"} <= stages, stages
    with pytest.raises(JobNotFound):
        client.dump("c-nope", DumpRequest(), progress=progress)
    client.kill(jid)


COUNTS_IN_ITS_DIR = """import os, time
import helper
print("cwd=" + os.getcwd(), flush=True)
i = 0
while True:
    print(f"count={i}", flush=True)
    i += helper.STEP
    time.sleep(0.05)
"""


def test_a_working_dir_goes_wherever_the_job_runs(client: Cluster, tmp_path: Path) -> None:
    """`run --working-dir`: the job runs in a copy of the caller's directory, unpacked where it
    runs, and unpacked again wherever it is restored once that copy is gone."""
    (tmp_path / "helper.py").write_text("STEP = 1\n")
    (tmp_path / "main.py").write_text(COUNTS_IN_ITS_DIR)
    package = pack(str(tmp_path))
    jid = run_counter(client, "c-wd", [sys.executable, "main.py"], working_dir=package)
    copy = Path(call(client.coordinator.info.remote())["base"]) / "working_dirs" / package.digest
    assert f"cwd={copy}\n" in client.read_log(jid).decode()
    (tmp_path / "helper.py").write_text("STEP = 2\n")
    assert (copy / "helper.py").read_text() == "STEP = 1\n", "the job has its own copy"

    client.dump(jid, DumpRequest())
    shutil.rmtree(copy)
    at = last(client, jid)
    restored = client.restore(RestoreRequest(), jid=jid, node=other(client.job(jid).node))
    assert restored.job.state is JobState.running and (copy / "main.py").exists()
    assert_continuous(client, jid, at)
    client.kill(jid)
    kept = copy.parent.parent / "packages" / f"{package.digest}.zip"
    assert kept.exists()
    client.delete(jid)
    assert not kept.exists(), "the coordinator forgets a package no job uses"


def test_the_private_ray_internals_we_use_still_answer(ray_cluster: RayCluster) -> None:
    """cedana_ray.ray_private on a live cluster: an upgrade that changes one fails here, not
    quietly in the coordinator (which would stop noticing drains)."""
    draining = ray_private.draining_nodes()
    assert isinstance(draining, dict) and all(isinstance(ms, int) for ms in draining.values())
    assert isinstance(ray_private.job_server_registered(ray_cluster.head_node.node_id), bool)
    free = ray_private.available_resources()
    assert set(free) == {n["NodeID"] for n in ray.nodes() if n["Alive"]} and all("memory" in r for r in free.values())


def test_nodes_are_named_by_hostname_ip_or_id(ray_cluster: RayCluster) -> None:
    """As on a cluster of several machines: each node's own hostname and IP name it alone."""
    nodes = [n for n in ray.nodes() if n["Alive"]]
    machines = [
        {**n, "NodeManagerHostname": f"worker-{i}", "NodeManagerAddress": f"10.0.0.{i}"} for i, n in enumerate(nodes)
    ]
    for i, node in enumerate(machines):
        for name in (f"worker-{i}", f"10.0.0.{i}", node["NodeID"], node["NodeID"][:12]):
            assert named(name, machines) == [node], name
    assert named("worker-9", machines) == []
    assert len(named("", machines)) == len(machines)


def test_migration_keeps_the_id_and_the_state(client: Cluster) -> None:
    jid = run_counter(client, "c-migrate")
    source = client.job(jid).node
    target = other(source)
    before = {c.checkpoint for c in client.checkpoints(jid)}
    moved = client.migrate(jid, target[:8])
    assert (moved.source, moved.target, moved.jid, moved.route) == (source, target, jid, "direct")
    assert moved.dump_s > 0 and moved.restore_s > 0
    assert 0 < moved.downtime_s < moved.duration_s, "frozen from the freeze to the resume, inside the call"
    job = client.job(jid)
    assert job.node == target and job.state is JobState.running and job.last_checkpoint == moved.checkpoint
    assert_continuous(client, jid, last(client, jid))
    history = client.events(jid)
    assert [e.kind for e in history] == [
        EventKind.started,
        EventKind.restored,  # from the images sent straight to the target
        EventKind.checkpointed,  # the same images, kept from the target once the job ran there
        EventKind.migrated,
    ]
    assert history[0].detail["node"] == source and history[1].detail == {"checkpoint": moved.checkpoint, "node": target}
    assert history[2].detail["node"] == target and history[2].detail["checkpoint"] == moved.checkpoint
    assert (history[3].detail["source"], history[3].detail["target"]) == (source, target)
    assert history[3].detail["downtime_s"] == moved.downtime_s and history[3].detail["route"] == "direct"
    [kept] = [c for c in client.checkpoints(jid) if c.checkpoint not in before]
    assert kept.checkpoint == moved.checkpoint and client.inspect(kept.checkpoint).node == source
    client.kill(jid)


def test_images_go_through_the_store_by_default_only_where_that_copies_nothing() -> None:
    """An encrypted cluster's (this one's) in-place store would copy: its migrations go direct."""
    assert through_store_by_default("file:///ckpts", in_place=True, one_machine=True)
    assert not through_store_by_default("file:///ckpts", in_place=True, one_machine=False)
    assert not through_store_by_default("file:///ckpts", in_place=False, one_machine=True)
    assert not through_store_by_default("s3://bucket/ckpts", in_place=True, one_machine=True)


def test_a_migration_through_the_store_or_keeping_nothing(client: Cluster) -> None:
    """``through_store``: dumped into the store, restored from it; ``store=False``: the images
    go straight to the target and are not kept, the job's last checkpoint stays its last."""
    jid = run_counter(client, "c-routes")
    first = client.dump(jid, DumpRequest(leave_running=True)).checkpoint
    moved = client.migrate(jid, other(client.job(jid).node), MigrateRequest(through_store=True))
    assert moved.route == "store" and client.job(jid).last_checkpoint == moved.checkpoint != first
    assert_continuous(client, jid, last(client, jid))
    kept = [c.checkpoint for c in client.checkpoints(jid)]
    moved = client.migrate(jid, other(client.job(jid).node), MigrateRequest(store=False, through_store=False))
    assert (moved.route, moved.checkpoint) == ("direct", None)
    assert [c.checkpoint for c in client.checkpoints(jid)] == kept
    job = client.job(jid)
    assert job.last_checkpoint == kept[-1] and job.state is JobState.running
    assert_continuous(client, jid, last(client, jid))
    client.kill(jid)
    assert client.restore(RestoreRequest(), jid=jid).checkpoint == kept[-1], "its last kept checkpoint restores"
    client.kill(jid)


def test_bad_migrations_leave_the_job_running(client: Cluster) -> None:
    jid = run_counter(client, "c-bad")
    node = client.job(jid).node
    with pytest.raises(NotFoundError, match="no alive node"):
        client.migrate(jid, "ffffffffff")
    with pytest.raises(UsageError, match="already runs"):
        client.migrate(jid, node)
    with pytest.raises(UsageError, match="ambiguous"):
        client.migrate(jid, "")
    with pytest.raises(UsageError, match="ambiguous") as same_host:  # every node of this cluster is on this machine
        client.migrate(jid, socket.gethostname())
    assert all(n[:12] in str(same_host.value) for n in alive_nodes()) and "\n" not in str(same_host.value)

    target = other(node)
    runs = [in_background(lambda: client.migrate(jid, target)) for _ in range(2)]
    for thread, _ in runs:
        thread.join()
    errors = [e for _, found in runs for e in found]
    assert len(errors) == 1 and isinstance(errors[0], StateError), errors
    job = client.job(jid)
    assert job.state is JobState.running and job.node == other(node)
    with pytest.raises(StateError, match="running"):
        client.restore(RestoreRequest(), jid=jid)
    assert_continuous(client, jid, last(client, jid))
    client.kill(jid)
    with pytest.raises(StateError, match="killed"):
        client.migrate(jid, node)


def test_policy_checkpoints_and_keeps_the_last_k(client: Cluster) -> None:
    jid = run_counter(client, "c-policy", checkpoint_every=1.0, keep=2)
    seen: set[str] = set()

    def three_made_two_kept() -> bool:
        now = {c.checkpoint for c in client.checkpoints(jid)}
        seen.update(now)
        return len(seen) >= 3 and len(now) == 2

    wait_for(three_made_two_kept, 30, "three policy checkpoints, two kept")
    kept = client.checkpoints(jid)
    assert len(kept) <= 2 and client.job(jid).state is JobState.running
    pruned = (seen - {c.checkpoint for c in kept}).pop()
    root, _ = split_url(kept[0].path)
    assert pruned not in {m.checkpoint for m in cluster_store(client, root).list()}, "pruned from the store too"
    client.kill(jid)


def test_agent_restart_readopts_running_jobs(client: Cluster) -> None:
    jid = run_counter(client, "c-agent")
    job = client.job(jid)
    agent = ray.get_actor(agent_name(job.node), namespace=NAMESPACE)
    old_pid = ray.get(agent.status.remote()).pid
    ray.kill(agent, no_restart=False)
    wait_for(lambda: _agent_pid(job.node) not in (None, old_pid), 60, "the agent's restart")
    again = client.job(jid)
    assert again.state is JobState.running and again.pid == job.pid, "the job outlived its agent"
    client.dump(jid, DumpRequest(leave_running=True))
    client.kill(jid)


def _agent_pid(node: str) -> int | None:
    try:
        agent = ray.get_actor(agent_name(node), namespace=NAMESPACE)
        return ray.get(agent.status.remote(), timeout=5).pid
    except Exception:
        return None


def test_coordinator_restart_recovers_jobs_and_checkpoints(client: Cluster) -> None:
    jid = run_counter(client, "c-coord")
    job = client.job(jid)
    agent = ray.get_actor(agent_name(job.node), namespace=NAMESPACE)
    before = _kill_coordinator(client)
    # a checkpoint committed while the coordinator is away (as a policy dump in flight would be)
    storage = launcher.load_state().storage  # type: ignore[union-attr]
    away = ray.get(agent.serve.remote("dump", jid, DumpRequest(leave_running=True, storage=storage)))
    fresh = _fresh_coordinator(before)
    assert fresh.job(jid).state is JobState.running
    assert [e.kind for e in fresh.events(jid)] == [EventKind.started], "the history outlives the coordinator"
    assert "c-restore" in {j.jid for j in fresh.jobs()}, "earlier jobs are still known"
    wait_for(lambda: away.checkpoint in {c.checkpoint for c in fresh.checkpoints(jid)}, 30, "the catalogued dump")
    fresh.kill(jid)


def _kill_coordinator(client: Cluster) -> float:
    """Kill the coordinator (Ray restarts it); when the killed one had started."""
    before = client.info()["started"]
    ray.kill(ray.get_actor(COORDINATOR, namespace=NAMESPACE), no_restart=False)
    return before


def _fresh_coordinator(before: float) -> Cluster:
    """A client of the coordinator that replaced the one started at ``before``."""

    def ready() -> Cluster | None:
        try:
            fresh = Cluster(ray.get_runtime_context().gcs_address)
            return fresh if fresh.info()["started"] != before else None
        except CedanaError:
            return None

    return wait_for(ready, 60, "the coordinator's restart")  # type: ignore[return-value]


def test_drain_moves_jobs_off_a_node(client: Cluster) -> None:
    jid = run_counter(client, "c-drain")
    node = client.job(jid).node
    moved = client.drain(node[:12])
    assert [m.jid for m in moved] == [jid] and moved[0].target != node
    assert client.events(jid)[-1].kind is EventKind.drained
    assert client.job(jid).node != node
    assert node in {n.node for n in client.nodes() if n.draining}, "no new job goes there"
    assert_continuous(client, jid, last(client, jid))
    client.kill(jid)
    assert client.undrain(node[:12]) == node
    assert node not in {n.node for n in client.nodes() if n.draining}, "it takes jobs again"


def test_lost_node_jobs_are_restored_elsewhere(ray_cluster: RayCluster, client: Cluster) -> None:
    head = ray_cluster.head_node.node_id
    victim = next(n for n in ray_cluster.worker_nodes if n.node_id != head)
    jid = run_counter(client, "c-lost", node=victim.node_id, restore_on_loss=True)
    client.dump(jid, DumpRequest(leave_running=True))
    at_dump = client.job(jid).pid
    for p in [psutil.Process(at_dump), *psutil.Process(at_dump).children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):  # its init's death took it already
            p.kill()  # the machine goes down with the node
    ray_cluster.remove_node(victim)

    def restored() -> bool:
        job = client.job(jid)
        return job.state is JobState.running and job.node != victim.node_id

    wait_for(restored, 60, "the job restored on another node")
    wait_for(lambda: last(client, jid) >= 0, what="output after the restore")
    lost, back = client.events(jid)[-2:]
    assert (lost.kind, lost.detail["node"]) == (EventKind.lost, victim.node_id)
    assert back.kind is EventKind.restored and back.detail["node"] != victim.node_id
    client.kill(jid)


def test_python_api_from_a_driver(ray_cluster: RayCluster) -> None:
    import cedana_ray

    cedana_ray.init(ray_cluster.address)
    job = cedana_ray.run(COUNTER, jid="c-api")
    wait_for(lambda: "count=3" in job.logs(), what="output through the API")
    moved = job.migrate(other(job.node)[:12])
    assert moved.job.node != job.node and job.status is JobState.running
    dumped = job.dump(leave_running=True, metadata={"step": 3, "note": "api"})
    [info] = [c for c in cedana_ray.checkpoints("c-api") if c.checkpoint == dumped.checkpoint]
    assert info.metadata == {"step": 3, "note": "api"} and info.created == dumped.created
    assert "c-api" in {j.jid for j in cedana_ray.jobs()} and len(cedana_ray.nodes()) >= 2
    assert job.kill().state is JobState.killed


def test_a_job_checkpoints_itself_and_survives_migration(client: Cluster) -> None:
    client.run("process", RunRequest(cmd=[sys.executable, str(WORKLOADS / "self_checkpoint.py")], jid="c-inside"))
    wait_for(lambda: b"checkpoint=" in client.read_log("c-inside"), what="the job's own checkpoint")
    ckpt = re.search(rb"checkpoint=(\S+)", client.read_log("c-inside")).group(1).decode()  # type: ignore[union-attr]
    assert ckpt in {c.checkpoint for c in client.checkpoints("c-inside")}
    client.migrate("c-inside", other(client.job("c-inside").node))
    wait_for(lambda: b"on_restore called" in client.read_log("c-inside"), what="on_restore after the migration")
    client.kill("c-inside")


def add_node(ray_cluster: RayCluster, client: Cluster) -> str:
    node = ray_cluster.add_node(**NODE_ARGS)
    wait_for(lambda: node.node_id in {n.node for n in client.nodes() if n.error is None}, 60, "the new node's agent")
    return node


def in_background(fn: Callable[[], object]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def test_target_dying_mid_migration_leaves_the_job_on_its_source(ray_cluster: RayCluster, client: Cluster) -> None:
    target = add_node(ray_cluster, client)
    source = ray_cluster.head_node.node_id
    jid = run_counter(client, "c-target-dies", HEAVY, node=source)
    thread, errors = in_background(lambda: client.migrate(jid, target.node_id))
    time.sleep(0.5)  # frozen and dumping on the source
    ray_cluster.remove_node(target)
    thread.join(120)
    assert len(errors) == 1 and isinstance(errors[0], CedanaError), errors
    job = client.job(jid)
    assert job.node == source and job.state is JobState.running
    assert_continuous(client, jid, last(client, jid))
    client.kill(jid)


def test_source_dying_mid_dump_restores_from_the_previous_checkpoint(ray_cluster: RayCluster, client: Cluster) -> None:
    victim = add_node(ray_cluster, client)
    jid = run_counter(client, "c-source-dies", HEAVY, node=victim.node_id)
    first = client.dump(jid, DumpRequest(leave_running=True)).checkpoint
    pid = client.job(jid).pid
    thread, errors = in_background(lambda: client.dump(jid, DumpRequest()))
    time.sleep(0.1)
    for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        p.kill()  # the machine goes down with the node
    ray_cluster.remove_node(victim)
    thread.join(120)
    assert len(errors) == 1 and isinstance(errors[0], CedanaError), errors
    wait_for(lambda: client.job(jid).state is JobState.lost, 30, "the job marked lost")
    assert [c.checkpoint for c in client.checkpoints(jid)] == [first], "the failed dump left no checkpoint"
    restored = client.restore(RestoreRequest(), jid=jid).job
    assert restored.node != victim.node_id and restored.last_checkpoint == first
    wait_for(lambda: last(client, jid) > 3, what="counting after the restore")
    found = counts(client, jid)
    assert found == list(range(found[0], found[0] + len(found))), "it went on from the checkpoint"
    client.kill(jid)


def test_coordinator_restart_mid_policy_run_loses_nothing(client: Cluster) -> None:
    jid = run_counter(client, "c-policy-restart", HEAVY, checkpoint_every=1.0, keep=2)
    wait_for(lambda: client.checkpoints(jid), 30, "a first policy checkpoint")
    fresh = _fresh_coordinator(_kill_coordinator(client))  # most likely mid-dump
    assert fresh.job(jid).state is JobState.running
    root, _ = split_url(fresh.checkpoints(jid)[0].path)

    def catalog_matches_store() -> bool:
        stored = {m.checkpoint for m in cluster_store(fresh, root).list() if m.jid == jid}
        listed = {c.checkpoint for c in fresh.checkpoints(jid)}
        return stored == listed and len(listed) == 2

    wait_for(catalog_matches_store, 60, "policy runs again, catalog and store agree, two kept")
    fresh.kill(jid)


def test_cedana_store_carries_a_migration(ray_cluster: RayCluster, client: Cluster) -> None:
    jid = run_counter(client, "c-store")
    client.set_storage(jid, "cedana://ckpts")
    source = client.job(jid).node
    moved = client.migrate(jid, other(source))
    [info] = [c for c in client.checkpoints(jid) if c.checkpoint == moved.checkpoint]
    assert info.path.startswith("cedana://ckpts/")
    base = Path(launcher.load_state().base)  # type: ignore[union-attr]
    assert (base / "store" / "ckpts" / moved.checkpoint / "manifest.json").is_file(), "kept on the head node"
    assert client.inspect(moved.checkpoint).jid == jid
    assert_continuous(client, jid, last(client, jid))
    client.kill(jid)


def test_migration_to_a_node_without_the_runtime_is_refused(ray_cluster: RayCluster, client: Cluster) -> None:
    bare = ray_cluster.add_node(**NODE_ARGS, env_vars={"CEDANA_RAY_CRIU": "/nonexistent/criu"}).node_id
    wait_for(lambda: bare in {n.node for n in client.nodes() if n.error is None}, 60, "the bare node's agent")
    assert "process" not in next(n for n in client.nodes() if n.node == bare).types
    jid = run_counter(client, "c-no-runtime")
    with pytest.raises(PrerequisiteError, match="cannot run a process job"):
        client.migrate(jid, bare)
    assert client.job(jid).state is JobState.running and client.job(jid).node != bare
    client.kill(jid)


def test_gpu_jobs_go_to_gpu_nodes_only(ray_cluster: RayCluster, client: Cluster) -> None:
    """`--gpu` places by Ray's GPU resource. No GPU is here, so the node declares one, as
    `ray start --num-gpus 1` does; the job itself does not touch it."""
    with pytest.raises(PrerequisiteError, match="no node can take a process job that needs a GPU"):
        client.run("process", RunRequest(cmd=COUNTER, jid="c-gpu", gpu=True))
    gpu_node = ray_cluster.add_node(**NODE_ARGS, num_gpus=1).node_id
    wait_for(lambda: gpu_node in {n.node for n in client.nodes() if n.error is None}, 60, "the GPU node's agent")
    assert {n.node: n.gpus for n in client.nodes()}[gpu_node] == 1
    job = client.run("process", RunRequest(cmd=COUNTER, jid="c-gpu", gpu=True))
    assert job.node == gpu_node and job.details["needs_gpu"]
    elsewhere = other(gpu_node)
    with pytest.raises(PrerequisiteError, match=f"node {elsewhere[:12]} cannot run a process job that needs a GPU"):
        client.migrate("c-gpu", elsewhere)
    with pytest.raises(PrerequisiteError, match="needs a GPU"):
        client.run("process", RunRequest(cmd=COUNTER, jid="c-gpu-2", gpu=True, node=elsewhere))
    assert client.job("c-gpu").node == gpu_node and client.job("c-gpu").state is JobState.running
    with pytest.raises(PrerequisiteError, match="no NVIDIA driver"):  # no node of this machine has one
        client.query("gpu")
    client.kill("c-gpu")


def frees(node: str, expected: dict[str, float], what: str) -> None:
    """Wait until Ray has ``expected`` CPUs and GPUs free on ``node`` (a resource all taken
    left out): its view of each node's resources lags what happens there by a moment."""

    def free() -> dict[str, float]:
        found = ray_private.available_resources().get(node, {})
        return {k: v for k, v in found.items() if k in ("CPU", "GPU") and v}

    wait_for(lambda: free() == expected, 30, what)


def test_jobs_hold_their_ray_resources_wherever_they_run(ray_cluster: RayCluster, client: Cluster) -> None:
    """`run --cpus --gpus --memory` reserve in Ray on the job's node, move with a migration and
    go back when the job ends. The nodes declare their GPUs (none is here), as `ray start
    --num-gpus` does; the job only sees which ones Ray gave it."""
    nodes = [ray_cluster.add_node(**{**NODE_ARGS, "num_gpus": n}) for n in (2, 1)]
    a, b = (n.node_id for n in nodes)
    wait_for(lambda: {a, b} <= {n.node for n in client.nodes() if n.error is None}, 60, "the new nodes' agents")
    shows_gpus = ["/bin/sh", "-c", f"echo gpus=$CUDA_VISIBLE_DEVICES; exec {shlex.join(COUNTER)}"]
    held = Resources(cpus=1, gpus=1, memory="64MiB")
    run_counter(client, "c-res", shows_gpus, node=a, resources=held)
    assert re.search(r"^gpus=[01]$", client.read_log("c-res").decode(), re.M), "Ray's GPU is the job's"
    frees(a, {"GPU": 1}, "the job's CPU and GPU held")
    frees(b, {"CPU": 1, "GPU": 1}, "nothing held on the other node")
    with pytest.raises(PrerequisiteError, match=rf"node {a[:12]} lacks 1 CPU \(0 CPU free\)"):
        client.run("process", RunRequest(cmd=COUNTER, jid="c-res-2", node=a, resources=Resources(cpus=1)))

    at = last(client, "c-res")
    client.migrate("c-res", b)
    frees(a, {"CPU": 1, "GPU": 2}, "everything back on the source")
    frees(b, {}, "the job's CPU and GPU held on the target")
    assert_continuous(client, "c-res", at)
    client.kill("c-res")
    frees(b, {"CPU": 1, "GPU": 1}, "the killed job's CPU and GPU back")

    client.run("process", RunRequest(cmd=["sleep", "5"], jid="c-res-exit", node=b, resources=Resources(cpus=1)))
    frees(b, {"GPU": 1}, "the job's CPU held")
    frees(b, {"CPU": 1, "GPU": 1}, "the exited job's CPU back, with no one asking")
    for node in nodes:
        ray_cluster.remove_node(node)


TORCH = importlib.util.find_spec("torch") is not None


def losses(client: Cluster, jid: str) -> list[str]:
    return re.findall(r"step=\d+ loss=\S+", client.read_log(jid, 0, 1 << 24).decode())


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("torch", marks=pytest.mark.skipif(not TORCH, reason="PyTorch is not installed (make setup)")),
        "numpy",
    ],
)
def test_training_loss_curve_is_identical_across_a_migration(client: Cluster, backend: str) -> None:
    if backend == "numpy":
        pytest.importorskip("numpy", reason="NumPy is not installed")
    cmd = [sys.executable, "-m", "cedana_ray.jobs.train", "--steps", "60", "--interval", "0.03", "--backend", backend]
    client.run("process", RunRequest(cmd=cmd, jid=f"train-plain-{backend}"))
    moved = f"train-moved-{backend}"
    client.run("process", RunRequest(cmd=cmd, jid=moved))
    wait_for(lambda: len(losses(client, moved)) >= 20, 60, "training under way")
    client.migrate(moved, other(client.job(moved).node))
    for jid in (f"train-plain-{backend}", moved):
        wait_for(lambda jid=jid: b"done" in client.read_log(jid), 120, f"{jid} finished")
    plain = losses(client, f"train-plain-{backend}")
    assert len(plain) == 60 and losses(client, moved) == plain, "the migrated run's loss curve is the same"


# The last tests leave nodes draining: keep them at the end of the module.


def test_sigterm_to_an_agent_moves_its_jobs(ray_cluster: RayCluster, client: Cluster) -> None:
    head = ray_cluster.head_node.node_id
    node = other(head)
    jid = run_counter(client, "c-sigterm", node=node)
    os.kill(_agent_pid(node), signal.SIGTERM)  # type: ignore[arg-type]
    moved = lambda: (job := client.job(jid)).node != node and job.state is JobState.running  # noqa: E731
    wait_for(moved, 60, "the job moved off the node and running")
    assert_continuous(client, jid, last(client, jid))
    assert node in {n.node for n in client.nodes() if n.draining}, "no new job goes there"
    client.kill(jid)


def test_ray_drain_node_moves_its_jobs(ray_cluster: RayCluster, client: Cluster) -> None:
    from ray.core.generated import autoscaler_pb2

    added = ray_cluster.add_node(**NODE_ARGS).node_id
    wait_for(lambda: added in {n.node for n in client.nodes() if n.error is None}, 60, "the new node's agent")
    jid = run_counter(client, "c-raydrain", node=added)
    gcs = ray._raylet.GcsClient(address=ray_cluster.address)
    reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
    accepted, why = gcs.drain_node(added, reason, "test preemption", int(time.time() * 1000) + 60_000)
    assert accepted, why
    moved = lambda: (job := client.job(jid)).node != added and job.state is JobState.running  # noqa: E731
    wait_for(moved, 60, "the job moved off the draining node and running")
    assert_continuous(client, jid, last(client, jid))
    client.kill(jid)


@pytest.mark.skipif(bool(missing("runc")), reason=str(missing("runc")))
def test_a_runc_container_migrates_and_keeps_counting(client: Cluster, tmp_path: Path) -> None:
    """Containers move like processes: the target node restores the container under its own
    runc root while the source's copy waits frozen, then the source's is deleted."""
    rootfs = busybox_rootfs(tmp_path / "rootfs")
    request = RuncRunRequest(
        cmd=["runc"], bundle=str(bundle(tmp_path / "bundle", rootfs)), container="c-mig", jid="c-runc"
    )
    job = client.run("runc", request)
    wait_for(lambda: last(client, "c-runc") >= 3, what="the container counting")
    moved = client.migrate("c-runc", other(job.node))
    assert moved.job.node != job.node and client.job("c-runc").state is JobState.running
    assert_continuous(client, "c-runc", last(client, "c-runc"))
    source_root = Path(job.details["root"])
    assert not Runc(source_root).containers(), "the source's container was deleted"
    client.kill("c-runc")


@pytest.fixture
def containerd_nodes(ray_cluster: RayCluster, client: Cluster, tmp_path: Path) -> Iterator[list[tuple[str, Ctr]]]:
    """Two nodes, each with a containerd of its own as on two hosts, the counter image in both.
    Each has its own containerd namespace too: containerd keeps runc's state in
    /run/containerd/runc/NAMESPACE, which two daemons on one host would share."""
    archive = oci_image(busybox_rootfs(tmp_path / "rootfs"), tmp_path / "image", CONTAINERD_COUNTER)
    daemons, nodes, ctrs = [], [], []
    try:
        for i in range(2):
            (base := tmp_path / f"containerd-{i}").mkdir()
            daemons.append(start_containerd(base))
            ctr = Ctr(str(base / "containerd.sock"), f"cedana-ray-mig-{secrets.token_hex(3)}")
            ctr.call("images", "import", "--base-name", COUNTER_IMAGE.rsplit(":", 1)[0], str(archive))
            ctrs.append(ctr)
            env = {"CONTAINERD_ADDRESS": ctr.address, "CONTAINERD_NAMESPACE": ctr.namespace}
            nodes.append(ray_cluster.add_node(**NODE_ARGS, env_vars=env))
        ids = [n.node_id for n in nodes]
        wait_for(lambda: runs_type(client, ids, "containerd"), 60, "both nodes' agents with containerd")
        yield list(zip(ids, ctrs, strict=True))
    finally:
        for ctr in ctrs:
            with contextlib.suppress(CedanaError):
                for cid in ctr.containers():
                    ctr.remove(cid)
        for node in nodes:
            ray_cluster.remove_node(node)
        for daemon in daemons:
            stop_process(daemon)
        for ctr in ctrs:
            with contextlib.suppress(OSError):
                os.rmdir(f"/run/containerd/runc/{ctr.namespace}")


def runs_type(client: Cluster, nodes: list[str], jtype: str) -> bool:
    """Whether the agents of all ``nodes`` are up and can take ``jtype`` jobs."""
    up = {n.node: n for n in client.nodes() if n.error is None}
    return all(node in up and jtype in up[node].types for node in nodes)


@pytest.mark.skipif(bool(missing(*CONTAINERD_NEEDS)), reason=str(missing(*CONTAINERD_NEEDS)))
def test_a_containerd_container_migrates_and_keeps_counting(
    client: Cluster, containerd_nodes: list[tuple[str, Ctr]]
) -> None:
    """The source is paused, resumed for containerd's checkpoint (which CRIU leaves stopped)
    and paused again; the target restores it paused, in a cgroup of its own, and resumes it."""
    (source, source_ctr), (target, target_ctr) = containerd_nodes
    request = ContainerdRunRequest(cmd=["ctr"], image=COUNTER_IMAGE, container="c-ctrd", jid="c-ctrd", node=source)
    client.run("containerd", request)
    wait_for(lambda: last(client, "c-ctrd") >= 3, what="the container counting")
    moved = client.migrate("c-ctrd", target)
    assert moved.job.node == target and client.job("c-ctrd").state is JobState.running
    assert_continuous(client, "c-ctrd", last(client, "c-ctrd"))
    assert target_ctr.tasks()["c-ctrd"] == (moved.job.pid, "RUNNING")
    assert "c-ctrd" not in source_ctr.containers(), "the source's container was deleted"
    spec = json.loads(target_ctr.call("containers", "info", "c-ctrd"))["Spec"]
    assert spec["linux"]["cgroupsPath"] == f"/{target_ctr.namespace}/c-ctrd", "a cgroup of its own"
    client.kill("c-ctrd")


@pytest.fixture
def cri_nodes(ray_cluster: RayCluster, client: Cluster, cri2: tuple[Cri, str]) -> Iterator[list[str]]:
    """Two nodes whose agents reach containerd 2.x's CRI (one runtime here, where each node
    would have its own: the restore on the other node finds the pod ready and goes into it)."""
    cri = cri2[0]
    nodes = [ray_cluster.add_node(**NODE_ARGS, env_vars={"CONTAINER_RUNTIME_ENDPOINT": cri.endpoint}) for _ in range(2)]
    try:
        ids = [n.node_id for n in nodes]
        wait_for(lambda: runs_type(client, ids, "crio"), 60, "both nodes' agents with the CRI")
        yield ids
    finally:
        for c in cri.containers():
            cri.remove(c.id)
        for node in nodes:
            ray_cluster.remove_node(node)


@pytest.mark.skipif(bool(NO_CRI), reason=str(NO_CRI))
def test_a_cri_container_migrates_without_a_freeze(
    client: Cluster, cri2: tuple[Cri, str], cri_nodes: list[str]
) -> None:
    """The CRI has no pause: the job is dumped and stopped, then restored on the target; it
    goes on from its checkpoint, and its copy on the source is gone."""
    cri, image = cri2
    source, target = cri_nodes
    cid = run_cri_counter(cri, image)
    job = client.manage("crio", ManageRequest(target=cid, jid="c-cri", node=source))
    assert job.node == source
    before = wait_for(lambda: (n := cri_count(cri, cid)) >= 20 and n, what="the counter reaching 20")
    moved = client.migrate("c-cri", target)
    assert moved.job.node == target and client.job("c-cri").state is JobState.running
    new = client.job("c-cri").details["target"]
    assert new != cid and cid not in {c.id for c in cri.containers()}, "the source's container was removed"
    assert cri_count(cri, new) >= before, "restored from the checkpoint, not started afresh"
    at = cri_count(cri, new)
    wait_for(lambda: cri_count(cri, new) > at + 3, what="counting on the target")
    client.kill("c-cri")


@pytest.mark.skipif(bool(NO_CRI), reason=str(NO_CRI))
def test_a_cri_job_whose_target_cannot_restore_goes_on_where_it_was(
    ray_cluster: RayCluster, client: Cluster, cri2: tuple[Cri, str], cri_nodes: list[str]
) -> None:
    """Stopped for its dump, the job is restored on its source again when the target fails
    (here its staging dir cannot be made), and the migration's error is reported."""
    cri, image = cri2
    source = cri_nodes[0]
    env = {"CONTAINER_RUNTIME_ENDPOINT": cri.endpoint, "CEDANA_RAY_STAGING": "/proc/cedana-ray-no-staging"}
    broken = ray_cluster.add_node(**NODE_ARGS, env_vars=env)
    try:
        wait_for(lambda: runs_type(client, [broken.node_id], "crio"), 60, "the broken node's agent")
        cid = run_cri_counter(cri, image)
        client.manage("crio", ManageRequest(target=cid, jid="c-cri-back", node=source))
        before = wait_for(lambda: (n := cri_count(cri, cid)) >= 20 and n, what="the counter reaching 20")
        with pytest.raises(CedanaError, match="cedana-ray-no-staging"):
            client.migrate("c-cri-back", broken.node_id)
        job = client.job("c-cri-back")
        assert job.node == source and job.state is JobState.running
        (row,) = [r for r in client.query("crio") if r["jid"] == "c-cri-back"]
        assert row["id"] != cid and cri_count(cri, row["id"]) >= before, "restored from its checkpoint, on its node"
        client.kill("c-cri-back")
    finally:
        ray_cluster.remove_node(broken)


def test_every_checkpoint_the_cluster_made_is_encrypted(client: Cluster) -> None:
    """However it was made (dump, policy, migration, drain, SIGTERM, node loss, a job's own
    checkpoint(), the cluster's own store): last in this module, after all of them."""
    base = Path(call(client.coordinator.info.remote())["base"])
    manifests = [json.loads(path.read_text()) for path in base.rglob(MANIFEST)]
    assert len(manifests) >= 10
    assert {m["encryption"] for m in manifests} == {ALGORITHM}


def test_the_ports_a_process_hands_out_are_all_different() -> None:
    """A node's services are each told a port picked here; the kernel may give a port it just
    freed again, and two services told the same one clash (Ray's runtime env agent was once
    answered by its metrics exporter). Among 400 ports so picked, the kernel repeats some."""
    ports = [launcher.free_port() for _ in range(400)]
    assert len(set(ports)) == len(ports)
