"""Reading a checkpoint back: a mixin of :class:`cedana_ray.store.CheckpointStore`.

Every chunk is checked against its manifest's digest (BLAKE3, or sha256 for checkpoints made
before it) before it is used, then decrypted
and decompressed into the restore's own staging directory, where every file is created
relative to the directory's descriptor (``O_NOFOLLOW | O_EXCL``, 0600); an uncompressed
local checkpoint is linked and verified in place instead.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .chunk_store import ContentCipher
from .chunking import bounded_map, hash_chunk
from .codec import EXTENSIONS, codec
from .crypto import ChunkCipher, cipher_for
from .errors import CorruptCheckpoint
from .models import Chunk, Compression, ImageFile, Layout, Manifest
from .retry import retrying
from .store_write import DEFAULT_STREAMS, Progress

Decrypt = Callable[[bytes, ImageFile, int], bytes]  # stored bytes of chunk N of an image -> compressed


class StoreReader:
    """Fetching and verifying images (mixed into CheckpointStore: uses its fs, paths, manifests)."""

    def readable_in_place(self, manifest: Manifest) -> bool:
        """Whether CRIU can read ``manifest``'s images where they are stored."""
        plain = manifest.compression is Compression.none and not manifest.encryption
        return self.local and manifest.layout is Layout.file and plain

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
        decrypt = _decrypter(manifest, cipher_for(manifest, key), key)
        dest.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._each_file(manifest, dest, streams, progress, decrypt)
        return manifest, dest

    def verify(self, manifest: Manifest, streams: int = DEFAULT_STREAMS, progress: Progress | None = None) -> None:
        """Check every chunk's digest; raises :class:`CorruptCheckpoint` naming the first bad one."""
        self._each_file(manifest, None, streams, progress, None)

    def _each_file(
        self, manifest: Manifest, dest: Path | None, streams: int, progress: Progress | None, decrypt: Decrypt | None
    ) -> None:
        total, done = manifest.image_bytes, 0
        with self._errors(f"fetching checkpoint {manifest.checkpoint} from"), ThreadPoolExecutor(streams) as pool:
            for image in manifest.files:
                self._fetch_file(pool, manifest, image, dest, streams, decrypt)
                done += image.size
                if progress:
                    progress("fetch", done, total)

    def _read_chunk(self, manifest: Manifest, image: ImageFile, index: int) -> bytes:
        """The stored bytes of chunk ``index`` of ``image``, checked against its digest."""
        ckpt, chunk = manifest.checkpoint, image.chunks[index]
        source = f"{self.path(ckpt)}/data/{image.name}{EXTENSIONS[manifest.compression]}"
        try:
            if manifest.layout is Layout.cas:
                data = retrying(lambda: self.fs.cat_file(self.chunk_path(chunk.digest, manifest.digest)))
            elif manifest.layout is Layout.chunks:
                data = retrying(lambda: self.fs.cat_file(f"{source}/{index:06d}"))
            else:
                end = chunk.stored_offset + chunk.stored_size
                data = retrying(lambda: self.fs.cat_file(source, chunk.stored_offset, end))
        except FileNotFoundError as exc:
            raise CorruptCheckpoint(f"checkpoint {ckpt}: chunk {index} of {image.name} is missing") from exc
        if len(data) != chunk.stored_size or hash_chunk(data, manifest.digest) != chunk.digest:
            where = f"checkpoint {ckpt}: chunk {index} of {image.name}"
            raise CorruptCheckpoint(f"{where} is corrupted ({manifest.digest} mismatch)")
        return data

    def _fetch_file(
        self,
        pool: ThreadPoolExecutor,
        manifest: Manifest,
        image: ImageFile,
        dest: Path | None,
        streams: int,
        decrypt: Decrypt | None,
    ) -> None:
        """Verify the chunks of ``image``; decrypt and decompress them into ``dest`` unless it is None."""
        _, decompress = codec(manifest.compression)

        def one(index: int) -> tuple[Chunk, bytes]:
            data = self._read_chunk(manifest, image, index)
            if dest is None:
                return image.chunks[index], b""
            return image.chunks[index], decompress(decrypt(data, image, index) if decrypt else data)

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


def _decrypter(manifest: Manifest, cipher: ChunkCipher | None, key: bytes | None) -> Decrypt | None:
    """How the chunks of ``manifest`` decrypt, once ``cipher_for`` accepted ``key`` for it."""
    if cipher is None or key is None:
        return None
    if manifest.layout is not Layout.cas:
        return lambda data, image, index: cipher.decrypt(data, image.name, index)
    content = ContentCipher(key)  # a chunk is bound to its address, shared by checkpoints

    def decrypt(data: bytes, image: ImageFile, index: int) -> bytes:
        where = f"checkpoint {manifest.checkpoint}: chunk {index} of {image.name}"
        return content.decrypt(data, image.chunks[index].address or "", where)

    return decrypt


@contextlib.contextmanager
def _dir_fd(path: Path) -> Iterator[int]:
    """A descriptor of directory ``path`` (not a symlink to one), to create entries relative to."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        yield fd
    finally:
        os.close(fd)
