"""Chunk compression codecs, by name."""

from __future__ import annotations

import gzip
from collections.abc import Callable

import lz4.frame
import zstandard

from .models import Compression

Codec = tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]


def _zstd() -> Codec:
    # Level 1: images are large and often incompressible; speed wins.
    return (
        lambda b: zstandard.ZstdCompressor(level=1).compress(b),
        lambda b: zstandard.ZstdDecompressor().decompress(b),
    )


CODECS: dict[Compression, Callable[[], Codec]] = {
    Compression.zstd: _zstd,
    Compression.lz4: lambda: (lambda b: lz4.frame.compress(b, compression_level=0), lz4.frame.decompress),
    Compression.gzip: lambda: (lambda b: gzip.compress(b, compresslevel=1), gzip.decompress),
    Compression.none: lambda: (bytes, bytes),
}

EXTENSIONS = {Compression.zstd: ".zst", Compression.lz4: ".lz4", Compression.gzip: ".gz", Compression.none: ""}


def codec(compression: Compression) -> Codec:
    """(compress, decompress) for ``compression``."""
    return CODECS[compression]()
