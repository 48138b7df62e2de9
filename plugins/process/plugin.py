"""The ``process`` plugin: its handlers and middleware, stated as a :class:`~cedana_ray.runtime.Runtime`."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field

from cedana_ray import criu, inside
from cedana_ray.errors import RestoreError, UsageError
from cedana_ray.models import HealthCheck, Job, JobState
from cedana_ray.pipeline import Context, Handler
from cedana_ray.proctree import alive, members, signal_tree
from cedana_ray.runtime import Runtime, require_gpu
from cedana_ray.spawn import LaunchError, job_files, started_at

from . import commands, tree
from .launch import launch_in_namespaces, nsinit

NAME = "process"


def _new_job(ctx: Context, pid: int, started: float, ns_root: int | None = None, **fields: Any) -> Job:
    details: dict[str, Any] = {"started": started}
    if ns_root is not None:  # under our namespace init, PID `pid`
        details["ns_root"] = ns_root
    return Job(jid=ctx.state.jid, type=NAME, pid=pid, details=details, **fields)


def _supervised_job(ctx: Context, reply: dict[str, Any], **fields: Any) -> Job:
    """The job a supervisor started; its start time as psutil computes create_time()."""
    return _new_job(ctx, reply["pid"], started_at(reply), reply["ns_root"], **fields)


def run(ctx: Context) -> Job:
    """Start the command under a supervisor, in new PID and mount namespaces, with the
    environment the request gives it (its maker's, see cedana_ray.environment), not ours."""
    req, job_dir = ctx.request, ctx.state.job_dir
    control = ctx.state.control
    ours = {"CEDANA_RAY_JID": ctx.state.jid, "CEDANA_RAY_CONTROL": control["dir"]}
    cwd = req.cwd or os.getcwd()
    if not os.path.isdir(cwd):  # checked where the job runs: on a cluster, not where it was asked for
        raise UsageError(f"working directory {cwd} does not exist on node {socket.gethostname()}")
    spec = {
        "mode": "run",
        "cmd": req.cmd,
        "cwd": cwd,
        "env": {**(req.base_env or {}), **req.env, **ours},
        **job_files(job_dir),
        "control": control,
    }
    try:
        reply = launch_in_namespaces(spec, job_dir)
    except LaunchError as exc:
        raise UsageError(str(exc)) from exc
    return _supervised_job(ctx, reply, state=JobState.running, command=req.cmd, log=spec["log"])


def manage(ctx: Context) -> Job:
    """Adopt a running process tree by PID."""
    try:
        pid = int(ctx.request.target)
    except ValueError:
        raise UsageError(f"not a PID: {ctx.request.target!r}") from None
    p = tree.proc(pid)
    tree.check_touchable(p)
    tree.check_owner(p)
    state = JobState.frozen if tree.is_stopped(pid) else JobState.running
    return _new_job(ctx, pid, p.create_time(), state=state, command=p.cmdline(), managed=True)


def prepare_dump(ctx: Context, next_: Handler) -> Any:
    """Check the job's root process and record what restore will need.

    A job under our namespace init is dumped from inside its namespaces, without
    the init; an adopted process is dumped from the host namespace.
    """
    job = ctx.job
    tree.check_touchable(tree.proc(job.pid))
    root = job.pid
    if ns_root := job.details.get("ns_root"):
        root = tree.host_pid(job.pid, ns_root)
        ctx.state.pid, ctx.state.enter = ns_root, job.pid
    else:
        ctx.state.pid = root
    ctx.state.tree_root = root
    ctx.state.details = {
        "pipes": tree.stdio_pipes(root),
        "frozen": tree.is_stopped(root),
    }
    return next_(ctx)


class RestoreFacts(BaseModel):
    """What a process checkpoint's details must hold to be restored."""

    pipes: list[Annotated[str, Field(pattern=r"^pipe:\[[0-9]+\]$")]] = []  # CRIU --inherit-fd names
    frozen: bool = False


def restore(ctx: Context) -> Job:
    """Restore the images under a new supervisor; the restored job."""
    manifest, job_dir, work = ctx.state.manifest, ctx.state.job_dir, ctx.state.work
    details = manifest.facts(RestoreFacts)
    spec = {
        "mode": "restore",
        "criu": criu.restore_args(ctx.state.images, work, manifest.criu, leave_stopped=ctx.state.leave_stopped),
        "pipes": details.pipes,
        "work": str(work),
        **job_files(job_dir),
        "control": ctx.state.control,
    }
    try:
        reply = launch_in_namespaces(spec, job_dir)
    except LaunchError as exc:
        detail = criu.first_error(work / "restore.log") or str(exc)
        raise RestoreError(f"restore of checkpoint {manifest.checkpoint} failed: {detail}") from exc
    inside.record_restore(Path(spec["control"]["dir"]), manifest.checkpoint)
    state = JobState.frozen if details.frozen else JobState.running
    command = ctx.state.command
    return _supervised_job(ctx, reply, state=state, command=command, log=spec["log"])


def freeze(ctx: Context) -> None:
    tree.stop(ctx.job.pid)


def unfreeze(ctx: Context) -> None:
    signal_tree(ctx.job.pid, signal.SIGCONT)


def _gpu_memory_by_pid() -> dict[int, int]:
    """GPU memory per PID, when an NVIDIA driver is there."""
    from cedana_ray import nvml  # only here: NVML is slow to load, and `query` is rare

    if nvml.unavailable():
        return {}
    used: dict[int, int] = {}
    for p in nvml.processes():
        used[p.pid] = used.get(p.pid, 0) + p.memory_used
    return used


def query(ctx: Context) -> list[dict[str, Any]]:
    """The process jobs of this node with what their trees use now (GPU memory included)."""
    gpu = _gpu_memory_by_pid()
    rows = []
    for job in ctx.request:
        row: dict[str, Any] = job.row()
        if alive(job.pid, job.details.get("started")):
            procs = members(job.pid)
            row["processes"] = len(procs)
            row["rss_bytes"] = sum(p.memory_info().rss for p in procs)
            if gpu:
                row["gpu_memory_bytes"] = sum(gpu.get(p.pid, 0) for p in procs)
        rows.append(row)
    return rows


def health_checks() -> list[HealthCheck]:
    root = os.geteuid() == 0
    return [
        HealthCheck.probe("criu", lambda: f"criu {criu.version()} at {criu.binary()}"),
        HealthCheck.probe("nsinit", lambda: str(nsinit())),
        HealthCheck(name="privileges", ok=root, detail="root" if root else "CRIU needs root"),
    ]


plugin = Runtime(
    NAME,
    run=run,
    manage=manage,
    restore=restore,
    freeze=freeze,
    unfreeze=unfreeze,
    query=query,
    run_middleware=[require_gpu],
    dump_middleware=[prepare_dump],
    commands=commands.COMMANDS,
    health_checks=health_checks,
    kill_signal=tree.KILL_SIGNAL,
    supports_gpu=True,
)
