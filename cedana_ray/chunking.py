"""Chunks of image files: bounded parallel maps, and work on chunks while CRIU writes them."""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Self, TypeVar

import blake3

from .models import Chunk, Digest
from .staging import start_writeback

DEFAULT_CHUNK = 8 << 20
DIGEST = Digest.blake3  # what new checkpoints hash their chunks with
T = TypeVar("T")
_HASHES: dict[Digest, Callable[[bytes], str]] = {
    # BLAKE3 releases the GIL and runs several GB/s per core, sha256 (SHA-NI) under 2
    Digest.blake3: lambda data: blake3.blake3(data).hexdigest(),
    Digest.sha256: lambda data: hashlib.sha256(data).hexdigest(),
}
# Memory images hold many all-zero chunks (buffers allocated and cleared, never filled);
# comparing with zeros runs at memory speed, many times faster than hashing them.
_ZEROS = bytes(DEFAULT_CHUNK)


@functools.cache
def _zeros_digest(algorithm: Digest) -> str:
    """Computed when first needed: hashing 8 MiB would slow every command that imports this."""
    return _HASHES[algorithm](_ZEROS)


def hash_chunk(data: bytes, algorithm: Digest = DIGEST) -> str:
    """The hex digest of ``data`` under ``algorithm``; a full chunk of zeros takes the one
    computed for the first."""
    if len(data) == DEFAULT_CHUNK and data == _ZEROS:
        return _zeros_digest(algorithm)
    return _HASHES[algorithm](data)


def bounded_map(pool: ThreadPoolExecutor, fn: Callable[..., T], items: Iterable[Any], window: int) -> Iterator[T]:
    """``pool.map`` in order, with at most ``window`` results in memory."""
    pending: deque[Future[T]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


ChunkFn = Callable[[Path, int, int, int], Chunk]  # (image file, index, offset, size) -> its Chunk


def chunk_in_place(fd: int, off: int, size: int, algorithm: Digest = DIGEST) -> Chunk:
    digest = hash_chunk(os.pread(fd, size, off), algorithm)
    return Chunk.hashed(algorithm, digest, offset=off, size=size, stored_offset=off, stored_size=size)


def in_place_hasher(algorithm: Digest = DIGEST, write_back: bool = False) -> ChunkFn:
    """Hashes a chunk of an image file where it lies, with ``algorithm``; with
    ``write_back``, starts writing it to disk too (see :meth:`StoreWriter.early_chunks`)."""

    def hash_in_place(path: Path, index: int, off: int, size: int) -> Chunk:
        fd = os.open(path, os.O_RDONLY)
        try:
            chunk = chunk_in_place(fd, off, size, algorithm)
            if write_back:
                start_writeback(fd, off, size)
            return chunk
        finally:
            os.close(fd)

    return hash_in_place


hash_in_place = in_place_hasher()


class WhileCriuWrites:
    """Works on the chunks of image files in a thread while CRIU writes them: CRIU writes
    each file sequentially, so a chunk wholly below a file's current size is final. What to
    do with a file's new chunks is the subclass's ``_catch_up``; what a failure undoes, its
    ``_failed`` (true: stop here, the commit redoes what is missing or reports the error)."""

    def __init__(self, images: Path, streams: int) -> None:
        self.images = images
        self.streams = streams
        self.chunks: dict[str, list[Chunk]] = {}
        self.failure: Exception | None = None  # what stopped the work early
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with ThreadPoolExecutor(self.streams) as pool:
            while not self._stop.wait(0.01):
                for path in sorted(self.images.iterdir()):
                    try:
                        self._catch_up(pool, path)
                    except Exception as exc:
                        if self._failed(path, exc):
                            self.failure = exc
                            return

    def _catch_up(self, pool: ThreadPoolExecutor, path: Path) -> None:
        raise NotImplementedError

    def _failed(self, path: Path, exc: Exception) -> bool:
        return True


class EarlyChunks(WhileCriuWrites):
    """Processes the full fixed-size chunks of image files while CRIU is still writing them:
    in-place dumps have them hashed, dumps to an object store have them encoded and
    uploaded (``process``); commit() then handles only what is left, and the work overlaps
    with CRIU instead of following it."""

    def __init__(
        self, images: Path, process: ChunkFn = hash_in_place, chunk_size: int = DEFAULT_CHUNK, streams: int = 1
    ) -> None:
        super().__init__(images, streams)
        self.process = process
        self.chunk_size = chunk_size

    def _catch_up(self, pool: ThreadPoolExecutor, path: Path) -> None:
        done = self.chunks.setdefault(path.name, [])
        full = path.stat().st_size // self.chunk_size
        spans = ((i, i * self.chunk_size, self.chunk_size) for i in range(len(done), full))
        # Once stopped, start no new chunk but keep those in flight, or commit() redoes them.
        spans = itertools.takewhile(lambda _: not self._stop.is_set(), spans)
        done.extend(bounded_map(pool, lambda span: self.process(path, *span), spans, self.streams * 2))
