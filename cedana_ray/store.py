"""Checkpoint store over fsspec: images as checksummed chunks plus a manifest.

Layout of checkpoint ``ID`` under a store URL::

    URL/ID/data/<image file><ext>   chunks, each an independent compressed frame
    URL/ID/manifest.json            written last; without it there is no checkpoint

With ``--compression none`` on a local store CRIU dumps straight into
``URL/ID/data`` and the chunks are only hashed in place, so a local uncompressed
checkpoint costs CRIU's own write plus one read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import fsspec
import psutil
from fsspec.implementations.local import LocalFileSystem

from .codec import EXTENSIONS, codec
from .errors import CheckpointNotFound, CorruptCheckpoint, StorageError, UsageError
from .models import Chunk, Compression, ImageFile, Manifest, check_name

MANIFEST = "manifest.json"
DEFAULT_CHUNK = 8 << 20
DEFAULT_STREAMS = max(2, min(8, os.cpu_count() or 2))
Progress = Callable[[str, int, int], None]
T = TypeVar("T")


def bounded_map(pool: ThreadPoolExecutor, fn: Callable[..., T], items: Iterable[Any], window: int) -> Iterator[T]:
    """``pool.map`` in order, with at most ``window`` results in memory."""
    pending: deque[Future[T]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _chunk_in_place(fd: int, off: int, size: int) -> Chunk:
    digest = hashlib.sha256(os.pread(fd, size, off)).hexdigest()
    return Chunk(offset=off, size=size, stored_offset=off, stored_size=size, sha256=digest)


class Prehasher:
    """Hashes the full chunks of images while CRIU is still writing them.

    CRIU writes each image file sequentially, so a chunk wholly below a file's current
    size is final. Used for in-place dumps: commit() then hashes only what is left,
    and hashing overlaps with CRIU instead of following it.
    """

    def __init__(self, images: Path, chunk_size: int = DEFAULT_CHUNK) -> None:
        self.images = images
        self.chunk_size = chunk_size
        self.chunks: dict[str, list[Chunk]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prehash", daemon=True)

    def __enter__(self) -> Prehasher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            for path in sorted(self.images.iterdir()):
                with contextlib.suppress(OSError):
                    self._catch_up(path)

    def _catch_up(self, path: Path) -> None:
        done = self.chunks.setdefault(path.name, [])
        size = path.stat().st_size
        if (len(done) + 1) * self.chunk_size > size:
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            while (len(done) + 1) * self.chunk_size <= size and not self._stop.is_set():
                done.append(_chunk_in_place(fd, len(done) * self.chunk_size, self.chunk_size))
        finally:
            os.close(fd)


def register_schemes(schemes: dict[str, Any]) -> None:
    """Make plugin-provided filesystems known to fsspec (refusing silent overrides)."""
    for scheme, cls in schemes.items():
        if scheme in fsspec.available_protocols():
            continue
        fsspec.register_implementation(scheme, cls)


def split_url(url: str) -> tuple[str, str]:
    """A checkpoint URL as (store URL, checkpoint id)."""
    url = url.rstrip("/")
    root, _, ckpt = url.rpartition("/")
    if not root or not ckpt:
        raise StorageError(f"not a checkpoint URL: {url!r}")
    return root, ckpt


class CheckpointStore:
    """The checkpoints under one store URL (``file://``, ``s3://``, ...)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        except (ValueError, ImportError) as exc:
            raise StorageError(
                f"cannot open checkpoint store {url!r}: {exc}",
                hint=f"known schemes: {', '.join(sorted(fsspec.available_protocols()))}",
            ) from exc
        self.local = isinstance(self.fs, LocalFileSystem)

    # -- paths
    def path(self, ckpt: str) -> str:
        return f"{self.root}/{check_name(ckpt, 'checkpoint id')}"

    def url_of(self, ckpt: str) -> str:
        return f"{self.url}/{ckpt}"

    def prehash(self, images: Path, ckpt: str) -> contextlib.AbstractContextManager[Prehasher | None]:
        """Hash chunks of an in-place dump while it is written (a no-op otherwise)."""
        return Prehasher(images) if self._in_place(images, ckpt) else contextlib.nullcontext()

    def _in_place(self, images: Path, ckpt: str) -> bool:
        """Whether ``images`` are the stored data of ``ckpt`` (local, uncompressed)."""
        return self.local and images == Path(self.path(ckpt)) / "data"

    def dump_dir(self, ckpt: str, compression: Compression, staging: Path) -> Path:
        """Where CRIU should write the images of ``ckpt``: in place, or in ``staging``."""
        target = Path(self.path(ckpt)) / "data" if self.local and compression is Compression.none else staging / ckpt
        target.mkdir(parents=True, exist_ok=False)
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
        prehashed: Prehasher | None = None,
    ) -> Manifest:
        """Store the image files in ``images`` and write the manifest last.

        ``manifest`` holds every manifest field but ``files``, ``compression`` and
        ``chunk_size``; ``prehashed`` the chunks already hashed during the dump. On any
        failure nothing that lists as a checkpoint is left.
        """
        known = prehashed.chunks if prehashed and prehashed.chunk_size == chunk_size else {}
        ckpt = manifest["checkpoint"]
        try:
            in_place = self._in_place(images, ckpt)
            names = sorted(p.name for p in images.iterdir() if p.is_file())
            total = sum((images / n).stat().st_size for n in names)
            done = 0
            files = []
            with ThreadPoolExecutor(streams) as pool:
                for name in names:
                    if in_place:
                        image = self._hash_in_place(pool, images / name, known.get(name, []), chunk_size, streams)
                    else:
                        image = self._write_file(pool, images / name, ckpt, compression, chunk_size, streams)
                    files.append(image)
                    done += image.size
                    if progress:
                        progress("store", done, total)
            final = Manifest(**manifest, files=tuple(files), compression=compression, chunk_size=chunk_size)
            self._write_manifest(ckpt, final)
            return final
        except OSError as exc:
            self.discard(ckpt)
            raise StorageError(f"storing checkpoint {ckpt} in {self.url} failed: {exc}") from exc
        except BaseException:
            self.discard(ckpt)
            raise

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
            hashed = bounded_map(pool, lambda span: _chunk_in_place(fd, *span), rest, streams * 2)
            chunks = (*known, *hashed)
        finally:
            os.close(fd)
        return ImageFile(name=path.name, size=path.stat().st_size, chunks=chunks)

    def _write_file(
        self, pool: ThreadPoolExecutor, path: Path, ckpt: str, compression: Compression, chunk_size: int, streams: int
    ) -> ImageFile:
        compress, _ = codec(compression)
        fd = os.open(path, os.O_RDONLY)

        def one(span: tuple[int, int]) -> tuple[int, int, bytes, str]:
            off, size = span
            data = compress(os.pread(fd, size, off))
            return off, size, data, hashlib.sha256(data).hexdigest()

        chunks = []
        stored = 0
        target = f"{self.path(ckpt)}/data/{path.name}{EXTENSIONS[compression]}"
        try:
            self.fs.makedirs(f"{self.path(ckpt)}/data", exist_ok=True)
            with self.fs.open(target, "wb") as out:
                for off, size, data, digest in bounded_map(pool, one, self._chunks(path, chunk_size), streams * 2):
                    out.write(data)
                    chunks.append(
                        Chunk(offset=off, size=size, stored_offset=stored, stored_size=len(data), sha256=digest)
                    )
                    stored += len(data)
        finally:
            os.close(fd)
        return ImageFile(name=path.name, size=path.stat().st_size, chunks=tuple(chunks))

    def _write_manifest(self, ckpt: str, manifest: Manifest) -> None:
        data = manifest.model_dump_json(indent=1).encode()
        final = f"{self.path(ckpt)}/{MANIFEST}"
        if self.local:  # atomic: a reader sees the whole manifest or none
            tmp = f"{final}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        else:
            self.fs.pipe_file(final, data)

    # -- read
    def manifest(self, ckpt: str) -> Manifest:
        try:
            raw = self.fs.cat_file(f"{self.path(ckpt)}/{MANIFEST}")
        except (FileNotFoundError, NotADirectoryError) as exc:  # NotADirectory: a stray file
            raise CheckpointNotFound(f"no checkpoint {ckpt!r} in {self.url}") from exc
        try:
            return Manifest.model_validate_json(raw)
        except ValueError as exc:
            raise CorruptCheckpoint(f"checkpoint {ckpt}: unreadable manifest: {exc}") from exc

    def list(self) -> list[Manifest]:
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            try:
                found.append(self.manifest(entry.rstrip("/").rsplit("/", 1)[-1]))
            except (CheckpointNotFound, CorruptCheckpoint, UsageError, ValueError):
                continue  # no manifest: not a checkpoint (or a stray file, or a name no id can have)
        return sorted(found, key=lambda m: m.created)

    def readable_in_place(self, manifest: Manifest) -> bool:
        """Whether CRIU can read ``manifest``'s images where they are stored."""
        return self.local and manifest.compression is Compression.none

    def link(self, manifest: Manifest, dest: Path) -> Path:
        """Links in ``dest`` to the images of an in-place checkpoint, unverified."""
        dest.mkdir(parents=True, exist_ok=True)
        for image in manifest.files:
            os.symlink(f"{self.path(manifest.checkpoint)}/data/{image.name}", dest / image.name)
        return dest

    def fetch(
        self, ckpt: str, dest: Path, streams: int = DEFAULT_STREAMS, progress: Progress | None = None
    ) -> tuple[Manifest, Path]:
        """Verify every chunk of ``ckpt`` and lay its images out in ``dest``.

        Returns the manifest and the directory CRIU should restore from: ``dest``,
        holding decompressed files, or links to an uncompressed local checkpoint.
        Raises :class:`CorruptCheckpoint` naming the first bad chunk.
        """
        manifest = self.manifest(ckpt)
        if self.readable_in_place(manifest):
            self.verify(manifest, streams, progress)
            return manifest, self.link(manifest, dest)
        dest.mkdir(parents=True, exist_ok=True)
        self._each_file(manifest, dest, streams, progress)
        return manifest, dest

    def verify(self, manifest: Manifest, streams: int = DEFAULT_STREAMS, progress: Progress | None = None) -> None:
        """Check every chunk's sha256; raises :class:`CorruptCheckpoint` naming the first bad one."""
        self._each_file(manifest, None, streams, progress)

    def _each_file(self, manifest: Manifest, dest: Path | None, streams: int, progress: Progress | None) -> None:
        total, done = manifest.image_bytes, 0
        with ThreadPoolExecutor(streams) as pool:
            for image in manifest.files:
                self._fetch_file(pool, manifest, image, dest, streams)
                done += image.size
                if progress:
                    progress("fetch", done, total)

    def _fetch_file(
        self, pool: ThreadPoolExecutor, manifest: Manifest, image: ImageFile, dest: Path | None, streams: int
    ) -> None:
        """Verify the chunks of ``image``; decompress them into ``dest`` unless it is None."""
        ckpt = manifest.checkpoint
        source = f"{self.path(ckpt)}/data/{image.name}{EXTENSIONS[manifest.compression]}"
        _, decompress = codec(manifest.compression)

        def one(index: int) -> tuple[Chunk, bytes]:
            chunk = image.chunks[index]
            try:
                data = self.fs.cat_file(source, chunk.stored_offset, chunk.stored_offset + chunk.stored_size)
            except FileNotFoundError as exc:
                raise CorruptCheckpoint(f"checkpoint {ckpt}: image {image.name} is missing") from exc
            if len(data) != chunk.stored_size or hashlib.sha256(data).hexdigest() != chunk.sha256:
                raise CorruptCheckpoint(
                    f"checkpoint {ckpt}: chunk {index} of {image.name} is corrupted (sha256 mismatch)"
                )
            return chunk, b"" if dest is None else decompress(data)

        results = bounded_map(pool, one, range(len(image.chunks)), streams * 2)
        if dest is None:
            for _ in results:
                pass
            return
        fd = os.open(dest / image.name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for chunk, data in results:
                if len(data) != chunk.size:
                    raise CorruptCheckpoint(f"checkpoint {ckpt}: chunk of {image.name} has the wrong size")
                os.pwrite(fd, data, chunk.offset)
            os.ftruncate(fd, image.size)
        finally:
            os.close(fd)

    # -- delete
    def delete(self, ckpt: str) -> None:
        self.manifest(ckpt)  # raises when there is no such checkpoint
        self.discard(ckpt)

    def discard(self, ckpt: str) -> None:
        """Remove whatever exists of ``ckpt``, manifest first so it stops listing."""
        path = self.path(ckpt)
        for target in (f"{path}/{MANIFEST}", path):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(target, recursive=target == path)


SHM = Path("/dev/shm")


def _fits_in_memory(nbytes: int) -> bool:
    return SHM.is_dir() and shutil.disk_usage(SHM).free > 2 * nbytes and psutil.virtual_memory().available > 3 * nbytes


def staging_area(base: Path, nbytes: int = 0) -> Path:
    """A fresh private directory for ``nbytes`` of images.

    In memory (``/dev/shm``) when they fit there with room to spare, since images
    staged on disk are written once and read back at once: page-cache pressure on a
    slow disk made that the largest cost of compressed dumps and restores. Else under
    ``base``.
    """
    if nbytes and _fits_in_memory(nbytes):
        base = SHM / "cedana-ray"
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=base))


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
