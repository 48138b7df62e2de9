"""The ``gpu`` plugin: the GPU middleware of the runtimes that support GPU jobs, health,
`query gpu`, `gpu trace`."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import click

from cedana_ray import nvml
from cedana_ray.cli.common import common, engine
from cedana_ray.cli.output import console, human_size, show, table
from cedana_ray.errors import PrerequisiteError, UsageError
from cedana_ray.models import HealthCheck
from cedana_ray.pipeline import Context
from cedana_ray.runtime import Commands, Runtime

from . import continue_gpu_tracing, dump_interception, restore_interception, start_gpu_tracing, tracing


def _checkpoint_api() -> HealthCheck:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        return HealthCheck(name="CUDA checkpoint API", ok=False, fatal=False, detail=f"libcuda.so.1: {exc}")
    ok = hasattr(lib, "cuCheckpointProcessLock")
    detail = "available" if ok else "driver >= 570 needed"
    return HealthCheck(name="CUDA checkpoint API", ok=ok, fatal=False, detail=detail)


def health_checks() -> list[HealthCheck]:
    # GPUs are optional: without them the GPU features are off, cedana-ray is fine.
    if reason := nvml.unavailable():
        return [HealthCheck(name="nvml", ok=False, fatal=False, detail=reason)]
    versions = nvml.driver()
    found = nvml.gpus()
    names = ", ".join(sorted({g.name for g in found})) or "none"
    return [
        HealthCheck(name="nvml", ok=True, detail=f"driver {versions['driver']}, CUDA {versions['cuda']}"),
        HealthCheck(name="gpus", ok=bool(found), fatal=False, detail=f"{len(found)} GPU(s): {names}"),
        _checkpoint_api(),
    ]


def query(ctx: Context) -> list[dict[str, Any]]:
    """Every GPU with its memory, and the jobs whose processes use it."""
    if reason := nvml.unavailable():
        raise PrerequisiteError(reason)
    from cedana_ray.proctree import alive, members

    owners = {p.pid: job.jid for job in ctx.state.jobs if alive(job.pid) for p in members(job.pid)}
    procs = nvml.processes()
    rows = []
    for gpu in nvml.gpus():
        users = [p for p in procs if p.uuid == gpu.uuid]
        jobs = sorted({owners[p.pid] for p in users if p.pid in owners})
        rows.append({**gpu.model_dump(), "jobs": jobs, "processes": len(users)})
    return rows


@click.command("gpu")
@common
def query_command(as_json: bool, local: bool) -> None:
    """List GPUs with their memory and the jobs that use them."""
    rows = engine().query("gpu")
    data = [
        [
            r["index"],
            r["name"],
            human_size(r["memory_used"]),
            human_size(r["memory_total"]),
            r["utilization"],
            ",".join(r["jobs"]),
        ]
        for r in rows
    ]
    show(as_json, rows, lambda: table(("gpu", "name", "used", "total", "util %", "jobs"), data))


@click.group("gpu")
def gpu_group() -> None:
    """GPU helpers."""


@gpu_group.command("trace")
@click.argument("jid")
@common
def trace_command(jid: str, as_json: bool, local: bool) -> None:
    """Summarize the GPU trace of job JID (run with --gpu-tracing)."""
    job = engine().job(jid)
    if not job.details.get("gpu_tracing") or not job.log:
        raise UsageError(f"job {jid} was not run with --gpu-tracing")
    doc = tracing.summary(Path(job.log).with_name(tracing.TRACE))
    show(as_json, doc, lambda: console().print_json(data=doc))


plugin = Runtime(
    "gpu",
    query=query,
    health_checks=health_checks,
    commands=Commands(own={"query": query_command}, helpers=[gpu_group]),
    hooks={  # what every type that supports GPU jobs gets (see cedana_ray.plugins_manager)
        "cedana_gpu_interception": [dump_interception],
        "cedana_gpu_interception_restore": [restore_interception],
        "cedana_gpu_tracing": [start_gpu_tracing],
        "cedana_gpu_tracing_restore": [continue_gpu_tracing],
    },
)
