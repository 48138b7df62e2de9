"""Coordinator: the cluster's job registry and checkpoint catalog, placement, policies,
migration, node loss and drain.

One detached, named actor on the head node. Its state is a SQLite registry under
``BASE`` (the same tables as local mode), so a restarted coordinator recovers every
job and checkpoint; checkpoints that were committed while it was away are found in
the cluster store and catalogued again. A monitor thread keeps exactly one
NodeAgent per alive node, marks the jobs of dead nodes lost (restoring them
elsewhere when they asked for it), migrates jobs off draining nodes and runs the
checkpoint policies.
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
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import ray

from cedana_ray import catalog
from cedana_ray.crypto import KEY_BYTES, KEY_FILE, save_key, saved_key
from cedana_ray.engine import new_id
from cedana_ray.errors import CedanaError, NotFoundError, PrerequisiteError, StateError, Unreachable, UsageError
from cedana_ray.models import (
    LIVE_STATES,
    CheckpointInfo,
    Compression,
    DumpResult,
    Job,
    JobState,
    Manifest,
    MigrateResult,
    NodeStatus,
    RestoreResult,
    utcnow,
)
from cedana_ray.plugins_manager import get_plugin_manager
from cedana_ray.registry import Registry
from cedana_ray.requests import DumpRequest, ManageRequest, RestoreRequest, RunRequest
from cedana_ray.signing import KEY_FILE as SIGNING_KEY
from cedana_ray.signing import Signer
from cedana_ray.store import CheckpointStore, split_url

from .agent import NodeAgent
from .remote import agent_name, call, detached
from .store_server import STORE, StoreServer

MONITOR_PERIOD_S = 1.0
RECOVER_PERIOD_S = 10.0  # how often the store is searched for checkpoints the catalog missed
MAX_LOG_CARRIED = 64 << 20
DUMP_WAIT_S = 300.0  # an on-demand dump waits this long for a policy run or migration to end
log = logging.getLogger("cedana_ray.coordinator")


class Coordinator:
    def __init__(self, base: str, storage: str, encrypt: bool = False, key: bytes | None = None) -> None:
        os.umask(0o077)  # the registry and the cluster's signing key are ours alone
        self.base = Path(base)
        self.started = time.time()
        self.base.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.storage = storage
        self.signer = Signer.load(self.base / SIGNING_KEY)  # the cluster's: its agents get it too
        self.key = self._cluster_key(encrypt, key)
        get_plugin_manager()  # the storage plugins' schemes, for the catalog's stores
        self.registry = Registry(self.base / "coordinator.db")
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
        if recovered := catalog.recover(self.registry, self.storage, self.signer):
            log.warning("catalogued %d checkpoint(s) committed while the coordinator was away", len(recovered))

    def _tick(self) -> None:
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        for node in alive - self.agents.keys():
            self.agents[node] = self._spawn_agent(node)
        for node in set(self.agents) - alive:
            del self.agents[node]
        self._mark_lost(alive)
        for node, deadline_ms in _draining_nodes().items():
            if node in alive and node not in self.draining:
                self.draining[node] = deadline_ms / 1000
                self._pool.submit(self._drain_logged, node)
        self._run_policies()

    def _spawn_agent(self, node: str) -> Any:
        return detached(NodeAgent, agent_name(node), node, node, str(self.base), self.signer, self.key, concurrency=32)

    def _spawn_store(self) -> Any:
        """The cedana:// store, beside the coordinator on the head node."""
        return detached(StoreServer, STORE, ray.get_runtime_context().get_node_id(), str(self.base))

    def _agent(self, node: str) -> Any:
        agent = self.agents.get(node)
        if agent is None:
            raise StateError(f"node {node[:12]} is not alive")
        return agent

    def nodes(self) -> list[NodeStatus]:
        found = []
        gpus = _gpus()
        for node in sorted(self.agents):
            try:
                status = call(self._agent(node).status.remote(), timeout=30)
            except CedanaError as exc:
                status = NodeStatus(node=node, error=str(exc))
            found.append(status.model_copy(update={"draining": node in self.draining, "gpus": gpus.get(node, 0)}))
        return found

    def resolve_node(self, prefix: str) -> str:
        """The alive node whose id starts with ``prefix``."""
        matches = [n for n in self.agents if n.startswith(prefix)]
        if len(matches) > 1:
            raise UsageError(f"node prefix {prefix!r} is ambiguous ({len(matches)} nodes)")
        if not matches:
            raise NotFoundError(f"no alive node {prefix!r}", hint="`cedana-ray nodes` lists them")
        return matches[0]

    def _place(self, jtype: str, node: str | None = None, exclude: str | None = None, gpu: bool = False) -> str:
        """The node for a ``jtype`` job: the one named, or the least loaded that can run it
        (among those with a GPU when the job needs one)."""
        what = f"{jtype} job that needs a GPU" if gpu else f"{jtype} job"
        if node is not None:
            chosen = self.resolve_node(node)
            status = call(self._agent(chosen).status.remote(), timeout=30)
            if jtype not in status.types or (gpu and not _gpus().get(chosen)):
                raise PrerequisiteError(
                    f"node {chosen[:12]} cannot run a {what}", hint="`cedana-ray nodes` shows what each can run"
                )
            return chosen
        fit = [
            s
            for s in self.nodes()
            if s.error is None and jtype in s.types and not s.draining and s.node != exclude and (s.gpus or not gpu)
        ]
        if not fit:
            raise PrerequisiteError(f"no node can take a {what} now", hint="`cedana-ray nodes`")
        return min(fit, key=lambda s: (s.live_jobs, -s.memory_available, s.node)).node

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
        return fresh

    def _mark_lost(self, alive: set[str]) -> None:
        for job in self.registry.jobs():
            if job.state in LIVE_STATES and job.node not in alive and job.jid not in self._busy:
                log.warning("job %s: node %s is gone, job lost", job.jid, job.node[:12])
                self.registry.save_job(job.model_copy(update={"state": JobState.lost}))
                if job.details.get("restore_on_loss") and job.last_checkpoint:
                    self._pool.submit(self._recover_logged, job.jid)

    def job(self, jid: str) -> Job:
        record = self.registry.job(jid)
        if record.node not in self.agents or jid in self._busy:
            return record
        try:
            return self._merge(record, call(self._agent(record.node).job.remote(jid)))
        except (NotFoundError, Unreachable):  # forgotten there, or the node is going away
            return record

    def jobs(self) -> list[Job]:
        records = self.registry.jobs()
        agents = dict(self.agents)  # the monitor thread changes it
        pending = {n: agents[n].jobs.remote() for n in {r.node for r in records} if n in agents}
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
        node = self._place(jtype, request.node, gpu=request.gpu)
        # Ray's resources placed it on a GPU node: the agent need not check the driver again
        local = request.model_copy(
            update={
                "jid": jid,
                "node": None,
                "checkpoint_every": None,
                "keep": None,
                "restore_on_loss": False,
                "gpu": False,
            }
        )
        job = call(self._agent(node).run.remote(jtype, local))
        details: dict[str, Any] = {"restore_on_loss": request.restore_on_loss, "needs_gpu": request.gpu}
        if request.checkpoint_every:
            details["policy"] = {"every_s": request.checkpoint_every, "keep": request.keep}
        job = job.model_copy(update={"details": {**job.details, **details}})
        self.registry.add_job(job)
        return job

    def manage(self, jtype: str, request: ManageRequest, node: str) -> Job:
        """Adopt a workload running on ``node`` (where the client runs)."""
        jid = self._new_jid(request.jid)
        job = call(self._agent(node).manage.remote(jtype, request.model_copy(update={"jid": jid})))
        self.registry.add_job(job)
        return job

    def set_storage(self, jid: str, url: str) -> Job:
        CheckpointStore(url)  # refuses an unknown scheme now, not at the first dump
        job = self.registry.job(jid)
        job = job.model_copy(update={"details": {**job.details, "storage": url}})
        self.registry.save_job(job)
        return job

    def _live(self, jid: str) -> Job:
        job = self.job(jid)
        if job.state not in LIVE_STATES:
            raise StateError(f"job {jid} is {job.state.value}, not running or frozen")
        return job

    def _on_node(self, jid: str, verb: str, *args: Any) -> Job:
        job = self.job(jid)
        seen: Job = call(getattr(self._agent(job.node), verb).remote(jid, *args))
        return self._merge(job, seen)

    def freeze(self, jid: str) -> Job:
        return self._on_node(jid, "freeze")

    def unfreeze(self, jid: str) -> Job:
        return self._on_node(jid, "unfreeze")

    def kill(self, jid: str, sig: int | None = None) -> Job:
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
        self.registry.delete_job(jid)
        return job

    def read_log(self, jid: str, offset: int, limit: int) -> bytes:
        job = self.registry.job(jid)
        return call(self._agent(job.node).read_log.remote(jid, offset, limit))

    def query(self, jtype: str) -> list[dict[str, Any]]:
        """Every node's answer; a node that lacks what the query needs (a driver, a
        daemon) is left out, and the query fails only when no node could answer."""
        rows, missing = [], []
        for node, agent in sorted(self.agents.items()):
            try:
                rows += [{**r, "node": node} for r in call(agent.query.remote(jtype))]
            except PrerequisiteError as exc:
                missing.append(exc)
        if missing and len(missing) == len(self.agents):
            raise missing[0]
        return rows

    # -- checkpoints
    def dump(self, jid: str, request: DumpRequest) -> DumpResult:
        with self._claim(jid, wait=DUMP_WAIT_S):  # e.g. behind a policy checkpoint
            return self._dump(self._live(jid), request)

    def _dump(self, job: Job, request: DumpRequest) -> DumpResult:
        request = request.model_copy(update={"storage": request.storage or job.details.get("storage") or self.storage})
        result: DumpResult = call(self._agent(job.node).dump.remote(job.jid, request))
        self.registry.add_checkpoint(
            CheckpointInfo(
                checkpoint=result.checkpoint,
                jid=job.jid,
                path=result.path,
                size_bytes=result.size_bytes,
                created=utcnow(),
            )
        )
        update: dict[str, Any] = {"last_checkpoint": result.checkpoint}
        if not request.leave_running:
            update["state"] = JobState.checkpointed
        self.registry.update_job(job.jid, **update)
        return result

    def restore(
        self, request: RestoreRequest, jid: str | None = None, node: str | None = None, jtype: str | None = None
    ) -> RestoreResult:
        """Restore job ``jid`` (its last or a given checkpoint) or ``request.path`` on a node;
        with ``jtype``, only a checkpoint of that job type."""
        manifest, path = self._checkpoint(jid, request)
        if jtype and manifest.type != jtype:
            raise UsageError(f"checkpoint {manifest.checkpoint} is of a {manifest.type} job, not {jtype}")
        target_jid = request.jid or jid or manifest.jid
        with self._claim(target_jid):
            existing = self._existing(target_jid)
            if existing and existing.state in LIVE_STATES:
                raise StateError(
                    f"job {target_jid} is {existing.state.value}",
                    hint="restore a clone with --jid NEW, or kill the job first",
                )
            here = existing.node if existing and existing.node in self.agents else None
            gpu = _needs_gpu(existing, manifest)
            target = self._place(manifest.type, here if node is None else node, gpu=gpu)
            return self._restore_on(target, existing, manifest, path, request.model_copy(update={"jid": target_jid}))

    def _restore_on(
        self, target: str, existing: Job | None, manifest: Manifest, path: str, request: RestoreRequest
    ) -> RestoreResult:
        # the manifest read here goes along: the agent verifies it, but does not read it again
        agent_request = request.model_copy(update={"path": path, "checkpoint": None, "manifest": manifest})
        source = existing.node if existing else None
        history = self._log_of(request.jid, source) if source != target else b""
        result: RestoreResult = call(self._agent(target).restore.remote(agent_request, history))
        job = result.job
        if existing:
            if existing.node != target and existing.node in self.agents:
                self._forget(existing)
            keep = {"created", "command", "managed", "details"}
            job = existing.model_copy(update=job.model_dump(exclude=keep))
        job = job.model_copy(update={"last_checkpoint": manifest.checkpoint, "node": target})
        self.registry.save_job(job)
        return result.model_copy(update={"job": job})

    def _forget(self, job: Job) -> None:
        """Drop what is left of a job on the node it left; the job is safe elsewhere either way."""
        try:
            call(self._agent(job.node).forget.remote(job.jid))
        except CedanaError as exc:
            log.warning("job %s: could not clean up on node %s: %s", job.jid, job.node[:12], exc)

    def _log_of(self, jid: str | None, node: str | None) -> bytes:
        """Job ``jid``'s output on ``node`` (its last MAX_LOG_CARRIED bytes), to carry to another node."""
        if not jid or node not in self.agents:
            return b""
        data, offset = b"", 0
        with suppress(CedanaError):  # no log there (a managed job): nothing to carry
            while chunk := call(self._agent(node).read_log.remote(jid, offset, 1 << 20), timeout=30):
                offset += len(chunk)
                data = (data + chunk)[-MAX_LOG_CARRIED:]
        return data

    def _checkpoint(self, jid: str | None, request: RestoreRequest) -> tuple[Manifest, str]:
        if request.path:
            path = request.path
        elif request.checkpoint:
            path = self.registry.checkpoint(request.checkpoint).path
        elif jid:
            job = self.registry.job(jid)
            if not job.last_checkpoint:
                raise NotFoundError(f"job {jid} has no checkpoint", hint=f"`cedana-ray dump job {jid}`")
            path = self.registry.checkpoint(job.last_checkpoint).path
        else:
            raise UsageError("name a job, a checkpoint or a checkpoint path")
        root, name = split_url(path)
        return CheckpointStore(root, self.signer).manifest(name), path

    def _existing(self, jid: str) -> Job | None:
        try:
            return self.registry.job(jid)
        except NotFoundError:
            return None

    def checkpoints(self, jid: str | None = None) -> list[CheckpointInfo]:
        if jid is not None:
            self.registry.job(jid)
        return self.registry.checkpoints(jid)

    def inspect(self, ckpt: str) -> Manifest:
        return catalog.inspect(self.registry, ckpt, self.signer)

    def import_checkpoint(self, url: str) -> CheckpointInfo:
        return catalog.adopt(self.registry, url, self.signer)

    def delete_checkpoint(self, ckpt: str) -> CheckpointInfo:
        with self._claim(self.registry.checkpoint(ckpt).jid):
            return catalog.delete(self.registry, ckpt, self.signer)

    # -- migration, loss and drain
    def migrate(self, jid: str, node: str, request: DumpRequest | None = None) -> MigrateResult:
        """Move a live job to ``node``: freeze, dump, restore there, resume; the job keeps its id.

        The source stays frozen while the target restores, and resumes if anything fails,
        so a failed migration leaves the job running where it was. A job that cannot
        freeze, or a GPU job (the CUDA driver checkpoints a process only while it runs), is
        dumped and stopped, and restored on its source again if the target fails.
        """
        record = self.registry.job(jid)
        target = self._place(record.type, node, gpu=_needs_gpu(record))  # bad input fails fast, even while busy
        with self._claim(jid):
            job = self._live(jid)
            if target == job.node:
                raise UsageError(f"job {jid} already runs on node {target[:12]}")
            return self._migrate(job, target, request or self._migration_request(job))

    def _migration_request(self, job: Job) -> DumpRequest:
        """Uncompressed to a local store (compressing costs more than writing), lz4 to a remote one."""
        url = job.details.get("storage") or self.storage
        return DumpRequest(compression=Compression.none if url.startswith("file://") else Compression.lz4)

    def _migrate(self, job: Job, target: str, request: DumpRequest) -> MigrateResult:
        start = time.perf_counter()
        freezes = get_plugin_manager().call_for(job.type, "cedana_freeze_handler") is not None
        move = self._move_frozen if freezes and not _needs_gpu(job) else self._move_stopped
        dumped, restored, dump_s = move(job, target, request, start)
        moved = self.registry.job(job.jid).model_copy(
            update={"node": target, "state": job.state, "pid": restored.pid, "log": restored.log}
        )
        self.registry.save_job(moved)
        total = time.perf_counter() - start
        return MigrateResult(
            jid=job.jid,
            source=job.node,
            target=target,
            checkpoint=dumped.checkpoint,
            dump_s=round(dump_s, 6),
            restore_s=round(total - dump_s, 6),
            duration_s=round(total, 6),
            job=moved,
        )

    def _move_frozen(self, job: Job, target: str, request: DumpRequest, start: float) -> tuple[DumpResult, Job, float]:
        """Freeze, dump leaving it running, restore frozen on the target, resume there: the source
        stays frozen meanwhile and resumes if anything fails."""
        source = self._agent(job.node)
        was_frozen = job.state is JobState.frozen
        if not was_frozen:
            call(source.freeze.remote(job.jid))
        try:
            dumped = self._dump(job, request.model_copy(update={"leave_running": True}))
            dump_s = time.perf_counter() - start
            restored = self._restore_dumped(target, job, dumped)
        except BaseException:
            if not was_frozen:
                call(source.unfreeze.remote(job.jid))
            raise
        if not was_frozen:
            call(self._agent(target).unfreeze.remote(job.jid))
        return dumped, restored, dump_s

    def _move_stopped(self, job: Job, target: str, request: DumpRequest, start: float) -> tuple[DumpResult, Job, float]:
        """For job types that cannot freeze (the CRI has no pause): dump and stop, restore on the
        target, or on the source again if that fails. It runs until its checkpoint is stored,
        and the restored job goes on from the checkpoint."""
        dumped = self._dump(job, request.model_copy(update={"leave_running": False}))
        dump_s = time.perf_counter() - start
        try:
            return dumped, self._restore_dumped(target, job, dumped), dump_s
        except CedanaError:
            self._restore_dumped(job.node, job, dumped)
            raise

    def _restore_dumped(self, node: str, job: Job, dumped: DumpResult) -> Job:
        manifest, path = self._checkpoint(None, RestoreRequest(path=dumped.path))
        return self._restore_on(node, job, manifest, path, RestoreRequest(jid=job.jid)).job

    def _recover_logged(self, jid: str) -> None:
        try:
            result = self.restore(RestoreRequest(), jid=jid)
            log.warning("job %s restored on node %s after its node was lost", jid, result.job.node[:12])
        except CedanaError as exc:
            log.error("job %s could not be restored after its node was lost: %s", jid, exc)

    def drain(self, node: str) -> list[MigrateResult]:
        """Move every live job off ``node`` (a node about to go away); no new job goes there."""
        node = self.resolve_node(node)
        self.draining.setdefault(node, 0.0)
        moved = []
        for job in self.jobs():
            if job.node == node and job.state in LIVE_STATES:
                with self._claim(job.jid):
                    target = self._place(job.type, exclude=node, gpu=_needs_gpu(job))
                    moved.append(self._migrate(job, target, self._migration_request(job)))
        return moved

    def undrain(self, node: str) -> str:
        """Take new jobs on ``node`` again (a drain that was called off)."""
        node = self.resolve_node(node)
        self.draining.pop(node, None)
        return node

    def _drain_logged(self, node: str) -> None:
        try:
            for m in self.drain(node):
                log.warning("drain of %s: job %s moved to %s in %.1f s", node[:12], m.jid, m.target[:12], m.duration_s)
        except CedanaError as exc:
            log.error("drain of node %s failed: %s", node[:12], exc)

    # -- policies
    def _run_policies(self) -> None:
        now = time.monotonic()
        for job in self.registry.jobs():
            policy = job.details.get("policy")
            if not policy or job.state not in LIVE_STATES or job.node not in self.agents:
                continue
            due = self.due.setdefault(job.jid, now + policy["every_s"])
            if now >= due and job.jid not in self._busy:
                self.due[job.jid] = now + policy["every_s"]
                self._pool.submit(self._policy_run, job.jid, policy.get("keep"))

    def _policy_run(self, jid: str, keep: int | None) -> None:
        try:
            with self._claim(jid):
                result = self._dump(self._live(jid), DumpRequest(leave_running=True))
            log.info("policy checkpoint %s of job %s in %.2f s", result.checkpoint, jid, result.duration_s)
            for old in self.registry.checkpoints(jid)[:-keep] if keep else []:
                self.delete_checkpoint(old.checkpoint)
        except CedanaError as exc:
            log.error("policy checkpoint of job %s failed: %s", jid, exc)

    def info(self) -> dict[str, Any]:
        return {
            "storage": self.storage,
            "base": str(self.base),
            "nodes": len(self.agents),
            "started": self.started,
            "encrypted": self.key is not None,
        }


def _draining_nodes() -> dict[str, int]:
    """Nodes Ray is draining (``ray drain-node``, autoscaler preemption), with their deadline in ms."""
    from ray._private.state import state  # no public API yet for the drain state

    try:
        return dict(state.get_draining_nodes())
    except Exception as exc:  # a private API: if it changes, lose drain detection, not the monitor
        log.warning("cannot read Ray's drain state: %s", exc)
        return {}


def _gpus() -> dict[str, float]:
    """Each alive node's GPUs, as Ray counts them (detected, or declared with ``--num-gpus``)."""
    return {n["NodeID"]: n["Resources"].get("GPU", 0) for n in ray.nodes() if n["Alive"]}


def _needs_gpu(job: Job | None, manifest: Manifest | None = None) -> bool:
    """A job run with ``--gpu``, or a checkpoint that holds CUDA state, goes to a GPU node only."""
    return bool((job and job.details.get("needs_gpu")) or (manifest and manifest.details.get("gpu")))
