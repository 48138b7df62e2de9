"""The ``containerd`` plugin: containers of one containerd namespace.

A dump is containerd's own checkpoint of the task and its rw layer (``ctr c checkpoint
--task --rw``), written as an OCI archive into the store's image dir straight from
containerd's content store (``archive.py``), where it is compressed, chunked and hashed
like any checkpoint (:mod:`.checkpoint`), and then removed from containerd: the store holds it, so it can be
restored by any containerd that has the base image. A restore imports it back, with the
new container's own spec, and creates a new container and task from it (``ctr c restore
--live --rw``), the rw layer put back. As for runc, CRIU options go through
the CRIU configuration file named by the container's ``org.criu.config`` annotation,
set when we run the container: the network lock, ``leave-stopped`` (the container is
stopped, not killed, until its checkpoint is stored) and the CRIU options of a dump.

Every task we start or restore has a watcher (``watch.py``, launched like the runc
shim, :mod:`.tasks`): a ``ctr`` that waits on the task and exits with its status, which the watcher
records for the reaper. A new task writes the job log itself (``--log-uri``); ``ctr c
restore`` cannot give a restored task a log, so its watcher attaches to the task's IO
(``ctr tasks attach``) and appends it to the same job log.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import psutil

from cedana_ray import criu
from cedana_ray.errors import CedanaError, JobNotFound, StateError, UsageError
from cedana_ray.models import HealthCheck, Job, JobState
from cedana_ray.pipeline import Context
from cedana_ray.runtime import Runtime, require_gpu
from cedana_ray.spawn import LaunchError

from . import commands
from .checkpoint import checkpoint, prepare_dump, restore
from .client import Ctr
from .requests import ContainerdRunRequest
from .tasks import NAME, criu_config, ctr_of, job_of, require_free, require_image, watched_job


def env_file(job_dir: Path, env: dict[str, str]) -> Path:
    """The container's ``env`` as a 0600 file for ``ctr run --env-file``, which puts it in
    the container's spec: on ctr's command line, ``ps`` would show it to everyone while the
    task runs. One ``K=V`` a line, so a value cannot hold a newline."""
    if bad := [k for k, v in env.items() if "\n" in k + v]:
        raise UsageError(f"--env {bad[0]}: containerd takes no newline in an environment variable")
    path = job_dir / "env"
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write("".join(f"{k}={v}\n" for k, v in env.items()))
    return path


def run(ctx: Context) -> Job:
    """``ctr run`` (waiting, under a watcher) with our CRIU config annotation and the job log as its output."""
    req: ContainerdRunRequest = ctx.request
    ctr = ctr_of()
    require_image(ctr, req.image)
    require_free(ctr, req.container)
    conf = criu.write_config(criu_config(req.container))
    log = ctx.state.job_dir / "log"
    env = env_file(ctx.state.job_dir, req.env)
    args = ["run", "--annotation", f"{criu.CONFIG_ANNOTATION}={conf}", "--log-uri", f"file://{log}"]
    args += ["--env-file", str(env), *req.ctr_options(), req.image, req.container, *req.args]
    try:
        return watched_job(ctx, ctr, req.container, req.image, *args, state=JobState.running, command=req.cmd)
    except LaunchError as exc:
        raise UsageError(f"containerd could not start {req.container}: {exc}") from exc
    finally:
        env.unlink()  # ctr read it into the container's spec before the task started


def manage(ctx: Context) -> Job:
    """Adopt a container of our namespace that has a running or paused task."""
    ctr, cid = ctr_of(), ctx.request.target
    image = ctr.containers().get(cid)
    if image is None:
        raise JobNotFound(f"no containerd container {cid!r} in namespace {ctr.namespace}")
    pid, status = ctr.tasks().get(cid, (0, "STOPPED"))
    if status not in ("RUNNING", "PAUSED"):
        raise StateError(f"containerd container {cid} is {status.lower()}, not running")
    state = JobState.frozen if status == "PAUSED" else JobState.running
    started = psutil.Process(pid).create_time()
    return job_of(ctx, ctr, cid, image, pid, started, state=state, command=["ctr", "run", image, cid], managed=True)


def freeze(ctx: Context) -> None:
    ctr_of(ctx.job).call("tasks", "pause", ctx.job.details["target"])


def unfreeze(ctx: Context) -> None:
    ctr_of(ctx.job).call("tasks", "resume", ctx.job.details["target"])


def query(ctx: Context) -> list[dict[str, Any]]:
    """The containers of our namespace with their task (PID, status) and job."""
    ctr = ctr_of()
    jobs = {j.details["target"]: j.jid for j in ctx.request if j.details.get("namespace") == ctr.namespace}
    tasks = ctr.tasks()
    rows = []
    for cid, image in sorted(ctr.containers().items()):
        pid, status = tasks.get(cid, (None, "no task"))
        rows.append({"id": cid, "image": image, "status": status.lower(), "pid": pid, "jid": jobs.get(cid)})
    return rows


def health_checks() -> list[HealthCheck]:
    ctr = Ctr.from_env()
    try:
        server = ctr.call("version").split("Server:")[-1]
    except CedanaError as exc:
        return [HealthCheck(name="containerd", ok=False, fatal=False, detail=str(exc))]
    version = next((ln.split(":", 1)[1].strip() for ln in server.splitlines() if "Version:" in ln), "?")
    return [HealthCheck(name="containerd", ok=True, detail=f"containerd {version} at {ctr.address}")]


def stopped(job: Job) -> bool:
    """Whether containerd reports the task stopped (or gone): it reports a killed task running
    until its shim has reaped the task's init and handled the exit, after the init is dead."""
    return ctr_of(job).tasks().get(job.details["target"], (0, "STOPPED"))[1] == "STOPPED"


def cleanup(job: Job) -> None:
    """Task, container and snapshot (the kit then removes the job dir)."""
    ctr_of(job).remove(job.details["target"])


plugin = Runtime(
    NAME,
    run=run,  # the daemon runs the container: no Ray cluster is needed
    manage=manage,
    dump=checkpoint,
    restore=restore,
    freeze=freeze,
    unfreeze=unfreeze,
    query=query,
    run_middleware=[require_gpu],
    dump_middleware=[prepare_dump],
    commands=commands.COMMANDS,
    health_checks=health_checks,
    stopped=stopped,
    cleanup=cleanup,  # the reaper is the kit's: the exit status the task's watcher heard (128+N for signal N)
    supports_gpu=True,
)
