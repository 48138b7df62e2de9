"""A node's side of a direct migration, the images carried by :mod:`cedana_ray.handoff`:

* the source, :meth:`Handover.hand_off`:
  locked > require_live > resume_on_failure > sending > <plugin> > <gpu> > criu_dump | <plugin handler>
* the target, :meth:`Handover.restore_received`: the restore chain with ``received`` in place
  of ``fetch``; then, once the job runs again, :meth:`Handover.store_received` keeps what
  arrived as the job's checkpoint (or :meth:`Handover.forget_received` drops it).

A mixin of the engine: it uses the engine's dump and restore chains, registry and stores.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .chunking import DEFAULT_CHUNK
from .dumping import MANIFEST_FIELDS, checkpoint_name, dumped
from .errors import UsageError
from .handoff import Sender
from .models import Compression, DumpResult, Job, Manifest, RestoreResult
from .pipeline import Context, DumpState, Handler
from .proctree import tree_rss
from .requests import DumpRequest, RestoreRequest
from .staging import remove_tree, staging_area
from .store import split_url

if TYPE_CHECKING:
    from .backend import Progress


class Handover:
    """Migration straight from node to node: what the source and the target each do."""

    def handoff_bytes(self, jid: str) -> int:
        """About how many bytes of images a handoff of job ``jid`` sends: its memory."""
        return tree_rss(self._live(jid).pid)

    def hand_off(
        self, jid: str, request: DumpRequest, address: tuple[str, int], key: bytes, progress: Progress | None = None
    ) -> Manifest:
        """Dump job ``jid``, leaving it as it is (a migration froze it), and send the images to
        the receiver at ``address``. Returns the manifest of what was sent, without files:
        the target keeps it as a checkpoint once the job runs there."""
        request = request.model_copy(update={"leave_running": True})
        ctx = Context(request, DumpState(jid), job=self.job(jid), progress=progress)

        def send(ctx: Context, next_: Handler) -> Manifest:  # the stage's name
            return self._sending(address, key, ctx, next_)

        return self._dump_pipeline(ctx, [self.locked, self.require_live, self.resume_on_failure, send])(ctx)

    def _sending(self, address: tuple[str, int], key: bytes, ctx: Context, next_: Handler) -> Manifest:
        job: Job = ctx.job
        work = staging_area(self.paths.staging, tree_rss(job.pid))
        ctx.state.images, ctx.state.work = work / "images", work
        ctx.state.images.mkdir(mode=0o700)
        try:
            with Sender.connect(ctx.state.images, address, key, ctx.progress) as sender:
                next_(ctx)
            sender.finish()
            fields = self._manifest_fields(ctx, checkpoint_name(job.jid))
            return Manifest(**fields, compression=Compression.none, chunk_size=DEFAULT_CHUNK, files=())
        finally:
            remove_tree(work)

    def restore_received(
        self, request: RestoreRequest, images: Path, progress: Progress | None = None
    ) -> RestoreResult:
        """Restore the images that arrived in ``images``, as ``request.manifest`` (the source's,
        handed down by the coordinator) describes them; ``request.path`` is where they will
        be stored."""
        manifest = request.manifest
        if manifest is None or manifest.files or not request.path:
            raise UsageError("a handoff restore takes the manifest of what was sent, and its checkpoint's URL")
        store = self.store(split_url(request.path)[0])
        return self._restore(manifest, store, request, _received(images), request.jid, progress=progress)

    def store_received(self, images: Path, manifest: Manifest, request: DumpRequest) -> DumpResult:
        """Keep the images that arrived, from which job ``manifest.jid`` now runs here, as its
        checkpoint ``manifest.checkpoint``."""
        request = self._with_job_key(manifest.jid, request)
        store = self.store(request.storage or self.paths.storage)
        fields = manifest.model_dump(include=set(MANIFEST_FIELDS))
        start = time.perf_counter()
        saved = store.commit(
            images, fields, compression=request.compression, streams=request.streams, key=request.encryption_key()
        )
        result = dumped(store, saved).model_copy(update={"duration_s": round(time.perf_counter() - start, 6)})
        self.records.dumped(result.info())
        self.records.checkpointed(result, self.node)
        return result

    def forget_received(self, manifest: Manifest) -> None:
        """What arrived is no checkpoint: the job's last one stays its last."""
        self.registry.update_job(manifest.jid, last_checkpoint=manifest.parent)


def _received(images: Path) -> Callable[[Context, Handler], Any]:
    def received(ctx: Context, next_: Handler) -> Job:
        """Lay out the images that arrived, checked on their way (cedana_ray.handoff)."""
        ctx.state.images = images
        ctx.state.work = images.parent / "work"
        ctx.state.work.mkdir(mode=0o700, exist_ok=True)
        return next_(ctx)

    return received
