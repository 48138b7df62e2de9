"""The filesystem of ``storage/s3``, imported only when an ``s3://`` URL is used."""

from __future__ import annotations

import base64
import zlib
from typing import Any

from cedana_ray.extras import MissingExtra, needs
from cedana_ray.store import DEFAULT_STREAMS

try:
    from s3fs import S3FileSystem
except ModuleNotFoundError as exc:  # the s3 extra is not installed (not: s3fs is, and fails)
    if exc.name not in ("s3fs", "aiobotocore", "botocore"):
        raise
    raise MissingExtra(needs("s3", "s3://")) from exc

from .storage_s3 import endpoint


class S3Store(S3FileSystem):
    """s3fs that tries each request once: the store retries, alike on every backend."""

    # Endpoint and credentials are read from the environment: a cached instance would
    # keep stale ones (rotated keys, another endpoint).
    cachable = False
    retries = 1

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("endpoint_url", endpoint())
        config = {
            "retries": {"max_attempts": 1, "mode": "standard"},
            "connect_timeout": 5,
            "max_pool_connections": max(64, 2 * DEFAULT_STREAMS),  # one per stream at --streams 64
            # Chunks carry a signed checksum header instead (put_checksum), which the
            # server verifies, without botocore hashing every byte again on fsspec's single
            # event-loop thread (plain-HTTP endpoints always sign payloads otherwise): a
            # sha256 one for checkpoints hashed so, a CRC32 for BLAKE3 ones (S3 knows no
            # BLAKE3), whose stored bytes every read checks against the signed manifest.
            # Other writes get botocore's CRC32.
            "s3": {"payload_signing_enabled": False},
        }
        kwargs["config_kwargs"] = {**config, **kwargs.get("config_kwargs", {})}
        super().__init__(*args, **kwargs)

    @staticmethod
    def put_checksum(data: bytes, sha256: str | None = None) -> dict[str, str]:
        """The put_object argument that has S3 check chunk ``data``: against its ``sha256``
        where we have it (a checkpoint hashed so), else a CRC32 of it computed here, on the
        caller's thread (S3 has no BLAKE3 checksum)."""
        if sha256 is not None:
            return {"ChecksumSHA256": base64.b64encode(bytes.fromhex(sha256)).decode()}
        return {"ChecksumCRC32": base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()}
