"""The restore chain of :class:`cedana_ray.engine.Engine`:

    locked > replace_dead > fetch > <plugin> > <gpu> > <plugin late> > <plugin handler>

A mixin of the engine: it uses the engine's registry, plugins, stores and locks.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from pydantic import SecretBytes

from . import criu
from .crypto import KEY_FILE, cipher_for, save_key, saved_key
from .errors import UsageError
from .models import Job, Manifest, RestoreResult
from .pipeline import Context, Handler, Middleware, Pipeline, RestoreState
from .proctree import signal_tree
from .records import replaceable
from .requests import RestoreRequest
from .staging import remove_tree, staging_area
from .store import CheckpointStore, split_url

if TYPE_CHECKING:
    from .backend import Progress


def _beside_criu(streams: int) -> int:
    """Hashing threads that leave CRIU a core while it restores (it is the slower of the two)."""
    return max(1, min(streams, (os.cpu_count() or 1) - 1))


class RestoreChain:
    """Restoring a checkpoint: :meth:`restore` and its core middleware."""

    def fetch(self, ctx: Context, next_: Handler) -> Job:
        """Verify and lay out the checkpoint's images locally for the handler.

        Images CRIU can read where they are stored are verified while CRIU restores
        them into a stopped tree, which resumes only once every chunk checked out (it
        is killed otherwise): an unverified image never runs. GPU jobs, whose restore
        needs the tree running, are verified first, as are a VM's images in place (its
        handler resumes the guest itself).
        """
        store: CheckpointStore = ctx.state.store
        manifest: Manifest = ctx.state.manifest
        tmp = staging_area(self.paths.staging, manifest.image_bytes)
        (tmp / "work").mkdir()
        ctx.state.work = tmp / "work"
        try:
            if not store.readable_in_place(manifest) or manifest.details.get("gpu"):
                _, ctx.state.images = store.fetch(
                    manifest.checkpoint,
                    tmp / "images",
                    ctx.request.streams,
                    ctx.progress,
                    ctx.request.decryption_key(),
                    manifest=manifest,
                )
                return next_(ctx)
            ctx.state.images = store.link(manifest, tmp / "images")
            if ctx.state.vm:
                store.verify(manifest, ctx.request.streams, ctx.progress)
                return next_(ctx)
            ctx.state.leave_stopped = True
            with ThreadPoolExecutor(1) as verifier:
                verified = verifier.submit(store.verify, manifest, _beside_criu(ctx.request.streams))
                job: Job = next_(ctx)
                try:
                    verified.result()
                except BaseException:
                    signal_tree(job.pid, signal.SIGKILL)
                    raise
            if not manifest.details.get("frozen"):
                signal_tree(job.pid, signal.SIGCONT)
            return job
        finally:
            remove_tree(tmp)

    def restore(
        self,
        request: RestoreRequest,
        jid: str | None = None,
        jtype: str | None = None,
        progress: Progress | None = None,
        node: str | None = None,
    ) -> RestoreResult:
        """Restore a checkpoint: the last (or a given) one of job ``jid``, or ``request.path``.

        The restored job keeps the job's id unless ``request.jid`` names a new one (a
        clone); a live job is never replaced.
        """
        self._here(node)
        root, ckpt = split_url(self.records.locate(jid, request))
        store = self.store(root)
        manifest = self._manifest(store, ckpt, request.manifest)
        if request.key is None and (key := self.key_of(manifest.jid)):
            request = request.model_copy(update={"key": SecretBytes(key)})
        cipher_for(manifest, request.decryption_key())  # a wrong, missing or refused key fails here, not mid-restore
        return self._restore(manifest, store, request, self.fetch, jid, jtype, progress)

    def _restore(
        self,
        manifest: Manifest,
        store: CheckpointStore,
        request: RestoreRequest,
        fetch: Middleware,
        jid: str | None = None,
        jtype: str | None = None,
        progress: Progress | None = None,
    ) -> RestoreResult:
        """Restore ``manifest``'s checkpoint, its images laid out by ``fetch``."""
        ckpt = manifest.checkpoint
        vm = self.pm.call_for(manifest.type, "cedana_restore_vm_handler")  # a VM: no CRIU, no GPU
        if vm is None:
            criu.version()
        if jtype and manifest.type != jtype:
            raise UsageError(f"checkpoint {ckpt} is of a {manifest.type} job, not {jtype}")
        if request.gpu_map and not manifest.details.get("gpu"):
            raise UsageError(f"--gpu-map: checkpoint {ckpt} holds no GPU state")
        target = request.jid or jid or manifest.jid
        job_dir = self.paths.job_dir(target)
        job_dir.mkdir(parents=True, exist_ok=True)
        chain = [self.locked, self.replace_dead, fetch]
        if vm is not None:
            handler = vm
            chain += self._middleware(manifest.type, "cedana_restore_vm_middleware")
        else:
            handler = self._handler(manifest.type, "cedana_restore_handler", "restore")
            chain += self._middleware(
                manifest.type,
                "cedana_restore_middleware",
                "cedana_gpu_interception_restore",
                "cedana_gpu_tracing_restore",
                "cedana_restore_middleware_late",
            )
        state = RestoreState(
            jid=target,
            job_dir=job_dir,
            manifest=manifest,
            store=store,
            control=self._control(target),
            command=manifest.details.get("command", []),
            vm=vm is not None,
        )
        ctx = Context(request, state, progress=progress)
        start = time.perf_counter()
        with self.records.noting_failure(target, "restore"):
            job: Job = Pipeline(handler).with_(*chain)(ctx)
        if manifest.encryption and not saved_key(job_dir / KEY_FILE) and request.decryption_key() != self.key:
            save_key(job_dir / KEY_FILE, request.decryption_key())  # an encrypted job stays encrypted
        duration = round(time.perf_counter() - start, 6)
        return RestoreResult(job=job, checkpoint=ckpt, duration_s=duration, timings=ctx.timings)

    def _manifest(self, store: CheckpointStore, ckpt: str, given: Manifest | None) -> Manifest:
        """The manifest of ``ckpt``: the one the coordinator read and handed down, once it
        verifies (no I/O), else read from the store: a restore reads it once."""
        if given is None:
            return store.manifest(ckpt)
        if given.checkpoint != ckpt:
            raise UsageError(f"the manifest given is of checkpoint {given.checkpoint}, not {ckpt}")
        return self.signer.verify(given)

    def replace_dead(self, ctx: Context, next_: Handler) -> Job:
        """Restore over a job only if it is not live, and record the restored job, both under
        the job's lock: of two restores of one job, exactly one runs it."""
        existing = replaceable(self._existing(ctx.state.jid))  # seen now: a job that died is not live
        return self.records.restored(existing, next_(ctx), ctx.state.manifest.checkpoint, self.node)
