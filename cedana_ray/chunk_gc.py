"""Freeing content-addressed chunks that no checkpoint uses: mark and sweep, safe to race.

Deleting a checkpoint removes its manifest only; its chunks may be other checkpoints' too.
A sweep then frees the chunks that no manifest in the store lists. Two records keep it
from freeing what a dump is about to reference:

- ``URL/.pending/<ID>``: written by a dump before it reads which chunks it may reuse,
  removed once its manifest is written (or by ``discard`` when it fails, by recovery when
  its process died).
- ``URL/.sweeps/<token>``: held by a sweep from before it looks at pending records until
  it has deleted its last chunk.

A sweep gives up, deleting nothing, if a live pending record exists before it marks or
after (so a dump that started meanwhile is seen); a dump that finds a live sweep record
waits for it to end before it reads what to reuse. So no dump runs between a sweep's
marking and its deletions: every chunk a dump references was listed by a manifest the
sweep read, or was written by that dump after the sweep ended. A chunk younger than the
grace period (``CEDANA_RAY_CHUNK_GRACE_S``, 60 s) is never freed either: a second line of
defence for stores whose listings lag behind their writes. A crash leaves at worst chunks
that nothing lists, freed by a later sweep, never a manifest naming a missing chunk.
Listings must be consistent (S3, GCS and the local and ``cedana://`` stores are).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .chunk_store import CHUNKS, chunk_name
from .models import Digest, Layout
from .retry import ATTEMPTS, retrying

if TYPE_CHECKING:
    from .store import CheckpointStore

PENDING = ".pending"
SWEEPS = ".sweeps"
GRACE_ENV = "CEDANA_RAY_CHUNK_GRACE_S"
GRACE_S = 60.0
SWEEP_EVERY_ENV = "CEDANA_RAY_SWEEP_EVERY_S"
SWEEP_EVERY_S = 300.0  # a delete sweeps at most this often per store and process: a sweep reads every manifest
PENDING_STALE_S = 6 * 3600.0  # older: a dump that died where recovery never ran (its node gone)
SWEEP_STALE_S = 600.0  # older: a sweep that died; a live one stops deleting at half this
SWEEP_WAIT_POLL_S = 0.2
DELETE_BATCH = 500
log = logging.getLogger("cedana_ray.chunk_gc")


def grace_s() -> float:
    return float(os.environ.get(GRACE_ENV, GRACE_S))


_swept_at: dict[str, float] = {}  # store URL -> when this process last swept it after a delete


def sweep_due(url: str) -> bool:
    """Whether a delete in ``url`` should sweep now (and counts as its sweep): keep-K deletes
    one checkpoint per policy dump, and a sweep per delete would read every manifest each time."""
    now, every = time.monotonic(), float(os.environ.get(SWEEP_EVERY_ENV, SWEEP_EVERY_S))
    if now - _swept_at.get(url, -math.inf) < every:
        return False
    _swept_at[url] = now
    return True


class ChunkSweeper:
    """Pending and sweep records, and the sweep (mixed into CheckpointStore)."""

    def begin_dump(self: CheckpointStore, ckpt: str) -> None:
        self._put_record(PENDING, ckpt)

    def end_dump(self: CheckpointStore, ckpt: str, attempts: int = ATTEMPTS) -> None:
        with contextlib.suppress(FileNotFoundError):
            path = f"{self.root}/{PENDING}/{ckpt}"
            retrying(lambda: self.fs.rm(path), attempts)

    def wait_for_sweeps(self: CheckpointStore) -> None:
        """Return once no live sweep holds this store (a sweep stops within SWEEP_STALE_S/2)."""
        while self._live_records(SWEEPS, SWEEP_STALE_S):
            time.sleep(SWEEP_WAIT_POLL_S)

    def sweep(self: CheckpointStore, grace: float | None = None) -> int:
        """Free the chunks no manifest here lists, older than ``grace`` seconds; how many.

        Frees nothing while a dump into this store is under way (see the module docstring).
        """
        grace = grace_s() if grace is None else grace
        with self._errors("sweeping the chunks of"):
            if not self._chunk_objects():
                return 0
            token = secrets.token_hex(8)
            self._put_record(SWEEPS, token)
            try:
                return self._sweep(grace, time.time())
            finally:
                with contextlib.suppress(FileNotFoundError):
                    retrying(lambda: self.fs.rm(f"{self.root}/{SWEEPS}/{token}"))

    def _sweep(self: CheckpointStore, grace: float, started: float) -> int:
        if self._live_records(PENDING, PENDING_STALE_S):
            return 0
        chunks = self._chunk_objects()
        manifests = [m for m in self.manifests_here(trusted=False) if m.layout is Layout.cas]
        used = {chunk_name(c.digest, m.digest) for m in manifests for f in m.files for c in f.chunks}
        if self._live_records(PENDING, PENDING_STALE_S):  # a dump began while we marked
            return 0
        now = time.time()
        doomed = [name for name, at in chunks.items() if name not in used and (at is None or now - at >= grace)]
        freed = 0
        for i in range(0, len(doomed), DELETE_BATCH):
            if time.time() - started > SWEEP_STALE_S / 2:  # dumps stop waiting for us soon
                log.warning("sweep of %s stopped after %d chunks: it ran too long", self.url, freed)
                break
            self._delete([f"{self.root}/{CHUNKS}/{name}" for name in doomed[i : i + DELETE_BATCH]])
            freed += len(doomed[i : i + DELETE_BATCH])
        self.fs.invalidate_cache(f"{self.root}/{CHUNKS}")
        return freed

    def _delete(self: CheckpointStore, paths: list[str]) -> None:
        if self.fs.async_impl:  # S3, GCS: one request per batch
            retrying(lambda: self.fs.rm(paths))
            return
        for path in paths:
            with contextlib.suppress(FileNotFoundError):
                retrying(lambda path=path: self.fs.rm(path))

    def _chunk_objects(self: CheckpointStore) -> dict[str, float | None]:
        """Chunk object name under ``.chunks`` (see ``chunk_name``) -> its age's start (Unix
        time; None where the store keeps none); every digest's folder."""
        found: dict[str, float | None] = {}
        for folder in (chunk_name("", algorithm) for algorithm in Digest):
            try:
                path = f"{self.root}/{CHUNKS}/{folder}".rstrip("/")
                entries = retrying(lambda path=path: self.fs.ls(path, detail=True, refresh=True))
            except FileNotFoundError:
                continue
            for e in entries:
                if e.get("type") != "directory":
                    found[folder + e["name"].rstrip("/").rsplit("/", 1)[-1]] = _mtime(e)
        return found

    def _put_record(self: CheckpointStore, folder: str, name: str) -> None:
        data = json.dumps({"at": time.time()}).encode()
        path = f"{self.root}/{folder}/{name}"
        if self.local:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        retrying(lambda: self.fs.pipe_file(path, data))

    def _live_records(self: CheckpointStore, folder: str, stale_s: float) -> list[str]:
        """The records in ``folder`` younger than ``stale_s``; older ones are removed."""
        try:
            entries = retrying(lambda: self.fs.ls(f"{self.root}/{folder}", detail=False, refresh=True))
        except FileNotFoundError:
            return []
        live = []
        for entry in entries:
            try:
                at = float(json.loads(retrying(lambda entry=entry: self.fs.cat_file(entry)))["at"])
            except FileNotFoundError:
                continue  # ended meanwhile
            except (ValueError, KeyError, TypeError):
                at = 0.0  # not ours, or torn: stale
            if time.time() - at < stale_s:
                live.append(entry)
            else:
                with contextlib.suppress(FileNotFoundError):
                    retrying(lambda entry=entry: self.fs.rm(entry))
        return live


def _mtime(entry: dict[str, Any]) -> float | None:
    """When a listed object was written, as fsspec's backends each name it."""
    value = entry.get("mtime") or entry.get("LastModified") or entry.get("updated")
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        return None
    return float(value) if value is not None else None
