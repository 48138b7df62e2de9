"""Migration, node loss and drain: move a live job to another node, restore the jobs of a
lost node elsewhere when they asked for it, move every job off a draining node.

Mixed into the :class:`~cedana_ray.actors.coordinator.Coordinator`, whose state it uses.
"""

from __future__ import annotations

import logging
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass

from cedana_ray.backend import Progress
from cedana_ray.errors import CedanaError, UsageError
from cedana_ray.handoff import new_key
from cedana_ray.models import LIVE_STATES, Compression, DumpResult, EventKind, Job, JobState, Manifest, MigrateResult
from cedana_ray.plugins_manager import get_plugin_manager
from cedana_ray.records import Records
from cedana_ray.registry import Registry
from cedana_ray.remote import call
from cedana_ray.requests import DumpRequest, MigrateRequest, RestoreRequest

from .placement import needs_gpu, one_machine
from .reservations import give_back, resources_of

log = logging.getLogger("cedana_ray.coordinator")


def _as_migration(request: DumpRequest | None) -> MigrateRequest:
    """A migration's request; a dump's options (the API's older form) become one's."""
    return request if isinstance(request, MigrateRequest) else MigrateRequest(**dict(request or {}))


def through_store_by_default(url: str, in_place: bool, one_machine: bool) -> bool:
    """Whether a migration's images go through the store unless asked otherwise: only where
    that copies nothing, both nodes on one machine with a local store that CRIU writes into
    and restores from in place (uncompressed, unencrypted). Anywhere else, sending them
    straight to the target copies them once, where the store would twice."""
    return url.startswith("file://") and in_place and one_machine


@dataclass(frozen=True)
class Moved:
    """What moving a job did: the checkpoint it kept (if any), the job on its target, when."""

    kept: DumpResult | None
    job: Job
    dump_s: float
    downtime_s: float  # from the job's freeze (or stop) on the source to its resume on the target
    route: str = "store"  # or "direct": the images went from node to node


