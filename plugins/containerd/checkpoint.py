"""Dump and restore of a containerd container: containerd's own checkpoint of the task and
its rw layer, exported as an OCI archive into the store's image dir (:mod:`.archive`), and
imported back with the new container's own spec."""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from cedana_ray import criu
from cedana_ray.errors import CedanaError, DumpError, RestoreError, StateError, UsageError
from cedana_ray.models import CriuOptions, Job, JobState, Name, OneLine
from cedana_ray.pipeline import Context, Handler

from .archive import Spec, export, own_cgroup, respec
from .client import Ctr
from .tasks import config_lines, criu_config, ctr_of, pause_again, require_free, require_image, watched_job

ARCHIVE = "checkpoint.tar"  # the exported checkpoint image, in the store's image dir


def container_info(ctr: Ctr, cid: str) -> dict[str, Any]:
    return json.loads(ctr.call("containers", "info", cid))


def prepare_dump(ctx: Context, next_: Handler) -> Any:
    """Load the container: its task's PID, image, snapshotter and CRIU config file."""
    job: Job = ctx.job
    ctr, cid = ctr_of(job), job.details["target"]
    pid, status = ctr.tasks().get(cid, (0, "STOPPED"))
    if status not in ("RUNNING", "PAUSED"):
        raise StateError(f"containerd container {cid} is {status.lower()}, not running")
    info = container_info(ctr, cid)
    annotations = (info.get("Spec") or {}).get("annotations") or {}
    ctx.state.pid = ctx.state.tree_root = pid
    ctx.state.own = annotations.get(criu.CONFIG_ANNOTATION)  # the CRIU config file we started it with, if any
    ctx.state.details = {
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
    ctr, cid = ctr_of(job), job.details["target"]
    paused = ctx.state.details["paused"]
    conf = ctx.state.own
    if conf:  # ours: CRIU leaves the task stopped for the core to kill once stored, or to pause again
        criu.write_config(Path(conf), *config_lines(req.criu, stopped=paused or not req.leave_running))
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
        _export(ctr, ref, ctx.state.images / ARCHIVE)
    except BaseException:
        if paused:
            pause_again(ctr, cid, ctx.state.pid)
        raise
    finally:
        if ref in ctr.images():
            ctr.call("images", "rm", ref)
    if paused and req.leave_running:
        pause_again(ctr, cid, ctx.state.pid)
    ctx.state.details["checkpoint_ref"] = ref


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


class RestoreFacts(BaseModel):
    """What a containerd checkpoint's details must hold to be restored."""

    container: Name
    image: OneLine
    checkpoint_ref: OneLine
    paused: bool = False


def restore(ctx: Context) -> Job:
    """Import the checkpoint image, give it the new container's own spec, and create a new
    container and task from it."""
    manifest = ctx.state.manifest
    details, ctr = manifest.facts(RestoreFacts), ctr_of()
    cid = details.container if ctx.state.jid == manifest.jid else ctx.state.jid
    require_image(ctr, details.image)
    require_free(ctr, cid, dying=True)
    # a paused task is restored stopped, so that it never runs before it is paused again
    stopped = ctx.state.leave_stopped or details.paused
    conf = criu.write_config(criu_config(cid), *config_lines(manifest.criu, stopped))
    ref, own = details.checkpoint_ref, f"{details.checkpoint_ref}-{cid}"
    archive, respecced = ctx.state.images / ARCHIVE, ctx.state.work / "spec.tar"

    def own_spec(spec: Spec) -> None:
        linux = spec.setdefault("linux", {})
        linux["cgroupsPath"] = own_cgroup(linux.get("cgroupsPath", ""), ctr.namespace, cid)
        spec.setdefault("annotations", {})[criu.CONFIG_ANNOTATION] = str(conf)

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
        if ctx.state.leave_stopped:  # the core continues it once its images are verified
            ctr.call("tasks", "pause", cid)
        else:
            pause_again(ctr, cid, job.pid)
        return job.model_copy(update={"state": JobState.frozen})
    return job


def _restore_task(ctx: Context, ctr: Ctr, cid: str, ref: str, image: str) -> Job:
    """``ctr c restore``, then a watcher attached to the task's IO."""
    said = ctr.call("containers", "restore", "--live", "--rw", cid, ref, error=RestoreError)
    # what the task wrote while `ctr c restore` still read its FIFOs, before the watcher attaches
    with open(ctx.state.job_dir / "log", "a") as log:
        log.write(said)
    command = ctx.state.command
    return watched_job(ctx, ctr, cid, image, "tasks", "attach", cid, state=JobState.running, command=command)
