"""Hook implementations of the ``containerd`` plugin: containers of one containerd namespace.

A dump is containerd's own checkpoint of the task and its rw layer (``ctr c checkpoint
--task --rw``), written as an OCI archive into the store's image dir straight from
containerd's content store (``archive.py``), where it is compressed, chunked and hashed
like any checkpoint, and then removed from containerd: the store holds it, so it can be
restored by any containerd that has the base image. A restore imports it back, with the
new container's own spec, and creates a new container and task from it (``ctr c restore
--live --rw``), the rw layer put back. As for runc, CRIU options go through
the CRIU configuration file named by the container's ``org.criu.config`` annotation,
set when we run the container: the network lock, ``leave-stopped`` (the container is
stopped, not killed, until its checkpoint is stored) and the CRIU options of a dump.

Every task we start or restore has a watcher (``watch.py``, launched like the runc
shim): a ``ctr`` that waits on the task and exits with its status, which the watcher
records for the reaper. A new task writes the job log itself (``--log-uri``); ``ctr c
restore`` cannot give a restored task a log, so its watcher attaches to the task's IO
(``ctr tasks attach``) and appends it to the same job log.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
from pathlib import Path
from typing import Any

import click
import psutil
from cedana_ray.plugins.gpu import (  # noqa: F401 (hooks)
    cedana_gpu_interception,
    cedana_gpu_interception_restore,
    cedana_gpu_tracing,
    cedana_gpu_tracing_restore,
    require_gpu,
)
from cedana_ray.plugins.process.launch import LaunchError, launch, recorded_exit, started_at
from cedana_ray.plugins.runc.runtime import CRIU_CONFIG_ANNOTATION, write_criu_config
from pydantic import BaseModel, Field

from cedana_ray import criu
from cedana_ray.config import paths
from cedana_ray.errors import CedanaError, DumpError, JobNotFound, RestoreError, StateError, UsageError
from cedana_ray.hookspecs import hookimpl
from cedana_ray.models import CriuOptions, HealthCheck, Job, JobState, Name, OneLine
from cedana_ray.pipeline import Context, Handler, Middleware
from cedana_ray.proctree import signal_tree, wait_reaped
from cedana_ray.requests import RunRequest

from . import commands, watch
from .archive import Spec, export, own_cgroup, respec
from .client import Ctr

NAME = "containerd"
ARCHIVE = "checkpoint.tar"  # the exported checkpoint image, in the store's image dir
REAP_GRACE_S = 2.0  # how long a watcher may take to record an exit
KILLED_EXIT_S = 5.0  # how long a killed task may take to exit and be reaped


class BindMount(BaseModel):
    source: str  # a host path
    destination: str  # where it appears in the container
    readonly: bool = False
    recursive: bool = True  # with the mounts under ``source``

    def ctr_option(self) -> str:
        kind, mode = "rbind" if self.recursive else "bind", "ro" if self.readonly else "rw"
        return f"type=bind,src={self.source},dst={self.destination},options={kind}:{mode}"


class ContainerdRunRequest(RunRequest):
    """``run containerd``: the image and the container id, and what the container gets
    besides the image's own settings (``cmd`` only describes it; ``env`` and ``cwd`` are
    the container's)."""

    image: str
    container: str
    snapshotter: str | None = None
    args: list[str] = Field(default_factory=list)  # the command; default the image's
    mounts: list[BindMount] = Field(default_factory=list)
    devices: list[str] = Field(default_factory=list)  # host device nodes, or directories of them

    def ctr_options(self) -> list[str]:
        """The ``ctr run`` options that give the container those but ``env`` (see
        :func:`env_file`); ``gpu``: the NVIDIA device nodes."""
        from cedana_ray.plugins.gpu import nvml

        devices = [*self.devices, *(nvml.device_nodes() if self.gpu else [])]
        options = [("--cwd", self.cwd)] if self.cwd else []
        options += [("--mount", m.ctr_option()) for m in self.mounts]
        options += [("--device", d) for d in devices]
        options += [("--snapshotter", self.snapshotter)] if self.snapshotter else []
        return [arg for option in options for arg in option]


def _ctr(job: Job | None = None) -> Ctr:
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


