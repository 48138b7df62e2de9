"""The ``storage/s3`` plugin: checkpoints in S3 or an S3-compatible server (``s3://bucket/prefix``).

The endpoint comes from ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (AWS itself
when neither is set), credentials and region from the standard AWS chain
(environment, ``~/.aws``, instance roles).
"""

from __future__ import annotations

import os
from typing import Any

from cedana_ray.extras import installed, needs
from cedana_ray.hookspecs import hookimpl
from cedana_ray.models import HealthCheck

from ._remote import endpoint_check


def endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


@hookimpl
def cedana_checkpoint_storage() -> dict[str, Any]:
    return {"s3": "cedana_ray.plugins._s3fs.S3Store"}  # imported on first use: s3fs is slow to import


def _credentials_check() -> HealthCheck:
    import botocore.session  # only here: `cedana-ray` starts faster without it

    creds = botocore.session.get_session().get_credentials()
    if creds is None:
        return HealthCheck(
            name="credentials", ok=False, fatal=False, detail="no AWS credentials found (env, ~/.aws, instance role)"
        )
    return HealthCheck(name="credentials", ok=True, fatal=False, detail=f"found ({creds.method})")


@hookimpl
def cedana_health_checks() -> list[HealthCheck]:
    if not installed("s3fs"):
        return [HealthCheck(name="s3fs", ok=False, fatal=False, detail=needs("s3", "s3://"))]
    checks = [_credentials_check()]
    url = endpoint()
    checks.append(endpoint_check(url) if url else HealthCheck(name="endpoint", ok=True, detail="AWS (default)"))
    return checks
