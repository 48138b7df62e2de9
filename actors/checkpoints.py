"""Checkpoints: dump and restore a job through its node's agent, and the checkpoint catalog.

Mixed into the :class:`~cedana_ray.actors.coordinator.Coordinator`, whose state it uses.
"""

from __future__ import annotations

import logging
from contextlib import suppress
from typing import Any

from cedana_ray import catalog
from cedana_ray.errors import CedanaError, NotFoundError, StateError, UsageError
from cedana_ray.models import LIVE_STATES, CheckpointInfo, DumpResult, Job, JobState, Manifest, RestoreResult, utcnow
from cedana_ray.registry import Registry
from cedana_ray.requests import DumpRequest, RestoreRequest
from cedana_ray.signing import Signer
from cedana_ray.store import CheckpointStore, split_url

from .placement import needs_gpu
from .remote import call

MAX_LOG_CARRIED = 64 << 20
DUMP_WAIT_S = 300.0  # an on-demand dump waits this long for a policy run or migration to end
log = logging.getLogger("cedana_ray.coordinator")


class Checkpoints:
    registry: Registry
    storage: str
    signer: Signer

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
            gpu = needs_gpu(existing, manifest)
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
