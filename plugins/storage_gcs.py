"""The ``storage/gcs`` plugin: checkpoints in Google Cloud Storage (``gs://bucket/prefix``).

Credentials come from Google's chain (``GOOGLE_APPLICATION_CREDENTIALS``, gcloud's
application default credentials, the metadata server). With
``STORAGE_EMULATOR_HOST`` set, requests go to that emulator, anonymously.
"""

from __future__ import annotations

import os
from typing import Any

from cedana_ray.extras import installed, needs
from cedana_ray.hookspecs import hookimpl
from cedana_ray.models import HealthCheck

from ._remote import endpoint_check


def emulator() -> str | None:
    return os.environ.get("STORAGE_EMULATOR_HOST") or None


@hookimpl
def cedana_checkpoint_storage() -> dict[str, Any]:
    return {"gs": "cedana_ray.plugins._gcsfs.GCSStore"}  # imported on first use: gcsfs takes 1 s to import


def _credentials_check() -> HealthCheck:
    if host := emulator():
        return HealthCheck(name="credentials", ok=True, fatal=False, detail=f"none needed: emulator at {host}")
    from google.auth import _cloud_sdk  # only here: `cedana-ray` starts faster without it

    # Only the files of the chain: probing the metadata server can take seconds off GCE.
    adc = _cloud_sdk.get_application_default_credentials_path()
    candidates = (os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"), adc)
    for path in candidates:
        if path and os.path.isfile(path):
            return HealthCheck(name="credentials", ok=True, fatal=False, detail=f"found ({path})")
    return HealthCheck(
        name="credentials",
        ok=False,
        fatal=False,
        detail="no Google credentials file found (GOOGLE_APPLICATION_CREDENTIALS, gcloud auth application-default)",
    )


@hookimpl
def cedana_health_checks() -> list[HealthCheck]:
    if not installed("gcsfs"):
        return [HealthCheck(name="gcsfs", ok=False, fatal=False, detail=needs("gcs", "gs://"))]
    host = emulator()
    endpoint = endpoint_check(host) if host else HealthCheck(name="endpoint", ok=True, detail="Google (default)")
    return [_credentials_check(), endpoint]
