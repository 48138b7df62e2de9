"""The ``runc`` plugin: OCI containers run by runc, C/R'd through it.

Why ``runc checkpoint --image-path`` and not CRIU directly: runc already knows
everything a container dump needs (its mounts, masked and read-only paths, external
namespaces, cgroups, the devices it created, the stdio it must re-attach) and keeps
that knowledge in step with its own way of creating containers; doing it again
beside runc would duplicate runc's libcontainer and drift from it. runc writes the
images into the directory our store hands out, and the store compresses, chunks,
hashes and uploads them and writes the manifest, as for any other job. What runc
cannot be told on its command line (the nftables network lock where there is no
iptables-restore, ``leave-stopped``) goes through the CRIU configuration file named by
the container's ``org.criu.config`` annotation: containers we start or restore run
from a copy of their bundle's config.json that carries that annotation.

A dump stops the container without killing it (CRIU ``leave-stopped`` with runc's
``--leave-running``), so a failure to store the checkpoint resumes it; the core kills
it once the checkpoint is stored. Containers adopted with ``manage`` have no such
annotation, and ``runc checkpoint`` kills them itself once dumped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from pydantic import BaseModel

from cedana_ray import criu
from cedana_ray.errors import CedanaError, DumpError, RestoreError, StateError, UsageError
from cedana_ray.models import AbsolutePath, CriuOptions, Job, JobState, Name
from cedana_ray.pipeline import Context, Handler
from cedana_ray.proctree import wait_reaped
from cedana_ray.requests import RestoreRequest, RunRequest
from cedana_ray.runtime import Runtime
from cedana_ray.spawn import LaunchError, launch, started_at

from . import commands, health, shim
from .runtime import Runc, default_root, derive_bundle, load_bundle

NAME = "runc"
KILLED_EXIT_S = 5.0  # how long a killed container may take to exit and be reaped


class RuncRunRequest(RunRequest):
    """``run runc``: the bundle and the container id (``cmd`` only describes it)."""

    bundle: str
    container: str


class RuncRestoreRequest(RestoreRequest):
    """``restore runc``: optionally another bundle than the one recorded at the dump."""

    bundle: str | None = None


def _runc(job: Job | None = None) -> Runc:
    return Runc(Path(job.details["root"])) if job else Runc(default_root())


def _container(job: Job) -> str:
    return job.details["target"]


def _own_bundle(job_dir: Path, bundle: Path, cid: str, leave_stopped: bool = False) -> Path:
    """A copy of ``bundle`` in the job dir whose CRIU config file is ours, written now."""
    conf = criu.write_config(job_dir / "criu.conf", *(["leave-stopped"] if leave_stopped else []))
    root_tag = hashlib.sha256(str(default_root()).encode()).hexdigest()[:8]
    return derive_bundle(bundle, job_dir / "bundle", conf, f"/cedana-ray/{root_tag}/{cid}")


def _start(ctx: Context, cid: str, bundle: Path, runc_args: list[str]) -> tuple[dict[str, Any], Runc]:
    """Run ``runc ARGS --bundle BUNDLE CID`` under a shim; its reply and our runc."""
    job_dir: Path = ctx.state.job_dir
    runc = _runc()
    log = job_dir / "runc.log"
    argv = runc.argv("--log", str(log), "--log-format", "json", *runc_args)
    argv += ["--pid-file", str(job_dir / "init.pid"), "--bundle", str(bundle), cid]
    spec = {"argv": argv, "pid_file": str(job_dir / "init.pid"), "runc_log": str(log)}
    return launch(spec, job_dir, shim), runc


def _job(ctx: Context, reply: dict[str, Any], runc: Runc, cid: str, bundle: Path, **fields: Any) -> Job:
    details = {"started": started_at(reply), "target": cid, "root": str(runc.root), "bundle": str(bundle)}
    log = str(ctx.state.job_dir / "log")
    return Job(jid=ctx.state.jid, type=NAME, pid=reply["pid"], log=log, details=details, **fields)


def _require_free(runc: Runc, cid: str, dying: bool = False) -> None:
    """Refuse an id in use; a stopped container of that id (a dumped job's) is removed.
    ``dying``: the container may be the restored job's own, killed after its dump and
    not gone yet; wait for that first."""
    try:
        state = runc.state(cid)
    except CedanaError:
        return
    status = state["status"]
    if status != "stopped" and dying and wait_reaped(state["pid"], KILLED_EXIT_S):
        status = runc.state(cid)["status"]
    if status != "stopped":
        raise StateError(f"runc container {cid} already exists ({status})", hint="choose another id")
    runc.delete(cid)


def run(ctx: Context) -> Job:
    """Create and start the container under a shim."""
    req: RuncRunRequest = ctx.request
    bundle = Path(req.bundle).resolve()
    load_bundle(bundle)
    _require_free(_runc(), req.container)
    try:
        reply, runc = _start(
            ctx, req.container, _own_bundle(ctx.state.job_dir, bundle, req.container), ["run", "--detach"]
        )
    except LaunchError as exc:
        raise UsageError(f"runc could not start {req.container}: {exc}") from exc
    return _job(ctx, reply, runc, req.container, bundle, state=JobState.running, command=req.cmd)


def manage(ctx: Context) -> Job:
    """Adopt a running container under our runc root."""
    cid = ctx.request.target
    runc = _runc()
    state = runc.live_state(cid)
    details = {"target": cid, "root": str(runc.root), "bundle": state["bundle"]}
    details["started"] = psutil.Process(state["pid"]).create_time()
    frozen = state["status"] == "paused"
    return Job(
        jid=ctx.state.jid,
        type=NAME,
        pid=state["pid"],
        state=JobState.frozen if frozen else JobState.running,
        command=["runc", "run", "--bundle", state["bundle"], cid],
        managed=True,
        details=details,
    )


def prepare_dump(ctx: Context, next_: Handler) -> Any:
    """Find the container's init and record what a restore needs: bundle, rootfs,
    namespaces, mounts, masked paths and cgroups, as runc runs it now."""
    job: Job = ctx.job
    runc = _runc(job)
    state = runc.live_state(_container(job))
    spec = load_bundle(Path(state["bundle"]))
    linux = spec.get("linux", {})
    ctx.state.pid = ctx.state.tree_root = state["pid"]
    ctx.state.own = spec.get("annotations", {}).get(criu.CONFIG_ANNOTATION)  # our CRIU config file, if any
    ctx.state.details = {
        "container": _container(job),
        "bundle": job.details.get("bundle") or state["bundle"],
        "rootfs": state["rootfs"],
        "paused": state["status"] == "paused",
        "namespaces": [ns["type"] for ns in linux.get("namespaces", [])],
        "mounts": [m["destination"] for m in spec.get("mounts", [])],
        "masked_paths": linux.get("maskedPaths", []),
        "cgroups_path": linux.get("cgroupsPath"),
    }
    return next_(ctx)


def criu_args(opts: CriuOptions) -> list[str]:
    """runc's flags for the CRIU options of a dump (a restore must repeat them)."""
    if opts.external:
        raise UsageError("runc checkpoint takes no --external resources")
    flags = {"--tcp-established": opts.tcp_established, "--file-locks": opts.file_locks}
    return [flag for flag, on in {**flags, "--shell-job": opts.shell_job}.items() if on]


def checkpoint(ctx: Context) -> None:
    """``runc checkpoint`` into the store's image dir; the container is left stopped, not killed."""
    req, job = ctx.request, ctx.job
    args = ["checkpoint", "--image-path", str(ctx.state.images), "--work-path", str(ctx.state.work)]
    if conf := ctx.state.own:  # ours: CRIU stops the tree instead of killing it
        criu.write_config(Path(conf), *([] if req.leave_running else ["leave-stopped"]))
        args.append("--leave-running")
    elif req.leave_running:
        args.append("--leave-running")
    try:
        _runc(job).call(*args, *criu_args(req.criu), _container(job), error=DumpError)
    except DumpError as exc:
        detail = criu.first_error(ctx.state.work / "dump.log")
        raise DumpError(f"runc checkpoint of {_container(job)} failed: {detail or exc}") from exc


class RestoreFacts(BaseModel):
    """What a runc checkpoint's details must hold to be restored."""

    container: Name
    bundle: AbsolutePath


@dataclass
class RestoreTarget:
    """Where a restore puts the container (its middleware's choice, for its handler)."""

    bundle: Path  # the bundle it was dumped with, or the one the restore names
    container: str  # its id: the checkpoint's, or a clone's job id
    own_bundle: Path = Path()  # the restored container's copy of the bundle, in its job dir


def prepare_restore(ctx: Context, next_: Handler) -> Job:
    """Choose the bundle and the container id, and check both before CRIU runs.

    A restore under the checkpoint's own job id gets the container's id back; a clone
    (``--jid NEW``) becomes container NEW.
    """
    manifest = ctx.state.manifest
    facts = manifest.facts(RestoreFacts)
    override = getattr(ctx.request, "bundle", None)
    bundle = Path(override or facts.bundle).resolve()
    load_bundle(bundle)
    cid = facts.container if ctx.state.jid == manifest.jid else ctx.state.jid
    _require_free(_runc(), cid, dying=True)
    ctx.state.own = RestoreTarget(bundle, cid)
    return next_(ctx)


def write_restore_config(ctx: Context, next_: Handler) -> Job:
    """Just before CRIU: the bundle copy and CRIU config file of the restored container
    (``leave-stopped`` when the core verifies the images while CRIU restores). Late, so
    that nothing is written into the job dir until every earlier check has passed."""
    placed: RestoreTarget = ctx.state.own
    placed.own_bundle = _own_bundle(ctx.state.job_dir, placed.bundle, placed.container, ctx.state.leave_stopped)
    return next_(ctx)


def image_dir(images: Path) -> Path:
    """Where CRIU should read the images: the store's own directory when ``images`` only
    links to it (an uncompressed local checkpoint). CRIU reads some images after entering
    the container's mount namespace, where absolute links from the host do not resolve."""
    targets = {p.resolve().parent for p in images.iterdir() if p.is_symlink()}
    if len(targets) == 1 and all(p.is_symlink() for p in images.iterdir()):
        return targets.pop()
    return images


def restore(ctx: Context) -> Job:
    """``runc restore --detach`` under a new shim, from the fetched images."""
    manifest, work = ctx.state.manifest, ctx.state.work
    placed: RestoreTarget = ctx.state.own
    cid, bundle = placed.container, placed.bundle
    args = ["restore", "--detach", "--image-path", str(image_dir(ctx.state.images)), "--work-path", str(work)]
    try:
        reply, runc = _start(ctx, cid, placed.own_bundle, [*args, *criu_args(manifest.criu)])
    except LaunchError as exc:
        detail = criu.first_error(work / "restore.log") or str(exc)
        raise RestoreError(f"restore of checkpoint {manifest.checkpoint} as {cid} failed: {detail}") from exc
    state = JobState.running
    if manifest.details.get("paused"):  # paused when dumped: paused again (CRIU restores it thawed)
        runc.call("pause", cid)
        state = JobState.frozen
    return _job(ctx, reply, runc, cid, bundle, state=state, command=ctx.state.command)


def freeze(ctx: Context) -> None:
    _runc(ctx.job).call("pause", _container(ctx.job))


def unfreeze(ctx: Context) -> None:
    _runc(ctx.job).call("resume", _container(ctx.job))


def query(ctx: Context) -> list[dict[str, Any]]:
    """The containers under our runc root, with their job where they have one."""
    jobs = {(j.details.get("root"), _container(j)): j for j in ctx.request}
    runc = _runc()
    rows = []
    for c in runc.containers():
        job = jobs.get((str(runc.root), c["id"]))
        row = {"id": c["id"], "status": c["status"], "pid": c["pid"] or None, "bundle": c["bundle"]}
        rows.append({**row, "created": c["created"], "jid": job.jid if job else None})
    return rows


def cleanup(job: Job) -> None:
    """``runc delete`` the container (the kit then removes its job dir: bundle copy, log, shim files)."""
    _runc(job).delete(_container(job))


plugin = Runtime(
    NAME,
    run=run,
    manage=manage,
    dump=checkpoint,
    restore=restore,
    freeze=freeze,
    unfreeze=unfreeze,
    query=query,
    dump_middleware=[prepare_dump],
    restore_middleware=[prepare_restore],
    restore_middleware_late=[write_restore_config],
    commands=commands.COMMANDS,
    health_checks=health.checks,
    cleanup=cleanup,
    supports_gpu=True,
)
