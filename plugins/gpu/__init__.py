"""The ``gpu`` plugin: NVIDIA GPUs through NVML (:mod:`cedana_ray.nvml`) and the CUDA driver
checkpoint API, and the GPU middleware of every runtime that supports GPU jobs.

- :mod:`.plugin`: its hooks: the middleware below, health, `query gpu`, `gpu trace`;
- :mod:`.cuda`: ``cuCheckpointProcess*`` through ctypes on ``libcuda.so.1``;
- :mod:`.intercept`: dump/restore middleware that makes CUDA jobs checkpointable;
- :mod:`.tracing`: a per-job GPU activity trace (Chrome/Perfetto JSON).
"""

from __future__ import annotations

from typing import Any

from cedana_ray.models import Job
from cedana_ray.pipeline import Context, Handler

TRACE_INTERVAL = 0.1  # seconds between GPU samples


def start_gpu_tracing(ctx: Context, next_: Handler) -> Job:
    """`run --gpu-tracing`: a tracer samples the GPU use of the job's tree until it exits."""
    if not ctx.request.gpu_tracing:
        return next_(ctx)
    from cedana_ray import nvml

    from . import tracing

    nvml.required("--gpu-tracing")
    job = next_(ctx)
    tracing.start(job.pid, ctx.state.job_dir / tracing.TRACE, TRACE_INTERVAL, after_restore=False)
    return job.model_copy(update={"details": {**job.details, "gpu_tracing": True}})


def continue_gpu_tracing(ctx: Context, next_: Handler) -> Job:
    """A restored job traced before goes on in the same trace, the gap marked."""
    job = next_(ctx)
    if not ctx.state.manifest.details.get("gpu_tracing"):
        return job
    from cedana_ray import nvml

    from . import tracing

    if not nvml.unavailable():
        tracing.start(job.pid, ctx.state.job_dir / tracing.TRACE, TRACE_INTERVAL, after_restore=True)
    return job.model_copy(update={"details": {**job.details, "gpu_tracing": True}})


def dump_interception(ctx: Context, next_: Handler) -> Any:
    """The dump middleware that checkpoints a job's CUDA state around CRIU (and records in
    the checkpoint whether the job's GPU use is traced, for the restore to go on tracing)."""
    from .intercept import Interceptor

    if ctx.job.details.get("gpu_tracing"):
        ctx.state.details["gpu_tracing"] = True
    return Interceptor().gpu_interception(ctx, next_)


def restore_interception(ctx: Context, next_: Handler) -> Any:
    """The restore middleware that gives a restored CUDA job its GPU state back."""
    from .intercept import Interceptor

    return Interceptor().gpu_interception_restore(ctx, next_)
