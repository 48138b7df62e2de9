"""The ``gpu`` plugin: NVIDIA GPUs through NVML and the CUDA driver checkpoint API.

- :mod:`.nvml`: discovery, health and per-process GPU use;
- :mod:`.cuda`: ``cuCheckpointProcess*`` through ctypes on ``libcuda.so.1``;
- :mod:`.intercept`: dump/restore middleware that makes CUDA jobs checkpointable;
- :mod:`.tracing`: a per-job GPU activity trace (Chrome/Perfetto JSON).
"""

from __future__ import annotations

from typing import Any

from cedana_ray.errors import PrerequisiteError
from cedana_ray.hookspecs import hookimpl
from cedana_ray.models import Job
from cedana_ray.pipeline import Context, Handler, Middleware


def require_gpu(ctx: Context, next_: Handler) -> Job:
    """`run --gpu`: refused where the driver sees no GPU; the job is marked as needing one
    (a cluster then places, migrates and restores it only where there is a GPU)."""
    if not ctx.request.gpu:
        return next_(ctx)
    from . import nvml

    nvml.required("--gpu")
    if not nvml.gpus():
        raise PrerequisiteError("--gpu: the NVIDIA driver sees no GPU on this node")
    job = next_(ctx)
    return job.model_copy(update={"details": {**job.details, "needs_gpu": True}})


def dump_interception(ctx: Context, next_: Handler) -> Any:
    """The dump middleware that checkpoints a job's CUDA state around CRIU."""
    from .intercept import Interceptor

    return Interceptor().gpu_interception(ctx, next_)


def restore_interception(ctx: Context, next_: Handler) -> Any:
    """The restore middleware that gives a restored CUDA job its GPU state back."""
    from .intercept import Interceptor

    return Interceptor().gpu_interception_restore(ctx, next_)


# The hooks of a job type whose dump middleware sets ``ctx.state["tree_root"]`` (its tree's
# host PID): its plugin module imports them, and pluggy collects them from there.
@hookimpl
def cedana_gpu_interception() -> list[Middleware]:
    return [dump_interception]


@hookimpl
def cedana_gpu_interception_restore() -> list[Middleware]:
    return [restore_interception]
