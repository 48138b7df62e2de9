"""Chunks of image files: bounded parallel maps, and hashing while CRIU writes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .models import Chunk

DEFAULT_CHUNK = 8 << 20
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


def chunk_in_place(fd: int, off: int, size: int) -> Chunk:
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
                done.append(chunk_in_place(fd, len(done) * self.chunk_size, self.chunk_size))
        finally:
            os.close(fd)
