"""Containers of our containerd namespace and their tasks, as run and restore both need them:
the job of a task, the watcher that reports its exit, the checks before a container is
created, the CRIU configuration file its annotation names."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from cedana_ray.config import paths
from cedana_ray.errors import JobNotFound, StateError
from cedana_ray.models import CriuOptions, Job
from cedana_ray.pipeline import Context
from cedana_ray.proctree import signal_tree, wait_reaped
from cedana_ray.spawn import launch, started_at

from . import watch
from .client import Ctr

NAME = "containerd"
KILLED_EXIT_S = 5.0  # how long a killed task may take to exit and be reaped


def ctr_of(job: Job | None = None) -> Ctr:
    env = Ctr.from_env()
    return Ctr(job.details["address"], job.details["namespace"]) if job else env


def criu_config(cid: str) -> Path:
    """The CRIU configuration file of container ``cid`` and of every clone restored from
    it (the annotation travels in the checkpoint's spec), so it outlives the job."""
    path = paths().home / "containerd" / "criu" / f"{cid}.conf"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def config_lines(opts: CriuOptions, stopped: bool) -> list[str]:
    lines = ["leave-stopped"] if stopped else []
    lines += [name for name, on in (("tcp-established", opts.tcp_established), ("file-locks", opts.file_locks)) if on]
    lines += ["shell-job"] if opts.shell_job else []
    return lines + [f"external {e}" for e in opts.external]


def job_of(ctx: Context, ctr: Ctr, cid: str, image: str, pid: int, started: float, **fields: Any) -> Job:
    details = {"target": cid, "address": ctr.address, "namespace": ctr.namespace, "image": image, "started": started}
    return Job(jid=ctx.state.jid, type=NAME, pid=pid, details=details, **fields)


def watched_job(ctx: Context, ctr: Ctr, cid: str, image: str, *ctr_args: str, **fields: Any) -> Job:
    """Run ``ctr ARGS`` (which waits on task ``cid``) under a watcher; the job once the task runs."""
    job_dir: Path = ctx.state.job_dir
    spec = {"address": ctr.address, "namespace": ctr.namespace, "container": cid, "argv": ctr.argv(*ctr_args)}
    reply = launch(spec, job_dir, watch)
    return job_of(ctx, ctr, cid, image, reply["pid"], started_at(reply), log=str(job_dir / "log"), **fields)


def require_image(ctr: Ctr, image: str) -> None:
    if image not in ctr.images():
        raise JobNotFound(
            f"image {image} not found in containerd namespace {ctr.namespace}", hint="`ctr images import` it first"
        )


def require_free(ctr: Ctr, cid: str, dying: bool = False) -> None:
    """Refuse an id in use; a container of that id whose task is gone (a dumped job's) is
    removed. ``dying``: the task may be the restored job's own, killed after its dump and
    not gone yet; wait for that first."""
    if cid not in ctr.containers():
        return
    pid, status = ctr.tasks().get(cid, (0, "STOPPED"))
    if status != "STOPPED" and dying and wait_reaped(pid, KILLED_EXIT_S):
        status = ctr.tasks().get(cid, (0, "STOPPED"))[1]
    if status != "STOPPED":
        raise StateError(f"containerd container {cid} already exists ({status.lower()})", hint="choose another id")
    ctr.remove(cid)


def pause_again(ctr: Ctr, cid: str, pid: int) -> None:
    """Pause a task that CRIU left stopped, then continue it (SIGCONT), so that it runs once
    resumed. Stopped tasks must not be paused for a checkpoint: with the v1 freezer CRIU
    then hangs."""
    ctr.call("tasks", "pause", cid)
    signal_tree(pid, signal.SIGCONT)
