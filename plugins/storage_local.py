"""The ``storage/local`` plugin: checkpoints in a local directory (``file://``)."""

from __future__ import annotations

import os
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from cedana_ray.config import paths
from cedana_ray.hookspecs import hookimpl
from cedana_ray.models import HealthCheck


@hookimpl
def cedana_checkpoint_storage() -> dict[str, Any]:
    return {"file": LocalFileSystem}


@hookimpl
def cedana_health_checks() -> list[HealthCheck]:
    root = paths().checkpoints
    ok = (root.is_dir() and os.access(root, os.W_OK)) or not root.exists()
    return [HealthCheck(name="local store", ok=ok, detail=f"{root}" + ("" if ok else " is not writable"))]
