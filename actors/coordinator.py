"""Coordinator: the cluster's job registry and checkpoint catalog, placement, policies,
migration, node loss and drain.

One detached, named actor on the head node. Its state is a SQLite registry under
``BASE`` (the same tables as local mode), so a restarted coordinator recovers every
job and checkpoint; checkpoints that were committed while it was away are found in
the cluster store and catalogued again. A monitor thread keeps exactly one
NodeAgent per alive node, marks the jobs of dead nodes lost (restoring them
elsewhere when they asked for it), migrates jobs off draining nodes and runs the
checkpoint policies.

This module holds the Coordinator's state, its monitor and the jobs; the rest it
inherits: placement (``placement.py``), dump, restore and the catalog
(``checkpoints.py``), migration, node loss and drain (``migration.py``), live migration
(``live_migration.py``) and the checkpoint policies (``policies.py``).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
import traceback
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray

from cedana_ray import ray_private, working_dir
from cedana_ray.backend import Progress
from cedana_ray.crypto import KEY_BYTES, KEY_FILE, save_key, saved_key
from cedana_ray.engine import new_id
from cedana_ray.errors import CedanaError, NotFoundError, PrerequisiteError, StateError, Unreachable, UsageError
from cedana_ray.gateway import Gateway, token_of
from cedana_ray.models import LIVE_STATES, Job, JobState
from cedana_ray.plugins_manager import GPU, register_storage
from cedana_ray.records import Records, require_state
from cedana_ray.registry import Registry
from cedana_ray.remote import STREAMED, agent_name, call, detached, followed, streamed
from cedana_ray.requests import ManageRequest, Resources, RunRequest
from cedana_ray.signing import KEY_FILE as SIGNING_KEY
from cedana_ray.signing import Signer

from .agent import NodeAgent
from .checkpoints import Checkpoints
from .live_migration import LiveMigration
from .migration import Migration
from .placement import Placement, gpus_by_node
from .policies import Policies
from .reservations import give_back, release, reserve
from .store_server import STORE, StoreServer

ENDED = (JobState.killed, JobState.exited, JobState.lost)
MONITOR_PERIOD_S = 1.0
RECOVER_PERIOD_S = 10.0  # how often the store is searched for checkpoints the catalog missed
log = logging.getLogger("cedana_ray.coordinator")


class Coordinator(Placement, Checkpoints, Migration, LiveMigration, Policies):
    def __init__(self, base: str, storage: str, encrypt: bool = False, key: bytes | None = None) -> None:
        os.umask(0o077)  # the registry and the cluster's signing key are ours alone
        self.base = Path(base)
        self.started = time.time()
        self.base.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.storage = storage
        self.signer = Signer.load(self.base / SIGNING_KEY)  # the cluster's: its agents get it too
        self.key = self._cluster_key(encrypt, key)
        register_storage()  # the storage plugins' schemes, for the catalog's stores
        self.registry = Registry(self.base / "coordinator.db")
        self.records = Records(self.registry, self.signer)  # the cluster's record (cedana_ray.records)
        self.agents: dict[str, Any] = {}
        self.draining: dict[str, float] = {}  # node -> deadline (epoch seconds, 0: none)
        self.due: dict[str, float] = {}  # jid -> next policy checkpoint (monotonic)
        self._busy: set[str] = set()
        self._idle = threading.Condition()
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="coordinator")
        self.store = self._spawn_store()
        self._recover_catalog()
        self._tick()
        threading.Thread(target=self._monitor, name="monitor", daemon=True).start()
        # commands reach these verbs without connecting to Ray (cedana_ray.gateway)
        self.gateway = Gateway(self, token_of(self.base), ray.util.get_node_ip_address())

    def _cluster_key(self, encrypt: bool, key: bytes | None) -> bytes | None:
        """The key every checkpoint of this cluster is encrypted with (``up --encrypt``), kept
        in the state dir: given, else made; once a cluster has one it keeps it."""
        path = self.base / KEY_FILE
        kept = saved_key(path)
        if key and kept and key != kept:
            raise UsageError("this cluster's checkpoints are encrypted with another key", hint=f"see {path}")
        if (encrypt or key) and kept is None:
            save_key(path, key or secrets.token_bytes(KEY_BYTES))
            kept = saved_key(path)
        return kept

    # -- nodes and agents
    def _monitor(self) -> None:
        last_recover = time.monotonic()
        while True:
            time.sleep(MONITOR_PERIOD_S)
            try:
                self._tick()
                if time.monotonic() - last_recover > RECOVER_PERIOD_S:
                    last_recover = time.monotonic()
                    self._recover_catalog()
            except Exception:  # the monitor must outlive any one bad tick
                log.error("monitor tick failed:\n%s", traceback.format_exc())

    def _recover_catalog(self) -> None:
        if recovered := self.records.recover(self.storage):
            log.warning("catalogued %d checkpoint(s) committed while the coordinator was away", len(recovered))

    def _tick(self) -> None:
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        for node in alive - self.agents.keys():
            self.agents[node] = self._spawn_agent(node)
        for node in set(self.agents) - alive:
            del self.agents[node]
        self._mark_lost(alive)
        self._notice_ended_reservations()
        for node, deadline_ms in _draining_nodes().items():
            if node in alive and node not in self.draining:
                self.draining[node] = deadline_ms / 1000
                self._pool.submit(self._drain_logged, node)
        self._run_policies()

    def _notice_ended_reservations(self) -> None:
        """Ask after each live job that holds Ray resources, so that they go back as soon as it
        ends (see :meth:`_merge`), not when someone next looks."""
        for job in self.registry.jobs():
            if "resources" in job.details and job.state in LIVE_STATES and job.jid not in self._busy:
                try:
                    self._merge(job, self._serve(job.node, "job", job.jid, timeout=10))
                except CedanaError as exc:
                    log.warning("job %s: could not ask after it: %s", job.jid, exc)

    def _spawn_agent(self, node: str) -> Any:
        return detached(NodeAgent, agent_name(node), node, node, str(self.base), self.signer, self.key, concurrency=32)

    def _spawn_store(self) -> Any:
        """The cedana:// store, beside the coordinator on the head node."""
        return detached(StoreServer, STORE, ray.get_runtime_context().get_node_id(), str(self.base))

    # -- jobs
    @contextmanager
    def _claim(self, jid: str, wait: float = 0.0) -> Iterator[None]:
        """One coordinator operation (dump, migration, policy run) per job at a time;
        waits up to ``wait`` seconds for the one in progress."""
        with self._idle:
            if not self._idle.wait_for(lambda: jid not in self._busy, timeout=wait):
                raise StateError(f"job {jid} is being checkpointed or migrated", hint="try again when it is done")
            self._busy.add(jid)
        try:
            yield
        finally:
            with self._idle:
                self._busy.discard(jid)
                self._idle.notify_all()

    def _merge(self, record: Job, seen: Job) -> Job:
        """The registry's record updated with what the job's agent sees now."""
        fresh = record.model_copy(
            update={
                "state": seen.state,
                "pid": seen.pid,
                "exit_code": seen.exit_code,
                "log": seen.log,
                "details": {**record.details, **seen.details},
            }
        )
        if fresh != record:
            self.registry.save_job(fresh)
            if record.state in LIVE_STATES and fresh.state in ENDED:
                self.records.ended(fresh)
                give_back(fresh)
        return fresh

    def job(self, jid: str) -> Job:
        record = self.registry.job(jid)
        if record.node not in self.agents or jid in self._busy:
            return record
        try:
            return self._merge(record, self._serve(record.node, "job", jid))
        except (NotFoundError, Unreachable):  # forgotten there, or the node is going away
            return record

    def jobs(self) -> list[Job]:
        records = self.registry.jobs()
        agents = dict(self.agents)  # the monitor thread changes it
        pending = {n: agents[n].serve.remote("jobs") for n in {r.node for r in records} if n in agents}
        seen: dict[str, Job] = {}
        for node, ref in pending.items():
            try:
                seen.update((j.jid, j) for j in call(ref, timeout=30) if j.node == node)
            except CedanaError as exc:
                log.warning("node %s did not list its jobs: %s", node[:12], exc)
        fresh = []
        for r in records:
            now = seen.get(r.jid)
            fresh.append(self._merge(r, now) if now and now.node == r.node and r.jid not in self._busy else r)
        return fresh

    def _new_jid(self, jid: str | None) -> str:
        jid = jid or new_id("job")
        if jid in self._busy or any(j.jid == jid for j in self.registry.jobs()):
            raise StateError(f"a job named {jid!r} already exists")
        return jid

    def run(self, jtype: str, request: RunRequest) -> Job:
        jid = self._new_jid(request.jid)
        needs = request.resources
        node = self._place(jtype, request.node, gpu=request.needs_gpu, needs=needs)
        gpus = reserve(jid, node, needs)
        job = self._start_on(node, jtype, request, jid, gpus)
        details: dict[str, Any] = {"restore_on_loss": request.restore_on_loss, "needs_gpu": request.needs_gpu}
        if needs:
            details["resources"] = needs.model_dump()
        if request.working_dir:
            working_dir.keep(request.working_dir, self.base)
            details["working_dir"] = request.working_dir.digest
        if request.checkpoint_every:
            details["policy"] = {"every_s": request.checkpoint_every, "keep": request.keep}
        job = job.model_copy(update={"details": {**job.details, **details}})
        self.records.started(job)
        return job

    def _start_on(self, node: str, jtype: str, request: RunRequest, jid: str, gpus: list[str]) -> Job:
        """The node's engine runs the workload, as a local job (the cluster's options are ours);
        the GPUs Ray gave it are the ones it sees. Its reservation goes if it cannot start."""
        env = {"CUDA_VISIBLE_DEVICES": ",".join(gpus), **request.env} if gpus else request.env
        # Ray's resources placed it on a GPU node: the agent need not check the driver again
        cluster_only = {"node": None, "checkpoint_every": None, "keep": None, "restore_on_loss": False}
        local = request.model_copy(
            update={**cluster_only, "jid": jid, "env": env, "gpu": False, "resources": Resources()}
        )
        try:
            return self._serve(node, "run", jtype, local)
        except BaseException:
            if request.resources:
                release(jid, node)
            raise

    def manage(self, jtype: str, request: ManageRequest) -> Job:
        """Adopt a workload running on ``request.node`` (where the client runs)."""
        if request.node is None:
            raise UsageError("adopting a workload on a cluster needs the node it runs on")
        node = self.resolve_node(request.node)
        jid = self._new_jid(request.jid)
        job = self._serve(node, "manage", jtype, request.model_copy(update={"jid": jid, "node": node}))
        self.records.started(job)
        return job

    def _live(self, jid: str) -> Job:
        return require_state(self.job(jid))

    def _serve(self, node: str, verb: str, *args: Any, timeout: float | None = None) -> Any:
        """The engine's ``verb`` on ``node``, run by its agent: one Ray round trip."""
        return call(self._agent(node).serve.remote(verb, *args), timeout=timeout)

    def _agent_call(self, node: str, method: str, *args: Any, progress: Progress | None = None) -> Any:
        """The agent's ``method`` (``serve`` or ``restore``) on ``node``; with ``progress``,
        streamed, so that its progress is reported as it comes."""
        agent = self._agent(node)
        if progress is None:
            return call(getattr(agent, method).remote(*args))
        return followed(agent.stream.options(num_returns="streaming").remote(method, *args), progress)

    def stream(self, verb: str, kwargs: dict[str, Any]) -> Iterator[Any]:
        """Verb ``verb``, with its progress streamed to the caller (:class:`~cedana_ray.cluster.Cluster`)."""
        if verb not in STREAMED:
            raise UsageError(f"no progress to stream for {verb!r}")
        yield from streamed(lambda progress: getattr(self, verb)(**kwargs, progress=progress))

    def _on_node(self, jid: str, verb: str, *args: Any) -> Job:
        job = self.job(jid)
        return self._merge(job, self._serve(job.node, verb, jid, *args))

    def freeze(self, jid: str) -> Job:
        return self._on_node(jid, "freeze")

    def unfreeze(self, jid: str) -> Job:
        return self._on_node(jid, "unfreeze")

    def kill(self, jid: str, sig: int | str | None = None) -> Job:
        """Kill the job, or only send it ``sig`` (its policy stays: it may run on)."""
        if sig is None:
            self.due.pop(jid, None)
        return self._on_node(jid, "kill", sig)

    def delete(self, jid: str) -> Job:
        job = self.job(jid)
        if job.state in LIVE_STATES:
            raise StateError(f"job {jid} is {job.state.value}", hint=f"`cedana-ray job kill {jid}` first")
        if job.node in self.agents:
            call(self._agent(job.node).forget.remote(jid))
        give_back(job)
        self.records.deleted(jid)
        digest = job.details.get("working_dir")
        if digest and all(j.details.get("working_dir") != digest for j in self.registry.jobs()):
            working_dir.discard(digest, self.base)
        return job

    def read_log(self, jid: str, offset: int = 0, limit: int = 1 << 20) -> bytes:
        return self._serve(self.registry.job(jid).node, "read_log", jid, offset, limit)

    def query(self, jtype: str) -> list[dict[str, Any]]:
        """Every node's answer, asked of all at once (``query gpu``: of the nodes with GPUs,
        as Ray counts them); a node that lacks what the query needs (a driver, a daemon) is
        left out, and the query fails only when no node could answer."""
        agents = sorted(self.agents.items())
        if jtype == GPU:  # `ps` asks on every call: a node without a GPU has nothing to say
            gpus = gpus_by_node()
            agents = [(node, agent) for node, agent in agents if gpus.get(node)]
            if not agents:
                raise PrerequisiteError("no node of the cluster has a GPU, as Ray counts them")
        pending = [(node, agent.serve.remote("query", jtype)) for node, agent in agents]
        rows, missing = [], []
        for node, ref in pending:
            try:
                rows += [{**r, "node": node} for r in call(ref)]
            except PrerequisiteError as exc:
                missing.append(exc)
        if missing and len(missing) == len(pending):
            raise missing[0]
        return rows

    def info(self) -> dict[str, Any]:
        return {
            "storage": self.storage,
            "base": str(self.base),
            "nodes": len(self.agents),
            "started": self.started,
            "encrypted": self.key is not None,
            "gateway": self.gateway.url,
        }


def _draining_nodes() -> dict[str, int]:
    """Nodes Ray is draining (``ray drain-node``, autoscaler preemption), with their deadline in ms."""
    try:
        return ray_private.draining_nodes()
    except Exception as exc:  # a private API: if it changes, lose drain detection, not the monitor
        log.warning("cannot read Ray's drain state: %s", exc)
        return {}
