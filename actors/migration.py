"""Migration, node loss and drain: move a live job to another node, restore the jobs of a
lost node elsewhere when they asked for it, move every job off a draining node.

Mixed into the :class:`~cedana_ray.actors.coordinator.Coordinator`, whose state it uses.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

from cedana_ray.backend import Progress
from cedana_ray.errors import CedanaError, UsageError
from cedana_ray.models import LIVE_STATES, Compression, DumpResult, EventKind, Job, JobState, MigrateResult
from cedana_ray.plugins_manager import get_plugin_manager
from cedana_ray.records import Records
from cedana_ray.registry import Registry
from cedana_ray.requests import DumpRequest, RestoreRequest

from .placement import needs_gpu
from .reservations import give_back, resources_of

log = logging.getLogger("cedana_ray.coordinator")


class Migration:
    registry: Registry
    records: Records
    storage: str
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
        """Move a live job to ``node``: freeze, dump, restore there, resume; the job keeps its id.

        The source stays frozen while the target restores, and resumes if anything fails,
        so a failed migration leaves the job running where it was. A job that cannot
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
                return self._migrate_live(job, target)
            return self._migrate(job, target, request or self._migration_request(job), progress=progress)

    def _migration_request(self, job: Job) -> DumpRequest:
        """Uncompressed to a local store (compressing costs more than writing), lz4 to a remote one."""
        url = job.details.get("storage") or self.storage
        return DumpRequest(compression=Compression.none if url.startswith("file://") else Compression.lz4)

    def _migrate(
        self,
        job: Job,
        target: str,
        request: DumpRequest,
        kind: EventKind = EventKind.migrated,
        progress: Progress | None = None,
    ) -> MigrateResult:
        start = time.perf_counter()
        freezes = get_plugin_manager().call_for(job.type, "cedana_freeze_handler") is not None
        move = self._move_frozen if freezes and not needs_gpu(job) else self._move_stopped
        with self.records.noting_failure(job.jid, "drain" if kind is EventKind.drained else "migration"):
            dumped, restored, dump_s, downtime_s = move(job, target, request, start, progress)
        moved = self.registry.job(job.jid).model_copy(
            update={"node": target, "state": job.state, "pid": restored.pid, "log": restored.log}
        )
        self.registry.save_job(moved)
        total = time.perf_counter() - start
        times = {"duration_s": round(total, 6), "downtime_s": round(downtime_s, 6)}
        self.records.note(job.jid, kind, source=job.node, target=target, **times)
        return MigrateResult(
            jid=job.jid,
            source=job.node,
            target=target,
            checkpoint=dumped.checkpoint,
            dump_s=round(dump_s, 6),
            restore_s=round(total - dump_s, 6),
            **times,
            job=moved,
        )

    def _move_frozen(
        self, job: Job, target: str, request: DumpRequest, start: float, progress: Progress | None
    ) -> tuple[DumpResult, Job, float, float]:
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
        return dumped, restored, dump_s, time.perf_counter() - stopped

    def _move_stopped(
        self, job: Job, target: str, request: DumpRequest, start: float, progress: Progress | None
    ) -> tuple[DumpResult, Job, float, float]:
        """For job types that cannot freeze (the CRI has no pause): dump and stop, restore on the
        target, or on the source again if that fails. It runs until its checkpoint is stored,
        and the restored job goes on from the checkpoint: its downtime runs from the dump's
        start to the restore's end."""
        dumped = self._dump(job, request.model_copy(update={"leave_running": False}), progress)
        dump_s = time.perf_counter() - start
        try:
            restored = self._restore_dumped(target, job, dumped, progress)
            return dumped, restored, dump_s, time.perf_counter() - start
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
                    moved.append(self._migrate(job, target, self._migration_request(job), EventKind.drained))
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
