"""The filesystem of ``storage/gcs``, imported only when a ``gs://`` URL is used."""

from __future__ import annotations

import os
from typing import Any

# Set before gcsfs is imported, which reads it: its experimental (gRPC) mode makes
# every call to an emulator wait out a 60 s timeout.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

from cedana_ray.errors import StorageError
from cedana_ray.extras import MissingExtra, needs

try:
    import gcsfs
except ModuleNotFoundError as exc:  # the gcs extra is not installed (not: gcsfs is, and fails)
    if exc.name not in ("gcsfs", "google", "google.cloud", "google.cloud.storage"):
        raise
    raise MissingExtra(needs("gcs", "gs://")) from exc

from .storage_gcs import emulator

SCOPE = "https://www.googleapis.com/auth/devstorage.full_control"


def _credentials(key_file: str) -> Any:
    """The credentials in ``key_file``, loaded now: gcsfs would fall back to anonymous
    access on a broken file, which then fails later with a misleading error."""
    import google.auth
    import google.auth.exceptions

    try:
        credentials, _ = google.auth.load_credentials_from_file(key_file, scopes=[SCOPE])
    except (google.auth.exceptions.DefaultCredentialsError, ValueError, OSError) as exc:
        why = "; ".join(map(str, exc.args))
        raise StorageError(f"GCS credentials in GOOGLE_APPLICATION_CREDENTIALS cannot be used: {why}") from None
    return credentials


class GCSStore(gcsfs.GCSFileSystem):
    """gcsfs that tries each request once: the store retries, alike on every backend."""

    cachable = False  # the emulator and credentials are read from the environment

    # gcsfs retries a failed request six times with sleeps of up to 32 s: a dead
    # server would hold a dump for a minute. Call the undecorated request instead.
    _request = getattr(gcsfs.GCSFileSystem._request, "__wrapped__", gcsfs.GCSFileSystem._request)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if emulator():
            kwargs.setdefault("token", "anon")  # emulators accept no credentials
        elif key_file := os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
            kwargs.setdefault("token", _credentials(key_file))
        super().__init__(*args, **kwargs)
