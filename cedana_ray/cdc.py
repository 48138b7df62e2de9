"""Content-defined chunk boundaries on 4 KiB pages, for content-addressed checkpoints.

CRIU's page images hold a process's pages back to back: a mapping that grows or a page
that turns to zero (CRIU leaves it out) shifts every page after it. Fixed-size chunks would
then all differ; here a chunk ends after a page whose fingerprint falls below a threshold,
so a boundary depends on the content of one page, not on its offset, and moves with it.

Only page ends are candidates, since content only ever moves by whole pages. A page's
fingerprint is the CRC-32 of its first :data:`SAMPLE` bytes: one C call per page (some
4 GB/s here, against 1.4 GB/s for the whole page), which is enough to pick boundaries;
whether a chunk changed is decided by its full hash, not by this. Chunks are at least
:data:`MIN_SIZE` (fewer objects and requests), at most :data:`MAX_SIZE` (bounded memory),
and about :data:`AVG_SIZE` on average: small enough that a change of a few MiB re-uploads little
around it, large enough that S3 requests stay cheap next to their payload.
"""

from __future__ import annotations

import os
import zlib

PAGE = 4096
MIN_SIZE = 1 << 20
AVG_SIZE = 4 << 20
MAX_SIZE = 16 << 20
SAMPLE = 256  # bytes of a page that its fingerprint covers
WINDOW = 16 << 20  # bytes read at once while scanning
Span = tuple[int, int]  # (offset, size) of one chunk


class Cutter:
    """The chunks of one file that grows at its end (CRIU writes images sequentially).

    :meth:`cuts` returns the chunks whose end is settled by what has been written so far;
    called again as the file grows, it goes on from where it stopped, and with
    ``final=True`` it returns the rest, the last chunk ending at the end of the file.
    """

    def __init__(self, min_size: int = MIN_SIZE, avg_size: int = AVG_SIZE, max_size: int = MAX_SIZE) -> None:
        if not PAGE <= min_size < avg_size < max_size or min_size % PAGE or max_size % PAGE:
            raise ValueError("chunk sizes must be page multiples with min < avg < max")
        self.min_size, self.max_size = min_size, max_size
        # Past the minimum any page ends a chunk with probability PAGE/(avg - min), whatever
        # the length so far: after a change, the first old boundary at least min_size past
        # the last new one is a boundary again. (FastCDC's normalized chunking, a stricter
        # test below the average, gathers sizes round it but was measured to resynchronise
        # later: 22 MiB new around a 12 MiB change against 17 MiB here.)
        self.threshold = (1 << 32) * PAGE // (avg_size - min_size)
        self.start = 0  # where the chunk being grown begins
        self.scanned = 0  # every page end below this has been considered

    def cuts(self, fd: int, size: int, final: bool = False) -> list[Span]:
        """The chunks of the file ``fd`` (now ``size`` bytes) newly settled."""
        spans: list[Span] = []
        end = size - size % PAGE  # a partial last page may still grow
        while self.scanned < end:
            # pages before the minimum cannot end a chunk: they are not even read
            self.scanned = max(self.scanned, min(end, self.start + self.min_size - PAGE))
            length = min(WINDOW, end - self.scanned)
            if length:
                spans += self._scan(os.pread(fd, length, self.scanned))
        if final and (self.start < size or size == 0):
            spans.append((self.start, size - self.start))
            self.start = self.scanned = size
        return spans

    def _scan(self, data: bytes) -> list[Span]:
        """Chunks that end in ``data``, the whole pages from ``self.scanned`` on."""
        spans, view, base = [], memoryview(data), self.scanned
        for at in range(0, len(data), PAGE):
            page_end = base + at + PAGE
            length = page_end - self.start
            if length < self.min_size:
                continue
            if length >= self.max_size or zlib.crc32(view[at : at + SAMPLE]) < self.threshold:
                spans.append((self.start, length))
                self.start = page_end
        self.scanned = base + len(data)
        return spans


def spans_of(fd: int, size: int, cutter: Cutter | None = None) -> list[Span]:
    """Every chunk of a complete file ``fd`` of ``size`` bytes."""
    return (cutter or Cutter()).cuts(fd, size, final=True)