def _job(ctx: Context, ctr: Ctr, cid: str, image: str, pid: int, started: float, **fields: Any) -> Job:
    details = {"target": cid, "address": ctr.address, "namespace": ctr.namespace, "image": image, "started": started}
    return Job(jid=ctx.state["jid"], type=NAME, pid=pid, details=details, **fields)


def _watched_job(ctx: Context, ctr: Ctr, cid: str, image: str, *ctr_args: str, **fields: Any) -> Job:
    """Run ``ctr ARGS`` (which waits on task ``cid``) under a watcher; the job once the task runs."""
    job_dir: Path = ctx.state["job_dir"]
    log, exit_file = job_dir / "log", job_dir / "exit.json"
    spec = {"address": ctr.address, "namespace": ctr.namespace, "container": cid, "argv": ctr.argv(*ctr_args)}
    reply = launch({**spec, "log": str(log), "exit_file": str(exit_file)}, job_dir, watch)
    return _job(ctx, ctr, cid, image, reply["pid"], started_at(reply), log=str(log), **fields)


def _require_image(ctr: Ctr, image: str) -> None:
    if image not in ctr.images():
        raise JobNotFound(
            f"image {image} not found in containerd namespace {ctr.namespace}", hint="`ctr images import` it first"
        )


def _require_free(ctr: Ctr, cid: str, dying: bool = False) -> None:
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
    ctr = _ctr()
    _require_image(ctr, req.image)
    _require_free(ctr, req.container)
    conf = write_criu_config(criu_config(req.container))
    log = ctx.state["job_dir"] / "log"
    env = env_file(ctx.state["job_dir"], req.env)
    args = ["run", "--annotation", f"{CRIU_CONFIG_ANNOTATION}={conf}", "--log-uri", f"file://{log}"]
    args += ["--env-file", str(env), *req.ctr_options(), req.image, req.container, *req.args]
    try:
        return _watched_job(ctx, ctr, req.container, req.image, *args, state=JobState.running, command=req.cmd)
    except LaunchError as exc:
        raise UsageError(f"containerd could not start {req.container}: {exc}") from exc
    finally:
        env.unlink()  # ctr read it into the container's spec before the task started


def manage(ctx: Context) -> Job:
    """Adopt a container of our namespace that has a running or paused task."""
    ctr, cid = _ctr(), ctx.request.target
    image = ctr.containers().get(cid)
    if image is None:
        raise JobNotFound(f"no containerd container {cid!r} in namespace {ctr.namespace}")
    pid, status = ctr.tasks().get(cid, (0, "STOPPED"))
    if status not in ("RUNNING", "PAUSED"):
        raise StateError(f"containerd container {cid} is {status.lower()}, not running")
    state = JobState.frozen if status == "PAUSED" else JobState.running
    started = psutil.Process(pid).create_time()
    return _job(ctx, ctr, cid, image, pid, started, state=state, command=["ctr", "run", image, cid], managed=True)


def _container_info(ctr: Ctr, cid: str) -> dict[str, Any]:
    return json.loads(ctr.call("containers", "info", cid))


def prepare_dump(ctx: Context, next_: Handler) -> Any:
    """Load the container: its task's PID, image, snapshotter and CRIU config file."""
    job: Job = ctx.job
    ctr, cid = _ctr(job), job.details["target"]
    pid, status = ctr.tasks().get(cid, (0, "STOPPED"))
    if status not in ("RUNNING", "PAUSED"):
        raise StateError(f"containerd container {cid} is {status.lower()}, not running")
    info = _container_info(ctr, cid)
    annotations = (info.get("Spec") or {}).get("annotations") or {}
    ctx.state.update(pid=pid, tree_root=pid, criu_config=annotations.get(CRIU_CONFIG_ANNOTATION))
    ctx.state["details"] = {
        "container": cid,
        "image": info["Image"],
        "snapshotter": info["Snapshotter"],
        "paused": status == "PAUSED",
        "namespace": ctr.namespace,
    }
    return next_(ctx)