class Migration:
    registry: Registry
    records: Records
    storage: str
    key: bytes | None
    draining: dict[str, float]
    _busy: set[str]
    _pool: ThreadPoolExecutor

    def _mark_lost(self, alive: set[str]) -> None:
        for job in self.registry.jobs():
            if job.state in LIVE_STATES and job.node not in alive and job.jid not in self._busy:
                log.warning("job %s: node %s is gone, job lost", job.jid, job.node[:12])
                lost = job.model_copy(update={"state": JobState.lost})
                self.registry.save_job(lost)
                self.records.ended(lost)
                give_back(job)
                if job.details.get("restore_on_loss") and job.last_checkpoint:
                    self._pool.submit(self._recover_logged, job.jid)

    def migrate(
        self,
        jid: str,
        node: str,
        request: DumpRequest | None = None,
        progress: Progress | None = None,
        live: bool = False,
    ) -> MigrateResult:
        """Move a live job to ``node``: freeze, dump straight to the target, restore there,
        resume, then keep the images as a checkpoint; the job keeps its id.

        The source stays frozen while the target restores, and resumes if anything fails,
        so a failed migration leaves the job running where it was. ``through_store``: the
        images pass through the store instead. A job that cannot
        freeze, or a GPU job (the CUDA driver checkpoints a process only while it runs), is
        dumped and stopped, and restored on its source again if the target fails.
        """
        record = self.registry.job(jid)
        if live:  # by the VM's hypervisor, while it runs: see live_migration.py
            self._require_live(record)
        # bad input fails fast, even while busy
        target = self._place(record.type, node, gpu=needs_gpu(record), needs=resources_of(record))
        with self._claim(jid):
            job = self._live(jid)
            if target == job.node:
                raise UsageError(f"job {jid} already runs on node {target[:12]}")
            if live:
                return self._migrate_live(job, target, progress)
            return self._migrate(job, target, _as_migration(request), progress=progress)

    def _migrate(
        self,
        job: Job,
        target: str,
        request: MigrateRequest,
        kind: EventKind = EventKind.migrated,
        progress: Progress | None = None,
    ) -> MigrateResult:
        start = time.perf_counter()
        freezes = get_plugin_manager().call_for(job.type, "cedana_freeze_handler") is not None
        if not freezes or needs_gpu(job):
            move = self._move_stopped
        else:
            move = self._move_frozen if self._through_store(job, target, request) else self._move_direct
        with self.records.noting_failure(job.jid, "drain" if kind is EventKind.drained else "migration"):
            done = move(job, target, request, start, progress)
        moved = self.registry.job(job.jid).model_copy(
            update={"node": target, "state": job.state, "pid": done.job.pid, "log": done.job.log}
        )
        self.registry.save_job(moved)
        total = time.perf_counter() - start
        times = {"duration_s": round(total, 6), "downtime_s": round(done.downtime_s, 6)}
        self.records.note(job.jid, kind, source=job.node, target=target, route=done.route, **times)
        return MigrateResult(
            jid=job.jid,
            source=job.node,
            target=target,
            checkpoint=done.kept.checkpoint if done.kept else None,
            route=done.route,
            dump_s=round(done.dump_s, 6),
            restore_s=round(total - done.dump_s, 6),
            **times,
            job=moved,
        )

    def _through_store(self, job: Job, target: str, request: MigrateRequest) -> bool:
        if request.through_store is not None:
            return request.through_store
        # what the store does by default on local disk: uncompressed, straight into the store
        in_place = request.compression in (None, Compression.none) and not (request.encrypt or self.key)
        url = request.storage or job.details.get("storage") or self.storage
        return through_store_by_default(url, in_place, one_machine(job.node, target))

    def _move_direct(
        self, job: Job, target: str, request: MigrateRequest, start: float, progress: Progress | None
    ) -> Moved:
        """Freeze, send the images straight to the target (:mod:`cedana_ray.handoff`), restore
        there, resume there; then keep them as a checkpoint, from the target, while the job
        runs. The source stays frozen meanwhile and resumes if anything fails; its downtime
        runs from the freeze to the resume on the target."""
        store = (request.storage or job.details.get("storage") or self.storage).rstrip("/")
        request = request.model_copy(update={"storage": store})
        nbytes = call(self._agent(job.node).handoff_bytes.remote(job.jid))
        hid, key = secrets.token_hex(8), new_key()
        receiver = self._agent(target)
        address = call(receiver.handoff_receive.remote(hid, key, nbytes))
        was_frozen = job.state is JobState.frozen
        stopped = time.perf_counter()
        try:
            if not was_frozen:
                self._serve(job.node, "freeze", job.jid)
            sending = (job.jid, request, address, key)
            sent: Manifest = self._agent_call(job.node, "handoff_send", *sending, progress=progress)
            dump_s = time.perf_counter() - start
            via = ("handoff_restore", hid)
            url = f"{store}/{sent.checkpoint}"
            restored = self._restore_on(target, job, sent, url, RestoreRequest(jid=job.jid), progress, via).job
        except BaseException:
            with suppress(CedanaError):
                call(receiver.handoff_discard.remote(hid))
            if not was_frozen:
                self._serve(job.node, "unfreeze", job.jid)
            raise
        if not was_frozen:
            self._serve(target, "unfreeze", job.jid)
        downtime_s = time.perf_counter() - stopped
        return Moved(self._keep(target, hid, sent, request), restored, dump_s, downtime_s, route="direct")

    def _keep(self, node: str, hid: str, sent: Manifest, request: MigrateRequest) -> DumpResult | None:
        """Store what a handoff sent as the job's checkpoint, from ``node`` where it now runs;
        unless asked not to, or if that fails: the job runs on, its last checkpoint as before."""
        agent = self._agent(node)
        kept: DumpResult | None = None
        try:
            if request.store:
                kept = call(agent.handoff_store.remote(hid, sent, request))
            else:
                call(agent.handoff_discard.remote(hid, sent))
        except CedanaError as exc:
            log.warning("job %s runs on node %s, but its checkpoint was not kept: %s", sent.jid, node[:12], exc)
        if kept is None:
            self.registry.update_job(sent.jid, last_checkpoint=sent.parent)
            return None
        self.records.dumped(kept.info())
        self.records.checkpointed(kept, node)
        return kept

    def _move_frozen(
        self, job: Job, target: str, request: DumpRequest, start: float, progress: Progress | None
    ) -> Moved:
        """Freeze, dump leaving it running, restore frozen on the target, resume there: the source
        stays frozen meanwhile and resumes if anything fails. Its downtime runs from the
        freeze (or the dump, for a job already frozen) to the resume on the target."""
        was_frozen = job.state is JobState.frozen
        stopped = time.perf_counter()
        if not was_frozen:
            self._serve(job.node, "freeze", job.jid)
        try:
            dumped = self._dump(job, request.model_copy(update={"leave_running": True}), progress)
            dump_s = time.perf_counter() - start
            restored = self._restore_dumped(target, job, dumped, progress)
        except BaseException:
            if not was_frozen:
                self._serve(job.node, "unfreeze", job.jid)
            raise
        if not was_frozen:
            self._serve(target, "unfreeze", job.jid)
        return Moved(dumped, restored, dump_s, time.perf_counter() - stopped)

    def _move_stopped(
        self, job: Job, target: str, request: DumpRequest, start: float, progress: Progress | None
    ) -> Moved:
        """For job types that cannot freeze (the CRI has no pause): dump and stop, restore on the
        target, or on the source again if that fails. It runs until its checkpoint is stored,
        and the restored job goes on from the checkpoint: its downtime runs from the dump's
        start to the restore's end."""
        dumped = self._dump(job, request.model_copy(update={"leave_running": False}), progress)
        dump_s = time.perf_counter() - start
        try:
            restored = self._restore_dumped(target, job, dumped, progress)
            return Moved(dumped, restored, dump_s, time.perf_counter() - start)
        except CedanaError:
            self._restore_dumped(job.node, job, dumped)
            raise

    def _restore_dumped(self, node: str, job: Job, dumped: DumpResult, progress: Progress | None = None) -> Job:
        manifest = self.records.manifest(dumped.path)
        return self._restore_on(node, job, manifest, dumped.path, RestoreRequest(jid=job.jid), progress).job

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
                    target = self._place(job.type, exclude=node, gpu=needs_gpu(job), needs=resources_of(job))
                    moved.append(self._migrate(job, target, MigrateRequest(), EventKind.drained))
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
