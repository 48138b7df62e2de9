"""The filesystem of ``storage/s3``, imported only when an ``s3://`` URL is used."""

from __future__ import annotations

from typing import Any

from s3fs import S3FileSystem

from cedana_ray.store import DEFAULT_STREAMS

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
        }
        kwargs["config_kwargs"] = {**config, **kwargs.get("config_kwargs", {})}
        super().__init__(*args, **kwargs)
