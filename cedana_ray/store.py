"""Checkpoint store over fsspec: images as checksummed chunks plus a manifest.

Layout of checkpoint ``ID`` under a store URL::

    URL/ID/manifest.json            written last; without it there is no checkpoint
    URL/.chunks/blake3/<digest>     content-addressed chunks, shared (Layout.cas, the default)
    URL/ID/data/<image file><ext>   or: chunks of ID alone, each an independent compressed frame

The content-addressed layout (:mod:`cedana_ray.chunk_store`, :mod:`cedana_ray.chunk_gc`)
stores a chunk once per store; the per-checkpoint layouts below stay readable and are
still written for local uncompressed dumps (and with ``CEDANA_RAY_DEDUP=0``).

On object stores (``s3://``, ``gs://``) each chunk is its own object,
``URL/ID/data/<image file><ext>/<index>``, so chunks are uploaded and fetched in
parallel and a failed request is retried alone (see :mod:`cedana_ray.retry`).
Chunks may be encrypted (:mod:`cedana_ray.crypto`); their digest (BLAKE3; sha256 in
checkpoints made before it, still read) is of the stored bytes, so integrity is checked
without the key. The manifest is signed (:mod:`cedana_ray.signing`)
and every field of it is checked before use: a store is untrusted, and what a manifest
names is only ever created inside the directory it is restored into.

On a local store every file and directory of a checkpoint is fsynced before its
manifest is written, and the manifest before the dump reports success.

With ``--compression none`` on a local store CRIU dumps straight into
``URL/ID/data`` and the chunks are only hashed in place, so a local uncompressed
checkpoint costs CRIU's own write plus one read.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from pydantic import ValidationError

from .chunk_gc import ChunkSweeper, sweep_due
from .chunk_store import ContentStore
from .chunking import DIGEST
from .errors import (
    CedanaError,
    CheckpointError,
    CheckpointNotFound,
    StorageError,
    UntrustedCheckpoint,
    UsageError,
)
from .extras import missing_in
from .models import Digest, Manifest, check_name, untrusted
from .retry import ATTEMPTS, describe, is_storage_error, retrying
from .signing import Signer
from .store_read import StoreReader
from .store_write import DEFAULT_STREAMS as DEFAULT_STREAMS
from .store_write import MANIFEST as MANIFEST
from .store_write import StoreWriter
from .store_write import fsync_dir as fsync_dir

# bytes: a larger manifest is refused unparsed (read whole: SeaweedFS refuses a range past the end)
MAX_MANIFEST = 64 << 20
log = logging.getLogger("cedana_ray.store")


def register_schemes(schemes: dict[str, Any]) -> None:
    """Make plugin-provided filesystems known to fsspec (refusing silent overrides).

    A plugin may specialise the class fsspec would use (a subclass of it, as
    ``storage/s3`` does with s3fs), never replace it with an unrelated one. A class
    given as an import path (``"pkg.module.Class"``) is imported on first use; it
    replaces fsspec's default for the scheme unless a class is already in use.
    """
    import fsspec  # here, as in the store: commands that open no store do not pay its import

    for scheme, cls in schemes.items():
        if isinstance(cls, str):
            if scheme not in fsspec.registry:  # the classes imported or registered so far
                fsspec.register_implementation(scheme, cls, clobber=True)
            continue
        try:
            current = fsspec.get_filesystem_class(scheme)
        except (ValueError, ImportError):
            current = None
        if current is None or (current is not cls and issubclass(cls, current)):
            fsspec.register_implementation(scheme, cls, clobber=True)


def split_url(url: str) -> tuple[str, str]:
    """A checkpoint URL as (store URL, checkpoint id)."""
    url = url.rstrip("/")
    root, _, ckpt = url.rpartition("/")
    if not root or not ckpt:
        raise StorageError(f"not a checkpoint URL: {url!r}")
    return root, ckpt


class CheckpointStore(StoreWriter, StoreReader, ContentStore, ChunkSweeper):
    """The checkpoints under one store URL (``file://``, ``s3://``, ...).

    ``signer`` signs the manifests this store writes and verifies those it reads;
    without one the store holds no checkpoint for us: it can only be removed from.
    ``digest`` hashes the chunks of the checkpoints it writes (any is read).
    """

    def __init__(self, url: str, signer: Signer | None = None, digest: Digest = DIGEST) -> None:
        import fsspec  # here: commands that open no store (ps, logs, kill...) do not pay its import
        from fsspec.implementations.local import LocalFileSystem

        from .plugins_manager import register_storage  # here: the plugins import this module

        register_storage()
        self.url = url.rstrip("/")
        self.signer = signer
        self.digest = digest
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except (ValueError, ImportError) as exc:
            if missing := missing_in(exc):  # a plugin's backend whose extra is not installed
                raise StorageError(str(missing)) from exc
            raise StorageError(
                f"cannot open checkpoint store {url!r}: {exc}",
                hint=f"known schemes: {', '.join(sorted(fsspec.available_protocols()))}",
            ) from exc
        self.local = isinstance(self.fs, LocalFileSystem)
        self.bucket = "" if self.local else self.root.split("/", 1)[0]

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Backend errors as one :class:`StorageError` line naming the store, never credentials."""
        try:
            yield
        except CedanaError:
            raise
        except Exception as exc:
            if not is_storage_error(exc):
                raise
            raise StorageError(f"{action} {self.url} failed: {describe(exc, self.bucket or self.root)}") from exc

    def path(self, ckpt: str) -> str:
        return f"{self.root}/{check_name(ckpt, 'checkpoint id')}"

    def url_of(self, ckpt: str) -> str:
        return f"{self.url}/{ckpt}"

    def _signer(self) -> Signer:
        if self.signer is None:
            raise UntrustedCheckpoint(f"no signing key for the checkpoints of {self.url}")
        return self.signer

    def manifest(self, ckpt: str, *, verify: bool = True) -> Manifest:
        """The manifest of ``ckpt``, every field checked and (unless ``verify`` is False,
        for an import) its signature verified."""
        with self._errors(f"reading checkpoint {ckpt} from"):
            try:
                raw = retrying(lambda: self.fs.cat_file(f"{self.path(ckpt)}/{MANIFEST}"))
            except (FileNotFoundError, NotADirectoryError) as exc:  # NotADirectory: a stray file
                self._require_bucket(exc)
                raise CheckpointNotFound(f"no checkpoint {ckpt!r} in {self.url}") from exc
        if len(raw) > MAX_MANIFEST:
            raise UntrustedCheckpoint(f"checkpoint {ckpt}: its manifest is larger than {MAX_MANIFEST >> 20} MiB")
        manifest = parse_manifest(raw, ckpt)
        return self._signer().verify(manifest) if verify else manifest

    def _require_bucket(self, exc: BaseException) -> None:
        """Raise a clear :class:`StorageError` when ``exc`` came from a missing bucket."""
        if self.local:
            return
        with self._errors("opening"):
            exists = retrying(lambda: self.fs.exists(self.bucket))
        if not exists:
            raise StorageError(f"opening {self.url} failed: bucket {self.bucket!r} does not exist") from exc

    def list(self) -> list[Manifest]:
        """The checkpoints here that verify, oldest first; anything else in the store is ignored."""
        self._signer()
        with self._errors("listing"):
            try:
                entries = retrying(lambda: self.fs.ls(self.root, detail=False, refresh=True))
            except FileNotFoundError as exc:  # nothing stored yet, or no bucket
                self._require_bucket(exc)
                return []
        found = []
        for entry in entries:
            try:
                found.append(self.manifest(entry.rstrip("/").rsplit("/", 1)[-1]))
            except (CheckpointNotFound, CheckpointError, UsageError):
                continue  # not a checkpoint of ours: no manifest, a stray file, an untrusted manifest
        return sorted(found, key=lambda m: m.created)

    def delete(self, ckpt: str) -> None:
        """Remove ``ckpt``, trusted or not (a tampered checkpoint of ours goes too), then
        free the chunks that no other checkpoint uses (see :mod:`cedana_ray.chunk_gc`)."""
        with self._errors(f"deleting checkpoint {ckpt} from"):
            if not retrying(lambda: self.fs.exists(f"{self.path(ckpt)}/{MANIFEST}")):
                raise CheckpointNotFound(f"no checkpoint {ckpt!r} in {self.url}")
            self._remove(ckpt)
        if not sweep_due(self.url):
            return
        try:
            self.sweep()
        except StorageError as exc:  # the checkpoint is gone; its chunks go at a later sweep
            log.warning("checkpoint %s deleted, its chunks not yet: %s", ckpt, exc)

    def discard(self, ckpt: str) -> bool:
        """Remove whatever exists of ``ckpt``, as far as the store lets us; whether all went.

        Called on failed dumps, maybe because the store is unreachable: what cannot be
        removed then has no manifest, so it never lists as a checkpoint.
        """
        try:
            self._remove(ckpt, attempts=1)  # after a failure, often of the store itself: don't wait on it
            self.end_dump(ckpt, attempts=1)  # its new chunks, if any, go at the next sweep
        except Exception as exc:
            if not is_storage_error(exc):
                raise
            return False
        return True

    def _remove(self, ckpt: str, attempts: int = ATTEMPTS) -> None:
        """Remove ``ckpt``, manifest first so it stops listing."""
        path = self.path(ckpt)
        for target in (f"{path}/{MANIFEST}", path):
            with contextlib.suppress(FileNotFoundError):
                retrying(lambda target=target: self.fs.rm(target, recursive=target == path), attempts)


def parse_manifest(raw: bytes, ckpt: str) -> Manifest:
    """A manifest from untrusted bytes: every field checked, or :class:`UntrustedCheckpoint`."""
    try:
        manifest = Manifest.model_validate_json(raw)
    except (ValidationError, UsageError) as exc:
        raise untrusted(f"checkpoint {ckpt}: invalid manifest", exc) from exc
    if manifest.checkpoint != ckpt:
        raise UntrustedCheckpoint(f"checkpoint {ckpt}: its manifest names another checkpoint, {manifest.checkpoint}")
    return manifest
