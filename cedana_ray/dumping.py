"""The dump chain of :class:`cedana_ray.engine.Engine`:

    locked > require_live > finish_dump > commit > <plugin> > <gpu> > criu_dump | <plugin handler>

and, for a virtual machine's type (one with a VM handler), the VM pipeline, without CRIU:

    locked > require_live > finish_dump > commit > <plugin's VM middleware> > <plugin's VM handler>

A mixin of the engine: it uses the engine's registry, plugins, stores and locks.
"""

from __future__ import annotations

import secrets
import signal
import time
from typing import TYPE_CHECKING, Any

from pydantic import SecretBytes

from . import criu, failpoint, recovery
from .errors import CedanaError, StateError
from .models import DumpResult, Job, JobState, Manifest, utcnow
from .pipeline import Context, DumpState, Handler, Pipeline
from .proctree import alive, signal_tree, tree_rss
from .requests import DumpRequest
from .retry import until
from .staging import remove_tree, staging_area

if TYPE_CHECKING:
    from .backend import Progress
    from .store import CheckpointStore

STOP_TIMEOUT_S = 30.0  # for a dumped job to be gone once killed: one holding GBs of memory takes seconds
STOP_POLL_S = 0.02
# A staged VM state's most bytes written but not yet stored: past the largest chunk (16 MiB),
# which must be written whole before it is stored, with room for the store's chunks in flight.
STAGED_VM_STATE_MAX = 96 << 20


MANIFEST_FIELDS = (
    "checkpoint",
    "jid",
    "type",
    "node",
    "created",
    "criu_version",
    "criu",
    "parent",
    "details",
    "metadata",
)


def checkpoint_name(jid: str) -> str:
    return f"{jid}-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}"


def dumped(store: CheckpointStore, manifest: Manifest) -> DumpResult:
    """What a dump into ``store`` that wrote ``manifest`` returns (its duration: the caller's)."""
    return DumpResult(
        jid=manifest.jid,
        checkpoint=manifest.checkpoint,
        path=store.url_of(manifest.checkpoint),
        size_bytes=manifest.size_bytes,
        image_bytes=manifest.image_bytes,
        created=manifest.created,
        metadata=manifest.metadata,
        duration_s=0.0,
    )


