"""The record keeper: jobs and their checkpoints in a registry, and the one way to change them.

Local mode keeps one registry in its state dir. A cluster keeps the coordinator's as the
cluster's record: every job, the node it runs on, its policy and its checkpoints (the
catalog). Each node's agent keeps a registry of its own for the jobs running there (their
processes, and the marks of dumps in progress that :mod:`cedana_ray.recovery` finishes if
the agent dies), which the coordinator reads for their live state; it catalogs no
checkpoints and keeps no history (``authoritative=False``).

The history of each job (:class:`~cedana_ray.models.Event`: started, checkpointed, restored,
migrated, failed...) is kept beside its record, so it outlives the job and a restarted
coordinator.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from typing import Any

from . import metrics
from .errors import CheckpointNotFound, JobNotFound, StateError, UsageError
from .models import LIVE_STATES, CheckpointInfo, DumpResult, Event, EventKind, Job, JobState, Manifest
from .registry import Registry
from .requests import RestoreRequest
from .signing import Signer
from .store import CheckpointStore, split_url

KEPT_ON_RESTORE = {"created", "command", "managed", "details"}  # a restored job is still the job it was


def require_state(job: Job, *states: JobState) -> Job:
    """``job`` if it is in one of ``states`` (default: live); a StateError otherwise."""
    wanted = states or LIVE_STATES
    if job.state not in wanted:
        raise StateError(f"job {job.jid} is {job.state.value}, not {' or '.join(s.value for s in wanted)}")
    return job


def replaceable(existing: Job | None) -> Job | None:
    """``existing``, the job a restore replaces (if any), unless it is live: a live job is never replaced."""
    if existing and existing.state in LIVE_STATES:
        raise StateError(
            f"job {existing.jid} is {existing.state.value}",
            hint="restore a clone with --jid NEW, or kill the job first",
        )
    return existing


class Records:
    def __init__(self, registry: Registry, signer: Signer, *, authoritative: bool = True) -> None:
        self.registry = registry
        self.signer = signer  # only checkpoints signed with its key are trusted
        # whether this is the record of checkpoints and history (not a cluster node's registry)
        self.authoritative = authoritative
        metrics.watch(self)  # on a cluster: each live job's checkpoint age

    # -- history
    def note(self, jid: str, kind: EventKind, **detail: Any) -> None:
        """Add ``kind`` to job ``jid``'s history."""
        if self.authoritative:
            self.registry.add_event(Event(jid=jid, kind=kind, detail=detail))
        metrics.noted(self, jid, kind, detail)

    @contextmanager
    def noting_failure(self, jid: str, what: str) -> Iterator[None]:
        """Note in job ``jid``'s history that its ``what`` (dump, restore, migration, drain)
        failed, with the error's first line, if it does; the error goes on."""
        try:
            yield
        except Exception as exc:
            self.note(jid, EventKind.failed, what=what, error=(str(exc) or repr(exc)).splitlines()[0])
            metrics.failed(self, what, exc)
            raise

    def events(self, jid: str | None = None, after: int = 0) -> list[Event]:
        return self.registry.events(jid, after)

    # -- jobs
    def started(self, job: Job) -> None:
        """Record a new job: started, or adopted."""
        self.registry.add_job(job)
        kind = EventKind.adopted if job.managed else EventKind.started
        self.note(job.jid, kind, type=job.type, node=job.node, pid=job.pid)

    def ended(self, job: Job) -> None:
        """Note that ``job`` is over: killed, exited (with its code) or lost."""
        detail = {"exit_code": job.exit_code} if job.state is JobState.exited else {}
        self.note(job.jid, EventKind(job.state.value), node=job.node, **detail)

    def deleted(self, jid: str) -> None:
        self.registry.delete_job(jid)
        self.note(jid, EventKind.deleted)

    def existing(self, jid: str) -> Job | None:
        try:
            return self.registry.job(jid)
        except JobNotFound:
            return None

    def dumped(self, info: CheckpointInfo, *, checkpointed: bool = False) -> Job:
        """Record checkpoint ``info`` of its job (now its last), the job stopped if ``checkpointed``."""
        if self.authoritative:
            self.registry.add_checkpoint(info)
        update: dict[str, Any] = {"last_checkpoint": info.checkpoint}
        if checkpointed:
            update["state"] = JobState.checkpointed
        return self.registry.update_job(info.jid, **update)  # not a whole row: a `job kill` meanwhile stays

    def restored(self, existing: Job | None, job: Job, checkpoint: str, node: str) -> Job:
        """Record ``job``, restored from ``checkpoint`` on ``node``: over ``existing`` if any, whose
        id, creation, command and details (policy, store) it keeps; its process is the new one."""
        update = {"last_checkpoint": checkpoint, "node": node}
        if existing:
            fresh = job.model_dump(exclude=KEPT_ON_RESTORE)
            job = existing.model_copy(update={**fresh, **update, "details": {**existing.details, **job.details}})
        else:
            job = job.model_copy(update=update)
        self.registry.save_job(job)
        self.note(job.jid, EventKind.restored, checkpoint=checkpoint, node=node)
        metrics.restored(self, job, checkpoint, node)
        return job

    def checkpointed(self, result: DumpResult, node: str) -> None:
        """Note a dump that is done (recorded by :meth:`dumped`)."""
        detail = {"checkpoint": result.checkpoint, "size_bytes": result.size_bytes, "duration_s": result.duration_s}
        self.note(result.jid, EventKind.checkpointed, node=node, **detail)
        metrics.checkpointed(self, result, node)

    # -- checkpoints
    def locate(self, jid: str | None, request: RestoreRequest) -> str:
        """The URL of the checkpoint a restore asks for: its path, a checkpoint id, or job ``jid``'s last."""
        if request.path:
            return request.path
        if request.checkpoint:
            return self.registry.checkpoint(request.checkpoint).path
        if not jid:
            raise UsageError("name a job, a checkpoint or a checkpoint path")
        job = self.registry.job(jid)
        if not job.last_checkpoint:
            raise CheckpointNotFound(f"job {jid} has no checkpoint", hint=f"`cedana-ray dump job {jid}`")
        return self.registry.checkpoint(job.last_checkpoint).path

    def manifest(self, url: str) -> Manifest:
        """The verified manifest of the checkpoint at ``url``."""
        root, name = split_url(url)
        return CheckpointStore(root, self.signer).manifest(name)

    def checkpoints(self, jid: str | None = None) -> list[CheckpointInfo]:
        if jid is not None:
            self.registry.job(jid)  # an unknown job is an error, not an empty list
        return self.registry.checkpoints(jid)

    def inspect(self, ckpt: str) -> Manifest:
        return self.manifest(self.registry.checkpoint(ckpt).path)

    def delete_checkpoint(self, ckpt: str) -> CheckpointInfo:
        """Remove checkpoint ``ckpt`` from its store and the catalog; its job falls back to the one before."""
        info = self.registry.checkpoint(ckpt)
        root, name = split_url(info.path)
        with suppress(CheckpointNotFound):  # gone from the store: drop it from the catalog too
            CheckpointStore(root, self.signer).delete(name)
        self.registry.delete_checkpoint(ckpt)
        job = self.existing(info.jid)
        if job and job.last_checkpoint == info.checkpoint:
            rest = self.registry.checkpoints(info.jid)
            self.registry.update_job(job.jid, last_checkpoint=rest[-1].checkpoint if rest else None)
        return info

    def adopt(self, url: str) -> CheckpointInfo:
        """Import the checkpoint at ``url``, made by another cluster or state dir: once every chunk
        matches its manifest, sign the manifest with our key too and catalog it.

        Whoever imports vouches for the checkpoint's origin: the chunks' digests only prove that
        the images are the ones its manifest describes.
        """
        root, name = split_url(url)
        store = CheckpointStore(root, self.signer)
        manifest = store.manifest(name, verify=False)
        store.verify(manifest)
        store.endorse(manifest)
        info = CheckpointInfo.of(manifest, store.url_of(name))
        self.registry.add_checkpoint(info)
        return info

    def recover(self, url: str) -> list[CheckpointInfo]:
        """Catalog the checkpoints of known jobs found in the store at ``url`` but not in the catalog.

        A dump that finished while its catalog was away (a restarted coordinator) is not lost.
        Only checkpoints signed with our key count: one planted in the store is ignored.
        """
        store = CheckpointStore(url, self.signer)
        known = {c.checkpoint for c in self.registry.checkpoints()}
        jobs = {j.jid for j in self.registry.jobs()}
        found = []
        for m in store.list():
            if m.checkpoint in known or m.jid not in jobs:
                continue
            info = CheckpointInfo.of(m, store.url_of(m.checkpoint))
            self.registry.add_checkpoint(info)
            found.append(info)
            if self.registry.checkpoints(m.jid)[-1].checkpoint == m.checkpoint:  # the newest: restores start there
                self.registry.update_job(m.jid, last_checkpoint=m.checkpoint)
        return found


class RecordVerbs:
    """The verbs that only read or change records, of a backend that keeps :class:`Records`
    (the engine, the coordinator), each deleting under its own exclusion of the job (``_exclusive``)."""

    records: Records

    def _exclusive(self, jid: str) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def set_storage(self, jid: str, url: str) -> Job:
        """Make ``url`` the default checkpoint store of job ``jid``."""
        CheckpointStore(url)  # refuses an unknown scheme now, not at the first dump
        return self.records.registry.update_job(jid, details={"storage": url})

    def checkpoints(self, jid: str | None = None) -> list[CheckpointInfo]:
        return self.records.checkpoints(jid)

    def inspect(self, ckpt: str) -> Manifest:
        return self.records.inspect(ckpt)

    def import_checkpoint(self, url: str) -> CheckpointInfo:
        """Trust and catalog the checkpoint at ``url``, made elsewhere (see :meth:`Records.adopt`)."""
        return self.records.adopt(url)

    def events(self, jid: str | None = None, after: int = 0) -> list[Event]:
        return self.records.events(jid, after)

    def delete_checkpoint(self, ckpt: str) -> CheckpointInfo:
        with self._exclusive(self.records.registry.checkpoint(ckpt).jid):
            return self.records.delete_checkpoint(ckpt)