def checkpoint(ctx: Context) -> None:
    """Checkpoint task and rw layer as a containerd image, export it into the image dir.

    containerd pauses the task for its checkpoint and refuses one that is paused already
    (a frozen job, e.g. one being migrated): such a task is resumed for the checkpoint,
    which CRIU leaves stopped, and paused again after it.
    """
    req, job = ctx.request, ctx.job
    ctr, cid = _ctr(job), job.details["target"]
    paused = ctx.state["details"]["paused"]
    conf = ctx.state.get("criu_config")
    if conf:  # ours: CRIU leaves the task stopped for the core to kill once stored, or to pause again
        write_criu_config(Path(conf), *config_lines(req.criu, stopped=paused or not req.leave_running))
    elif paused:
        raise StateError(f"containerd cannot checkpoint container {cid} while it is frozen", hint="unfreeze it first")
    elif req.criu != CriuOptions() or not req.leave_running:
        raise UsageError(
            f"container {cid} was not started by cedana-ray: only --leave-running dumps without CRIU options"
        )
    ref = f"cedana-ray.local/checkpoint/{cid}:{secrets.token_hex(4)}"
    if paused:
        ctr.call("tasks", "resume", cid, error=DumpError)
    try:
        _checkpoint(ctr, cid, ref)
        _export(ctr, ref, ctx.state["images"] / ARCHIVE)
    except BaseException:
        if paused:
            _pause_again(ctr, cid, ctx.state["pid"])
        raise
    finally:
        if ref in ctr.images():
            ctr.call("images", "rm", ref)
    if paused and req.leave_running:
        _pause_again(ctr, cid, ctx.state["pid"])
    ctx.state["details"]["checkpoint_ref"] = ref


def _checkpoint(ctr: Ctr, cid: str, ref: str) -> None:
    """``ctr c checkpoint``; where CRIU failed, the first error of CRIU's log (runc names only the log)."""
    try:
        ctr.call("containers", "checkpoint", "--task", "--rw", cid, ref, error=DumpError)
    except DumpError as exc:
        found = re.search(r"path= ?(\S+\.log)", str(exc))
        log = Path(found.group(1)) if found else None
        if detail := log and criu.first_error(log):
            raise DumpError(f"checkpoint of containerd container {cid} failed: CRIU {detail} (log: {log})") from exc
        raise


def _export(ctr: Ctr, ref: str, dest: Path) -> None:
    try:
        export(ctr.content_root(), ref, ctr.image(ref), dest)
    except OSError as exc:
        raise DumpError(f"cannot copy checkpoint {ref} out of containerd's content store: {exc}") from exc


def _pause_again(ctr: Ctr, cid: str, pid: int) -> None:
    """Pause a task that CRIU left stopped, then continue it (SIGCONT), so that it runs once
    resumed. Stopped tasks must not be paused for a checkpoint: with the v1 freezer CRIU
    then hangs."""
    ctr.call("tasks", "pause", cid)
    signal_tree(pid, signal.SIGCONT)


class RestoreFacts(BaseModel):
    """What a containerd checkpoint's details must hold to be restored."""

    container: Name
    image: OneLine
    checkpoint_ref: OneLine
    paused: bool = False


def restore(ctx: Context) -> Job:
    """Import the checkpoint image, give it the new container's own spec, and create a new
    container and task from it."""
    manifest = ctx.state["manifest"]
    details, ctr = manifest.facts(RestoreFacts), _ctr()
    cid = details.container if ctx.state["jid"] == manifest.jid else ctx.state["jid"]
    _require_image(ctr, details.image)
    _require_free(ctr, cid, dying=True)
    # a paused task is restored stopped, so that it never runs before it is paused again
    stopped = ctx.state.get("leave_stopped") or details.paused
    conf = write_criu_config(criu_config(cid), *config_lines(manifest.criu, stopped))
    ref, own = details.checkpoint_ref, f"{details.checkpoint_ref}-{cid}"
    archive, respecced = ctx.state["images"] / ARCHIVE, ctx.state["work"] / "spec.tar"

    def own_spec(spec: Spec) -> None:
        linux = spec.setdefault("linux", {})
        linux["cgroupsPath"] = own_cgroup(linux.get("cgroupsPath", ""), ctr.namespace, cid)
        spec.setdefault("annotations", {})[CRIU_CONFIG_ANNOTATION] = str(conf)

    try:
        respec(archive, respecced, own, own_spec)
        for tar in (archive, respecced):
            ctr.call("images", "import", "--no-unpack", str(tar), error=RestoreError)
        job = _restore_task(ctx, ctr, cid, own, details.image)
    except (CedanaError, OSError, KeyError, ValueError) as exc:
        if cid in ctr.containers():  # half restored (a task that never ran), or unwatched
            ctr.remove(cid)
        raise RestoreError(f"restore of checkpoint {manifest.checkpoint} as {cid} failed: {exc}") from exc
    finally:
        images = ctr.images()
        for name in {ref, own} & images:
            ctr.call("images", "rm", name)
    if details.paused:
        if ctx.state.get("leave_stopped"):  # the core continues it once its images are verified
            ctr.call("tasks", "pause", cid)
        else:
            _pause_again(ctr, cid, job.pid)
        return job.model_copy(update={"state": JobState.frozen})
    return job


