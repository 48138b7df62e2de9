"""Writing a checkpoint: a mixin of :class:`cedana_ray.store.CheckpointStore`.

CRIU's images become chunks: content-addressed and shared by checkpoints (the default,
:mod:`cedana_ray.chunk_store`), hashed where they lie (a local uncompressed dump), encoded
into one file per image at increasing offsets (a local store), or uploaded one object
per chunk (an object store), some of them while CRIU still writes. Everything is made
durable (fsync) before the signed manifest is written, last.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import failpoint
from .chunk_store import CAS_CHUNK, ContentChunks, ContentWriter
from .chunking import DEFAULT_CHUNK, ChunkFn, EarlyChunks, bounded_map, chunk_in_place, hash_chunk, in_place_hasher
from .codec import EXTENSIONS, codec
from .crypto import ALGORITHM, ChunkCipher, fingerprint
from .models import Chunk, Compression, Digest, ImageFile, Layout, Manifest
from .retry import retrying

MANIFEST = "manifest.json"
DEFAULT_STREAMS = max(2, min(8, os.cpu_count() or 2))
Progress = Callable[[str, int, int], None]
Encoder = Callable[[int, tuple[int, int]], bytes]  # (chunk index, (offset, size)) -> stored bytes


class StoreWriter:
    """Committing images and manifests (mixed into CheckpointStore: uses its fs, paths, signer)."""

    def compression_for(self, compression: Compression | None) -> Compression:
        """``compression``, or where None this store's default: none on local disk (CRIU
        writes straight into the store and a restore reads the images where they lie: no
        codec is as fast), zstd where the bytes cross a network (fewer bytes than lz4's,
        and faster made on incompressible pages)."""
        if compression is not None:
            return compression
        return Compression.none if self.local else Compression.zstd

    def early_chunks(
        self,
        images: Path,
        ckpt: str,
        compression: Compression | None = None,
        key: bytes | None = None,
        streams: int = DEFAULT_STREAMS,
        chunk_size: int = DEFAULT_CHUNK,
        parent: str | None = None,
        release: bool = False,
        write_back: bool = False,
    ) -> contextlib.AbstractContextManager[EarlyChunks | ContentChunks | None]:
        """While CRIU writes ``images``: store the chunks of a content-addressed dump (those
        its ``parent`` checkpoint lists are reused; with ``release``, their staged bytes are
        given back once stored), hash those of an in-place dump, or upload those of a dump to
        an object store (a no-op for a local compressed store in the per-checkpoint layout).
        ``compression`` None: this store's default.

        With ``write_back``, an in-place dump's chunks start going to disk once hashed, so
        that the commit's fsync waits for the last ones only (a third of a second less per
        GiB here). The writeback takes CPU from CRIU beside it, which lengthens the freeze:
        worth it for a job that stops anyway, not for one left running."""
        compression = self.compression_for(compression)
        if self.content_addressed(compression, key is not None):
            return ContentChunks(images, ContentWriter(self, ckpt, compression, key, parent), streams, release)
        if self._in_place(images, ckpt):
            return EarlyChunks(images, in_place_hasher(self.digest, write_back), chunk_size, streams)
        if not self.local:
            cipher = ChunkCipher(key, ckpt) if key else None
            return EarlyChunks(images, self._uploader(ckpt, compression, cipher), chunk_size, streams)
        return contextlib.nullcontext()

    def _in_place(self, images: Path, ckpt: str) -> bool:
        """Whether ``images`` are the stored data of ``ckpt`` (local, uncompressed)."""
        return self.local and images == Path(self.path(ckpt)) / "data"

    def dump_dir(self, ckpt: str, compression: Compression | None, staging: Path, encrypted: bool = False) -> Path:
        """Where CRIU should write the images of ``ckpt``: in place, or in ``staging``."""
        compression = self.compression_for(compression)
        in_place = self.local and compression is Compression.none and not encrypted
        target = Path(self.path(ckpt)) / "data" if in_place else staging / ckpt
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        target.mkdir(mode=0o700)
        return target

    def commit(
        self,
        images: Path,
        manifest: dict[str, Any],
        *,
        compression: Compression | None,
        chunk_size: int = DEFAULT_CHUNK,
        streams: int = DEFAULT_STREAMS,
        progress: Progress | None = None,
        prehashed: EarlyChunks | ContentChunks | None = None,
        key: bytes | None = None,
    ) -> Manifest:
        """Store the image files in ``images`` and write the manifest last.

        ``manifest`` holds every manifest field but ``files``, ``compression``,
        ``chunk_size`` and the storage ones; ``prehashed`` the chunks already hashed or
        uploaded during the dump; ``key`` encrypts every chunk; ``compression`` None: this
        store's default. On any failure nothing that lists as a checkpoint is left.
        """
        compression = self.compression_for(compression)
        ckpt = manifest["checkpoint"]
        signer = self._signer()
        cas = self.content_addressed(compression, key is not None)
        storage = {
            "layout": Layout.cas if cas else Layout.file if self.local else Layout.chunks,
            "encryption": ALGORITHM if key else None,
            "key_fingerprint": fingerprint(key) if key else None,
            "compression": compression,
            "chunk_size": CAS_CHUNK if cas else chunk_size,
            "digest": self.digest,
        }
        try:
            with self._errors(f"storing checkpoint {ckpt} in"):
                if cas:
                    early = prehashed or ContentChunks(
                        images, ContentWriter(self, ckpt, compression, key, manifest.get("parent")), streams
                    )
                    files = self._store_content(images, ckpt, progress, early)
                else:
                    cipher = ChunkCipher(key, ckpt) if key else None
                    known = prehashed if isinstance(prehashed, EarlyChunks) else None
                    files = self._store_files(images, ckpt, compression, chunk_size, streams, progress, known, cipher)
                final = signer.sign(Manifest(**manifest, **storage, files=tuple(files)))
                self._sync(ckpt, cas)
                self._write_manifest(ckpt, final)
                if cas:
                    self.end_dump(ckpt)
            return final
        except BaseException:
            self.discard(ckpt)
            raise

    def _store_content(
        self, images: Path, ckpt: str, progress: Progress | None, early: EarlyChunks | ContentChunks
    ) -> list[ImageFile]:
        """The files of a cas dump: the chunks stored during it (``early``), then the rest."""
        assert isinstance(early, ContentChunks), "a cas dump's early chunks are content chunks"
        files = self.store_content(images, early, progress)
        if self.local:
            Path(self.path(ckpt)).mkdir(mode=0o700, exist_ok=True)  # to hold the manifest alone
        return files

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
        if any(getattr(c, self.digest.value) is None for chunks in known.values() for c in chunks):
            known = {}  # hashed otherwise than this store hashes: hash again
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
            hashed = bounded_map(pool, lambda span: chunk_in_place(fd, *span, self.digest), rest, streams * 2)
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
        # A backend that can send a checksum along (S3's checksum header) skips hashing the
        # chunk again in its client, which does it on fsspec's one event-loop thread.
        checksum: Callable[[bytes, str | None], dict[str, str]] = getattr(
            self.fs, "put_checksum", lambda data, sha256=None: {}
        )
        algorithm = self.digest

        def upload(path: Path, index: int, off: int, size: int) -> Chunk:
            fd = os.open(path, os.O_RDONLY)
            try:
                data = encode(path.name, index, os.pread(fd, size, off))
            finally:
                os.close(fd)
            digest = hash_chunk(data, algorithm)
            target = f"{self.path(ckpt)}/data/{path.name}{ext}/{index:06d}"
            sha256 = digest if algorithm is Digest.sha256 else None
            retrying(lambda: self.fs.pipe_file(target, data, **checksum(data, sha256)))
            return Chunk.hashed(algorithm, digest, offset=off, size=size, stored_offset=0, stored_size=len(data))

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
                digest = hash_chunk(data, self.digest)
                fields = {"offset": off, "size": size, "stored_offset": stored, "stored_size": len(data)}
                chunks.append(Chunk.hashed(self.digest, digest, **fields))
                stored += len(data)
            out.flush()
            os.fsync(out.fileno())
        return chunks

    def _sync(self, ckpt: str, cas: bool = False) -> None:
        """Make the directories of a local checkpoint's data durable (object stores are)."""
        if self.local:
            for folder in (self.path(ckpt),) if cas else (f"{self.path(ckpt)}/data", self.path(ckpt)):
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

    def endorse(self, manifest: Manifest) -> Manifest:
        """Add our signature to ``manifest`` (checked by the caller) and store it."""
        signed = self._signer().sign(manifest)
        with self._errors(f"signing checkpoint {manifest.checkpoint} in"):
            self._write_manifest(manifest.checkpoint, signed)
        return signed


def fsync_dir(path: str | Path) -> None:
    """Make the entries of directory ``path`` (files created, renamed) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _encoder(compression: Compression, cipher: ChunkCipher | None) -> Callable[[str, int, bytes], bytes]:
    """Chunk ``index`` of image ``name``, compressed and (with a cipher) encrypted."""
    compress, _ = codec(compression)

    def encode(name: str, index: int, raw: bytes) -> bytes:
        data = compress(raw)
        return cipher.encrypt(data, name, index) if cipher else data

    return encode
