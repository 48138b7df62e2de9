"""cedana-ray: checkpoint/restore and migration of processes, containers and GPU jobs.

The Python API lives in :mod:`cedana_ray.api` and is re-exported here lazily, so
that importing the package (as the workload supervisor's tools do) stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = (
    "init",
    "run",
    "submit",
    "manage",
    "dump",
    "restore",
    "migrate",
    "freeze",
    "unfreeze",
    "kill",
    "delete",
    "job",
    "jobs",
    "logs",
    "wait",
    "checkpoints",
    "events",
    "import_checkpoint",
    "nodes",
    "JobHandle",
)
_INSIDE = ("checkpoint", "on_restore", "restored")  # for code running inside a job
__all__ = ["__version__", *_API, *_INSIDE]


def __getattr__(name: str) -> Any:
    if name in _API:
        from . import api

        return getattr(api, name)
    if name in _INSIDE:
        from . import inside

        return getattr(inside, name)
    raise AttributeError(f"module 'cedana_ray' has no attribute {name!r}")