def _restore_task(ctx: Context, ctr: Ctr, cid: str, ref: str, image: str) -> Job:
    """``ctr c restore``, then a watcher attached to the task's IO."""
    said = ctr.call("containers", "restore", "--live", "--rw", cid, ref, error=RestoreError)
    # what the task wrote while `ctr c restore` still read its FIFOs, before the watcher attaches
    with open(ctx.state["job_dir"] / "log", "a") as log:
        log.write(said)
    command = ctx.state.get("command", [])
    return _watched_job(ctx, ctr, cid, image, "tasks", "attach", cid, state=JobState.running, command=command)


def freeze(ctx: Context) -> None:
    _ctr(ctx.job).call("tasks", "pause", ctx.job.details["target"])


def unfreeze(ctx: Context) -> None:
    _ctr(ctx.job).call("tasks", "resume", ctx.job.details["target"])


def query(ctx: Context) -> list[dict[str, Any]]:
    """The containers of our namespace with their task (PID, status) and job."""
    ctr = _ctr()
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


@hookimpl
def cedana_run_handler_serverless() -> Handler:
    return run  # the daemon runs the container: no Ray cluster is needed


@hookimpl
def cedana_run_middleware() -> list[Middleware]:
    return [require_gpu]


@hookimpl
def cedana_manage_handler() -> Handler:
    return manage


@hookimpl
def cedana_dump_middleware() -> list[Middleware]:
    return [prepare_dump]


@hookimpl
def cedana_dump_handler() -> Handler:
    return checkpoint


@hookimpl
def cedana_restore_handler() -> Handler:
    return restore


@hookimpl
def cedana_freeze_handler() -> Handler:
    return freeze


@hookimpl
def cedana_unfreeze_handler() -> Handler:
    return unfreeze


@hookimpl
def cedana_query_handler() -> Handler:
    return query


@hookimpl
def cedana_kill_signal() -> int:
    return signal.SIGKILL  # a container's init ignores signals it has no handler for


@hookimpl
def cedana_stopped(job: Job) -> bool:
    """Whether containerd reports the task stopped (or gone): it reports a killed task running
    until its shim has reaped the task's init and handled the exit, after the init is dead."""
    return _ctr(job).tasks().get(job.details["target"], (0, "STOPPED"))[1] == "STOPPED"


@hookimpl
def cedana_cleanup(job: Job) -> None:
    """Task, container and snapshot, then the job dir."""
    _ctr(job).remove(job.details["target"])
    if job.log:
        shutil.rmtree(Path(job.log).parent, ignore_errors=True)


@hookimpl
def cedana_reaper(job: Job) -> int | None:
    """The exit status the task's watcher heard from containerd (128+N for signal N)."""
    if not job.log:
        return None  # adopted: no watcher of ours
    return recorded_exit(os.path.join(os.path.dirname(job.log), "exit.json"), job.pid, REAP_GRACE_S)


@hookimpl
def cedana_health_checks() -> list[HealthCheck]:
    return health_checks()


@hookimpl
def cedana_run_command() -> click.Command:
    return commands.run


@hookimpl
def cedana_manage_command() -> click.Command:
    return commands.manage


@hookimpl
def cedana_dump_command() -> click.Command:
    return commands.dump


@hookimpl
def cedana_restore_command() -> click.Command:
    return commands.restore


@hookimpl
def cedana_freeze_command() -> click.Command:
    return commands.freeze


@hookimpl
def cedana_unfreeze_command() -> click.Command:
    return commands.unfreeze


@hookimpl
def cedana_query_command() -> click.Command:
    return commands.query
