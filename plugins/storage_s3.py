"""The ``storage/s3`` plugin: checkpoints in S3 or an S3-compatible server (``s3://bucket/prefix``).

The endpoint comes from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (AWS itself
when neither is set), credentials and region from the standard AWS chain
(environment, ``~/.aws``, instance roles).
"""

from __future__ import annotations

import os
from typing import Any

import botocore.session
from s3fs import S3FileSystem

from cedana_ray.hookspecs import hookimpl
from cedana_ray.models import HealthCheck
from cedana_ray.store import DEFAULT_STREAMS

from ._remote import endpoint_check


def endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


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


@hookimpl
def cedana_checkpoint_storage() -> dict[str, Any]:
    return {"s3": S3Store}


def _credentials_check() -> HealthCheck:
    creds = botocore.session.get_session().get_credentials()
    if creds is None:
        return HealthCheck(
            name="credentials", ok=False, fatal=False, detail="no AWS credentials found (env, ~/.aws, instance role)"
        )
    return HealthCheck(name="credentials", ok=True, fatal=False, detail=f"found ({creds.method})")


@hookimpl
def cedana_health_checks() -> list[HealthCheck]:
    checks = [_credentials_check()]
    url = endpoint()
    checks.append(endpoint_check(url) if url else HealthCheck(name="endpoint", ok=True, detail="AWS (default)"))
    return checks
