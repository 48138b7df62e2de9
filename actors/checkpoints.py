"""Checkpoints: dump and restore a job through its node's agent, and the checkpoint catalog.

Mixed into the :class:`~cedana_ray.actors.coordinator.Coordinator`, whose state it uses.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager, suppress
from pathlib import Path
from typing import Any

from cedana_ray import working_dir
from cedana_ray.backend import Progress
from cedana_ray.errors import CedanaError, UsageError
from cedana_ray.models import DumpResult, Job, Manifest, RestoreResult
from cedana_ray.records import Records, RecordVerbs, replaceable, require_state
from cedana_ray.remote import call
from cedana_ray.requests import DumpRequest, RestoreRequest

from .placement import needs_gpu
from .reservations import give_back, release, reserve, resources_of

MAX_LOG_CARRIED = 64 << 20
DUMP_WAIT_S = 300.0  # an on-demand dump waits this long for a policy run or migration to end
log = logging.getLogger("cedana_ray.coordinator")


class Checkpoints(RecordVerbs):
    records: Records
    storage: str
    base: Path

    def _exclusive(self, jid: str) -> AbstractContextManager[Any]:
        return self._claim(jid)

    def dump(self, jid: str, request: DumpRequest, progress: Progress | None = None) -> DumpResult:
        """Checkpoint job ``jid`` on its node; the node's engine refuses a job found dead there."""
        with self._claim(jid, wait=DUMP_WAIT_S):  # e.g. behind a policy checkpoint
            return self._dump(require_state(self.records.registry.job(jid)), request, progress)

    def _dump(self, job: Job, request: DumpRequest, progress: Progress | None = None) -> DumpResult:
        request = request.model_copy(update={"storage": request.storage or job.details.get("storage") or self.storage})
        with self.records.noting_failure(job.jid, "dump"):
            result: DumpResult = self._agent_call(job.node, "serve", "dump", job.jid, request, progress=progress)
        self.records.dumped(result.info(), checkpointed=not request.leave_running)
        self.records.checkpointed(result, job.node)
        if not request.leave_running:  # stopped: what it held is free until it is restored
            give_back(job)
        return result

    def restore(
        self,
        request: RestoreRequest,
        jid: str | None = None,
        jtype: str | None = None,
        progress: Progress | None = None,
        node: str | None = None,
    ) -> RestoreResult:
        """Restore job ``jid`` (its last or a given checkpoint) or ``request.path`` on a node;
        with ``jtype``, only a checkpoint of that job type."""
        path = self.records.locate(jid, request)
        manifest = self.records.manifest(path)
        if jtype and manifest.type != jtype:
            raise UsageError(f"checkpoint {manifest.checkpoint} is of a {manifest.type} job, not {jtype}")
        target_jid = request.jid or jid or manifest.jid
        with self._claim(target_jid), self.records.noting_failure(target_jid, "restore"):
            existing = replaceable(self.records.existing(target_jid))
            here = existing.node if existing and existing.node in self.agents else None
            gpu = needs_gpu(existing, manifest)
            needs = resources_of(existing)
            target = self._place(manifest.type, here if node is None else node, gpu=gpu, needs=needs)
            request = request.model_copy(update={"jid": target_jid})
            return self._restore_on(target, existing, manifest, path, request, progress)

    def _restore_on(
        self,
        target: str,
        existing: Job | None,
        manifest: Manifest,
        path: str,
        request: RestoreRequest,
        progress: Progress | None = None,
        via: tuple[Any, ...] = ("restore",),
    ) -> RestoreResult:
        """Restore on ``target`` through the agent's method ``via[0]`` (with ``via[1:]`` after
        its request and the job's output so far): ``restore`` reads the checkpoint at ``path``."""
        # the manifest read here goes along: the agent verifies it, but does not read it again
        package = working_dir.kept(existing.details.get("working_dir") if existing else None, self.base)
        update = {"path": path, "checkpoint": None, "manifest": manifest, "working_dir": package}
        agent_request = request.model_copy(update=update)
        source = existing.node if existing else None
        history = self._log_of(request.jid, source) if source != target else b""
        jid = request.jid or manifest.jid
        needs = resources_of(existing)
        reserve(jid, target, needs)
        try:
            method, *more = via
            result: RestoreResult = self._agent_call(target, method, agent_request, history, *more, progress=progress)
        except BaseException:
            if needs and target != source:
                release(jid, target)
            raise
        if existing and existing.node != target:
            give_back(existing)
            if existing.node in self.agents:
                self._forget(existing)
        job = self.records.restored(existing, result.job, manifest.checkpoint, target)
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
        with suppress(CedanaError):  # no log there (a managed job): nothing to carry
            return self._serve(node, "read_log", jid, -MAX_LOG_CARRIED, MAX_LOG_CARRIED, timeout=30)
        return b""