class DumpChain:
    """Checkpointing a job: :meth:`dump` and its core middleware."""

    def locked(self, ctx: Context, next_: Handler) -> Any:
        with self.lock(ctx.state.jid) as fd:
            ctx.state.lock = fd
            return next_(ctx)

    def require_live(self, ctx: Context, next_: Handler) -> Any:
        ctx.job = self._live(ctx.job.jid)
        return next_(ctx)

    def resume_on_failure(self, ctx: Context, next_: Handler) -> Any:
        """Whatever fails below, the job goes on as it was."""
        job: Job = ctx.job
        try:
            return next_(ctx)
        except BaseException as exc:
            if job.state is JobState.running:
                try:
                    self.resume_stopped(job)
                except CedanaError as resume_error:
                    exc.add_note(f"while resuming the job: {resume_error}")
            for undo in ctx.state.rollback:  # e.g. give a CUDA job its GPU back
                try:
                    undo()
                except CedanaError as undo_error:
                    exc.add_note(f"while resuming the job: {undo_error}")
            self.registry.update_job(job.jid, details=recovery.CLEARED)
            raise

    def resume_stopped(self, job: Job) -> None:
        """Let a running job that a dump stopped go on: its type's ``cedana_resume`` (a VM's
        QMP ``cont``), else SIGCONT to the tree CRIU left stopped."""
        if self.pm.implements(job.type, "cedana_resume"):
            self.pm.call_for(job.type, "cedana_resume", job=job)
        elif job.pid is not None:
            signal_tree(job.pid, signal.SIGCONT)

    def finish_dump(self, ctx: Context, next_: Handler) -> DumpResult:
        """Stop the job once its checkpoint is stored; resume it if anything failed."""
        job: Job = ctx.job
        result: DumpResult = self.resume_on_failure(ctx, next_)
        failpoint.reached("dump:committed")
        self.records.dumped(result.info(), checkpointed=not ctx.request.leave_running)
        try:
            if not ctx.request.leave_running:
                self.stop(job)
                self._wait_stopped(job)
        finally:
            self.registry.update_job(job.jid, details=recovery.CLEARED)  # only now: see cedana_ray.recovery
        return result

    def _wait_stopped(self, job: Job) -> None:
        """Return once the dumped job, sent its kill signal, is gone as its runtime reports it.
        A killed process takes a moment to exit and be reaped, and containerd one more to
        notice: a dump that returned at once left its container reported running (issue 16)."""
        if not until(lambda: self._stopped(job), STOP_TIMEOUT_S, STOP_POLL_S):
            raise StateError(f"job {job.jid} is checkpointed but still runs {STOP_TIMEOUT_S:.0f} s after being killed")

    def _stopped(self, job: Job) -> bool:
        """The type's own answer (``cedana_stopped``), else whether the job's process is dead."""
        stopped = self.pm.call_for(job.type, "cedana_stopped", job=job)
        return not alive(job.pid, job.details.get("started")) if stopped is None else stopped

    def commit(self, ctx: Context, next_: Handler) -> DumpResult:
        """Dump into a fresh image dir, then store it and write the manifest."""
        req: DumpRequest = ctx.request
        job: Job = ctx.job
        store = self.store(req.storage or job.details.get("storage") or self.paths.storage)
        ckpt = checkpoint_name(job.jid)
        work = staging_area(self.paths.staging, tree_rss(job.pid))
        self.registry.update_job(job.jid, details=recovery.mark(ckpt, store.url))
        images = store.dump_dir(ckpt, req.compression, work, encrypted=req.encrypt)
        ctx.state.images, ctx.state.work = images, work
        try:
            early = store.early_chunks(  # a VM's state is read by the store alone: see cedana_dump_vm_handler
                images,
                ckpt,
                req.compression,
                req.encryption_key(),
                req.streams,
                parent=job.last_checkpoint,
                release=ctx.state.vm,
                write_back=not req.leave_running,
            )
            with early as prehashed:
                ctx.state.staged_max = STAGED_VM_STATE_MAX if _releases(prehashed) else None
                next_(ctx)
            ctx.report("store")
            manifest = store.commit(
                images,
                self._manifest_fields(ctx, ckpt),
                compression=req.compression,
                streams=req.streams,
                progress=ctx.progress,
                prehashed=prehashed,
                key=req.encryption_key(),
            )
        except BaseException:
            store.discard(ckpt)
            raise
        finally:
            remove_tree(work)  # CRIU's logs, and the images when they were staged
        return dumped(store, manifest)

    def _manifest_fields(self, ctx: Context, ckpt: str) -> dict[str, Any]:
        """The fields of the manifest of ``ckpt`` that do not depend on its storage (MANIFEST_FIELDS)."""
        job: Job = ctx.job
        return {
            "checkpoint": ckpt,
            "jid": job.jid,
            "type": job.type,
            "node": job.node,
            "created": utcnow(),
            "criu_version": "" if ctx.state.vm else criu.version(),
            "criu": ctx.request.criu,
            "parent": job.last_checkpoint,
            "details": {**ctx.state.details, "command": job.command},
            "metadata": ctx.request.metadata,
        }

    def criu_dump(self, ctx: Context) -> None:
        criu.dump(
            ctx.state.pid,
            ctx.state.images,
            ctx.state.work,
            ctx.request.criu,
            leave_running=ctx.request.leave_running,
            enter=ctx.state.enter,
            hold=ctx.state.lock,
        )

    def dump(self, jid: str, request: DumpRequest, progress: Progress | None = None) -> DumpResult:
        """Checkpoint job ``jid`` into the store."""
        job = self.job(jid)
        request = self._with_job_key(jid, request)
        ctx = Context(request, DumpState(jid), job=job, progress=progress)
        pipeline = self._dump_pipeline(ctx, [self.locked, self.require_live, self.finish_dump, self.commit])
        start = time.perf_counter()
        with self.records.noting_failure(jid, "dump"):
            result: DumpResult = pipeline(ctx)
        result = result.model_copy(update={"duration_s": round(time.perf_counter() - start, 6), "timings": ctx.timings})
        self.records.checkpointed(result, self.node)
        return result

    def _with_job_key(self, jid: str, request: DumpRequest) -> DumpRequest:
        """An encrypted job's dumps are encrypted, however they were asked for."""
        if not request.encrypt and (key := self.key_of(jid)):
            return request.model_copy(update={"encrypt": True, "key": SecretBytes(key)})
        return request

    def _dump_pipeline(self, ctx: Context, core: list[Any]) -> Pipeline:
        """The ``core`` middleware, then the job type's; the VM pipeline for a virtual machine's."""
        jtype = ctx.job.type
        if vm := self.pm.call_for(jtype, "cedana_dump_vm_handler"):  # a VM: no CRIU, no GPU
            ctx.state.vm = True
            return Pipeline(vm).with_(*core, *self._middleware(jtype, "cedana_dump_vm_middleware"))
        criu.version()
        handler = self.pm.call_for(jtype, "cedana_dump_handler") or self.criu_dump
        middleware = self._middleware(jtype, "cedana_dump_middleware", "cedana_gpu_interception")
        return Pipeline(handler).with_(*core, *middleware)


def _releases(early: object) -> bool:
    """Whether ``early`` frees the staged bytes it stored (a VM's state, cut into content chunks)."""
    from .chunk_store import ContentChunks  # loaded with the store already

    return isinstance(early, ContentChunks) and early.release
