"""Checkpoint store over fsspec: images as checksummed chunks plus a manifest.

Layout of checkpoint ``ID`` under a store URL::

    URL/ID/data/<image file><ext>   chunks, each an independent compressed frame
    URL/ID/manifest.json            written last; without it there is no checkpoint

On object stores (``s3://``, ``gs://``) each chunk is its own object,
``URL/ID/data/<image file><ext>/<index>``, so chunks are uploaded and fetched in
parallel and a failed request is retried alone (see :mod:`cedana_ray.retry`).
Chunks may be encrypted (:mod:`cedana_ray.crypto`); sha256 is of the stored bytes,
so integrity is checked without the key. The manifest is signed (:mod:`cedana_ray.signing`)
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
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
from pydantic import ValidationError

from . import failpoint
from .chunking import DEFAULT_CHUNK, ChunkFn, EarlyChunks, bounded_map, chunk_in_place, sha256
from .codec import EXTENSIONS, codec
from .crypto import ALGORITHM, ChunkCipher, cipher_for, fingerprint
from .errors import (
    CedanaError,
    CheckpointError,
    CheckpointNotFound,
    CorruptCheckpoint,
    StorageError,
    UntrustedCheckpoint,
    UsageError,
)
from .models import Chunk, Compression, ImageFile, Layout, Manifest, check_name, untrusted
from .retry import ATTEMPTS, describe, is_storage_error, retrying
from .signing import Signer

MANIFEST = "manifest.json"
# bytes: a larger manifest is refused unparsed (read whole: SeaweedFS refuses a range past the end)
MAX_MANIFEST = 64 << 20
DEFAULT_STREAMS = max(2, min(8, os.cpu_count() or 2))
Progress = Callable[[str, int, int], None]
Encoder = Callable[[int, tuple[int, int]], bytes]  # (chunk index, (offset, size)) -> stored bytes


def register_schemes(schemes: dict[str, Any]) -> None:
    """Make plugin-provided filesystems known to fsspec (refusing silent overrides).

    A plugin may specialise the class fsspec would use (a subclass of it, as
    ``storage/s3`` does with s3fs), never replace it with an unrelated one. A class
    given as an import path (``"pkg.module.Class"``) is imported on first use; it
    replaces fsspec's default for the scheme unless a class is already in use.
    """
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


class CheckpointStore:
    """The checkpoints under one store URL (``file://``, ``s3://``, ...).

    ``signer`` signs the manifests this store writes and verifies those it reads;
    without one the store holds no checkpoint for us: it can only be removed from.
    """

    def __init__(self, url: str, signer: Signer | None = None) -> None:
        self.url = url.rstrip("/")
        self.signer = signer
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except (ValueError, ImportError) as exc:
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

    # -- paths
    def path(self, ckpt: str) -> str:
        return f"{self.root}/{check_name(ckpt, 'checkpoint id')}"

    def url_of(self, ckpt: str) -> str:
        return f"{self.url}/{ckpt}"

    def early_chunks(
        self,
        images: Path,
        ckpt: str,
        compression: Compression = Compression.none,
        key: bytes | None = None,
        streams: int = DEFAULT_STREAMS,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> contextlib.AbstractContextManager[EarlyChunks | None]:
        """While CRIU writes ``images``: hash the chunks of an in-place dump, or upload those
        of a dump to an object store (a no-op for a local compressed store)."""
        if self._in_place(images, ckpt):
            return EarlyChunks(images, chunk_size=chunk_size, streams=streams)
        if not self.local:
            cipher = ChunkCipher(key, ckpt) if key else None
            return EarlyChunks(images, self._uploader(ckpt, compression, cipher), chunk_size, streams)
        return contextlib.nullcontext()

    def _in_place(self, images: Path, ckpt: str) -> bool:
        """Whether ``images`` are the stored data of ``ckpt`` (local, uncompressed)."""
        return self.local and images == Path(self.path(ckpt)) / "data"

    def dump_dir(self, ckpt: str, compression: Compression, staging: Path, encrypted: bool = False) -> Path:
        """Where CRIU should write the images of ``ckpt``: in place, or in ``staging``."""
        in_place = self.local and compression is Compression.none and not encrypted
        target = Path(self.path(ckpt)) / "data" if in_place else staging / ckpt
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        target.mkdir(mode=0o700)
        return target

    # -- write
    def commit(
        self,
        images: Path,
        manifest: dict[str, Any],
        *,
        compression: Compression,
        chunk_size: int = DEFAULT_CHUNK,
        streams: int = DEFAULT_STREAMS,
        progress: Progress | None = None,
        prehashed: EarlyChunks | None = None,
        key: bytes | None = None,
    ) -> Manifest:
        """Store the image files in ``images`` and write the manifest last.

        ``manifest`` holds every manifest field but ``files``, ``compression``,
        ``chunk_size`` and the storage ones; ``prehashed`` the chunks already hashed or
        uploaded during the dump; ``key`` encrypts every chunk. On any failure nothing that
        lists as a checkpoint is left.
        """
        ckpt = manifest["checkpoint"]
        signer = self._signer()
        storage = {
            "layout": Layout.file if self.local else Layout.chunks,
            "encryption": ALGORITHM if key else None,
            "key_fingerprint": fingerprint(key) if key else None,
            "compression": compression,
            "chunk_size": chunk_size,
        }
        cipher = ChunkCipher(key, ckpt) if key else None
        try:
            with self._errors(f"storing checkpoint {ckpt} in"):
                files = self._store_files(images, ckpt, compression, chunk_size, streams, progress, prehashed, cipher)
                final = signer.sign(Manifest(**manifest, **storage, files=tuple(files)))
                self._sync(ckpt)
                self._write_manifest(ckpt, final)
            return final
        except BaseException:
            self.discard(ckpt)
            raise

    def _store_files(
        self,
        images: Path,
        ckpt: str,
        compression: Compression,
        chunk_size: int,
        streams: int,
        progress: Progress | None,
        prehashed: EarlyChunks | None,
        cipher: ChunkCipher | None,
    ) -> list[ImageFile]:
        known = prehashed.chunks if prehashed and prehashed.chunk_size == chunk_size else {}
        in_place = self._in_place(images, ckpt)
        names = sorted(p.name for p in images.iterdir() if p.is_file())
        total = sum((images / n).stat().st_size for n in names)
        done = 0
        files = []
        with ThreadPoolExecutor(streams) as pool:
            for name in names:
                if in_place:
                    image = self._hash_in_place(pool, images / name, known.get(name, []), chunk_size, streams)
                elif not self.local:
                    upload = self._uploader(ckpt, compression, cipher)
                    image = self._finish(pool, images / name, known.get(name, []), chunk_size, streams, upload)
                else:
                    image = self._write_file(pool, images / name, ckpt, compression, chunk_size, streams, cipher)
                files.append(image)
                failpoint.reached("dump:store")
                done += image.size
                if progress:
                    progress("store", done, total)
        return files

    def _chunks(self, path: Path, chunk_size: int) -> list[tuple[int, int]]:
        size = path.stat().st_size
        return [(off, min(chunk_size, size - off)) for off in range(0, size, chunk_size)] or [(0, 0)]

    def _hash_in_place(
        self, pool: ThreadPoolExecutor, path: Path, known: list[Chunk], chunk_size: int, streams: int
    ) -> ImageFile:
        """Hash the chunks of ``path`` where they lie, after the ``known`` ones."""
        rest = [span for span in self._chunks(path, chunk_size) if span[0] >= len(known) * chunk_size]
        fd = os.open(path, os.O_RDONLY)
        try:
            hashed = bounded_map(pool, lambda span: chunk_in_place(fd, *span), rest, streams * 2)
            chunks = (*known, *hashed)
            os.fsync(fd)  # what CRIU wrote is the checkpoint itself
        finally:
            os.close(fd)
        return ImageFile(name=path.name, size=path.stat().st_size, chunks=chunks)

    def _finish(
        self, pool: ThreadPoolExecutor, path: Path, known: list[Chunk], chunk_size: int, streams: int, upload: ChunkFn
    ) -> ImageFile:
        """Upload the chunks of ``path`` after the ``known`` ones (sent while CRIU wrote it)."""
        rest = [(i, off, size) for i, (off, size) in enumerate(self._chunks(path, chunk_size)) if i >= len(known)]
        sent = bounded_map(pool, lambda span: upload(path, *span), rest, streams * 2)
        return ImageFile(name=path.name, size=path.stat().st_size, chunks=(*known, *sent))

    def _uploader(self, ckpt: str, compression: Compression, cipher: ChunkCipher | None) -> ChunkFn:
        """Encode one chunk of an image file and store it as its own object."""
        encode = _encoder(compression, cipher)
        ext = EXTENSIONS[compression]
        # A backend that can send our digest along (S3's checksum header) skips hashing the
        # chunk again in its client, which does it on fsspec's one event-loop thread.
        checksum: Callable[[str], dict[str, str]] = getattr(self.fs, "put_checksum", lambda digest: {})

        def upload(path: Path, index: int, off: int, size: int) -> Chunk:
            fd = os.open(path, os.O_RDONLY)
            try:
                data = encode(path.name, index, os.pread(fd, size, off))
            finally:
                os.close(fd)
            digest = sha256(data)
            target = f"{self.path(ckpt)}/data/{path.name}{ext}/{index:06d}"
            retrying(lambda: self.fs.pipe_file(target, data, **checksum(digest)))
            return Chunk(offset=off, size=size, stored_offset=0, stored_size=len(data), sha256=digest)

        return upload

    def _write_file(
        self,
        pool: ThreadPoolExecutor,
        path: Path,
        ckpt: str,
        compression: Compression,
        chunk_size: int,
        streams: int,
        cipher: ChunkCipher | None,
    ) -> ImageFile:
        """Encode the chunks of ``path`` into one file of a local store."""
        encode = _encoder(compression, cipher)
        fd = os.open(path, os.O_RDONLY)
        target = f"{self.path(ckpt)}/data/{path.name}{EXTENSIONS[compression]}"
        try:
            spans = self._chunks(path, chunk_size)
            chunks = self._append_chunks(
                pool, target, spans, lambda i, span: encode(path.name, i, os.pread(fd, span[1], span[0])), streams
            )
        finally:
            os.close(fd)
        return ImageFile(name=path.name, size=path.stat().st_size, chunks=tuple(chunks))

    def _append_chunks(
        self, pool: ThreadPoolExecutor, target: str, spans: list[tuple[int, int]], encode: Encoder, streams: int
    ) -> list[Chunk]:
        """Encode chunks in parallel and append them, in order, to the one file ``target``."""

        def one(item: tuple[int, tuple[int, int]]) -> tuple[tuple[int, int], bytes]:
            return item[1], encode(*item)

        chunks = []
        stored = 0
        Path(target).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with open(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "wb") as out:
            for (off, size), data in bounded_map(pool, one, enumerate(spans), streams * 2):
                out.write(data)
                digest = sha256(data)
                chunks.append(Chunk(offset=off, size=size, stored_offset=stored, stored_size=len(data), sha256=digest))
                stored += len(data)
            out.flush()
            os.fsync(out.fileno())
        return chunks

    def _signer(self) -> Signer:
        if self.signer is None:
            raise UntrustedCheckpoint(f"no signing key for the checkpoints of {self.url}")
        return self.signer

    def _sync(self, ckpt: str) -> None:
        """Make the directories of a local checkpoint's data durable (object stores are)."""
        if self.local:
            for folder in (f"{self.path(ckpt)}/data", self.path(ckpt)):
                fsync_dir(folder)

    def _write_manifest(self, ckpt: str, manifest: Manifest) -> None:
        data = manifest.model_dump_json(indent=1).encode()
        final = f"{self.path(ckpt)}/{MANIFEST}"
        if self.local:  # atomic and durable: a reader, even after a crash, sees all of it or none
            tmp = f"{final}.tmp"
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            fsync_dir(self.path(ckpt))
        else:  # an object store's PUT is atomic already
            retrying(lambda: self.fs.pipe_file(final, data))

    # -- read
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

    def endorse(self, manifest: Manifest) -> Manifest:
        """Add our signature to ``manifest`` (checked by the caller) and store it."""
        signed = self._signer().sign(manifest)
        with self._errors(f"signing checkpoint {manifest.checkpoint} in"):
            self._write_manifest(manifest.checkpoint, signed)
        return signed

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

    def readable_in_place(self, manifest: Manifest) -> bool:
        """Whether CRIU can read ``manifest``'s images where they are stored."""
        return self.local and manifest.compression is Compression.none and not manifest.encryption

    def link(self, manifest: Manifest, dest: Path) -> Path:
        """Links in ``dest`` to the images of an in-place checkpoint, unverified."""
        dest.mkdir(mode=0o700, parents=True, exist_ok=True)
        data = f"{self.path(manifest.checkpoint)}/data"
        with _dir_fd(dest) as dfd:
            for image in manifest.files:
                os.symlink(f"{data}/{image.name}", image.name, dir_fd=dfd)
        return dest

    def fetch(
        self,
        ckpt: str,
        dest: Path,
        streams: int = DEFAULT_STREAMS,
        progress: Progress | None = None,
        key: bytes | None = None,
        manifest: Manifest | None = None,
    ) -> tuple[Manifest, Path]:
        """Verify every chunk of ``ckpt`` and lay its images out in ``dest``.

        Returns the manifest (``manifest``, when the caller has read it already) and the
        directory CRIU should restore from: ``dest``, holding decompressed (and decrypted,
        with ``key``) files, or links to an uncompressed local checkpoint. Raises
        :class:`CorruptCheckpoint` naming the first bad chunk, :class:`UsageError` when an
        encrypted checkpoint's key is missing or wrong.
        """
        manifest = manifest or self.manifest(ckpt)
        if self.readable_in_place(manifest):
            self.verify(manifest, streams, progress)
            return manifest, self.link(manifest, dest)
        cipher = cipher_for(manifest, key)
        dest.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._each_file(manifest, dest, streams, progress, cipher)
        return manifest, dest

    def verify(self, manifest: Manifest, streams: int = DEFAULT_STREAMS, progress: Progress | None = None) -> None:
        """Check every chunk's sha256; raises :class:`CorruptCheckpoint` naming the first bad one."""
        self._each_file(manifest, None, streams, progress, None)

    def _each_file(
        self, manifest: Manifest, dest: Path | None, streams: int, progress: Progress | None, cipher: ChunkCipher | None
    ) -> None:
        total, done = manifest.image_bytes, 0
        with self._errors(f"fetching checkpoint {manifest.checkpoint} from"), ThreadPoolExecutor(streams) as pool:
            for image in manifest.files:
                self._fetch_file(pool, manifest, image, dest, streams, cipher)
                done += image.size
                if progress:
                    progress("fetch", done, total)

    def _read_chunk(self, manifest: Manifest, image: ImageFile, index: int) -> bytes:
        """The stored bytes of chunk ``index`` of ``image``, checked against its sha256."""
        ckpt, chunk = manifest.checkpoint, image.chunks[index]
        source = f"{self.path(ckpt)}/data/{image.name}{EXTENSIONS[manifest.compression]}"
        try:
            if manifest.layout is Layout.chunks:
                data = retrying(lambda: self.fs.cat_file(f"{source}/{index:06d}"))
            else:
                end = chunk.stored_offset + chunk.stored_size
                data = retrying(lambda: self.fs.cat_file(source, chunk.stored_offset, end))
        except FileNotFoundError as exc:
            raise CorruptCheckpoint(f"checkpoint {ckpt}: chunk {index} of {image.name} is missing") from exc
        if len(data) != chunk.stored_size or sha256(data) != chunk.sha256:
            raise CorruptCheckpoint(f"checkpoint {ckpt}: chunk {index} of {image.name} is corrupted (sha256 mismatch)")
        return data

    def _fetch_file(
        self,
        pool: ThreadPoolExecutor,
        manifest: Manifest,
        image: ImageFile,
        dest: Path | None,
        streams: int,
        cipher: ChunkCipher | None,
    ) -> None:
        """Verify the chunks of ``image``; decrypt and decompress them into ``dest`` unless it is None."""
        _, decompress = codec(manifest.compression)

        def one(index: int) -> tuple[Chunk, bytes]:
            data = self._read_chunk(manifest, image, index)
            if dest is None:
                return image.chunks[index], b""
            return image.chunks[index], decompress(cipher.decrypt(data, image.name, index) if cipher else data)

        results = bounded_map(pool, one, range(len(image.chunks)), streams * 2)
        if dest is None:
            for _ in results:
                pass
            return
        with _dir_fd(dest) as dfd:
            fd = os.open(image.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dfd)
        try:
            for chunk, data in results:
                if len(data) != chunk.size:
                    raise CorruptCheckpoint(
                        f"checkpoint {manifest.checkpoint}: chunk of {image.name} has the wrong size"
                    )
                os.pwrite(fd, data, chunk.offset)
            os.ftruncate(fd, image.size)
        finally:
            os.close(fd)

    # -- delete
    def delete(self, ckpt: str) -> None:
        """Remove ``ckpt``, trusted or not (a tampered checkpoint of ours goes too)."""
        with self._errors(f"deleting checkpoint {ckpt} from"):
            if not retrying(lambda: self.fs.exists(f"{self.path(ckpt)}/{MANIFEST}")):
                raise CheckpointNotFound(f"no checkpoint {ckpt!r} in {self.url}")
            self._remove(ckpt)

    def discard(self, ckpt: str) -> bool:
        """Remove whatever exists of ``ckpt``, as far as the store lets us; whether all went.

        Called on failed dumps, maybe because the store is unreachable: what cannot be
        removed then has no manifest, so it never lists as a checkpoint.
        """
        try:
            self._remove(ckpt, attempts=1)  # after a failure, often of the store itself: don't wait on it
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


def fsync_dir(path: str | Path) -> None:
    """Make the entries of directory ``path`` (files created, renamed) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _dir_fd(path: Path) -> Iterator[int]:
    """A descriptor of directory ``path`` (not a symlink to one), to create entries relative to."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        yield fd
    finally:
        os.close(fd)


def _encoder(compression: Compression, cipher: ChunkCipher | None) -> Callable[[str, int, bytes], bytes]:
    """Chunk ``index`` of image ``name``, compressed and (with a cipher) encrypted."""
    compress, _ = codec(compression)

    def encode(name: str, index: int, raw: bytes) -> bytes:
        data = compress(raw)
        return cipher.encrypt(data, name, index) if cipher else data

    return encode
