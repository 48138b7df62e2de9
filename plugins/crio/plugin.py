"""The ``crio`` plugin: containers of a CRI runtime, through the CRI API.

Named after CRI-O, the column of the feature matrix we model, but it speaks only the
CRI (``runtime.v1.RuntimeService``), so it serves any CRI runtime that checkpoints:
CRI-O with CRIU support, containerd >= 2.0. Pods and containers are created by whoever
owns them (the kubelet, a test); cedana-ray adopts a container (``manage``/``dump crio ID``).

A dump is the runtime's own ``CheckpointContainer``: a tar archive (CRIU images, the rw
layer's diff, the container's config) written into the store's image dir, where it is
compressed, chunked and hashed like any checkpoint. CRI checkpoints leave the container
running; without ``--leave-running`` the core kills it once the checkpoint is stored.
A restore is ``CreateContainer`` with the archive's path as the image, then
``StartContainer``, into the pod the container came from while it is ready here, else
into a new pod made from the config the dump recorded (which we remove on cleanup).
The CRI has no pause and no CRIU options, so there is no freeze/unfreeze here and a
dump with CRIU options is refused.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import psutil
from pydantic import BaseModel

from cedana_ray.errors import CedanaError, DumpError, JobNotFound, RestoreError, StateError, UsageError
from cedana_ray.models import CriuOptions, HealthCheck, Job, JobState, Name, OneLine
from cedana_ray.pipeline import Context, Handler
from cedana_ray.runtime import Runtime

from . import commands
from .client import Cri, json_mapping, messages

NAME = "crio"
ARCHIVE = "checkpoint.tar"  # the runtime's checkpoint archive, in the store's image dir
RUNNING, EXITED = 1, 2  # runtime.v1.ContainerState
SANDBOX_READY = 0  # runtime.v1.PodSandboxState
REAP_WAIT_S = 2.0


def _cri(job: Job | None = None) -> Cri:
    return Cri(job.details["endpoint"]) if job else Cri.from_env()


def _live_status(cri: Cri, cid: str) -> tuple[Any, int]:
    """The container's status and host PID; refuses one that is not running."""
    status, info = cri.status(cid)
    if status.state != RUNNING:
        state = messages().ContainerState.Name(status.state).removeprefix("CONTAINER_").lower()
        raise StateError(f"CRI container {cid} is {state}, not running")
    if not info.get("pid"):
        raise StateError(f"the CRI runtime at {cri.endpoint} does not report the PID of container {cid}")
    return status, int(info["pid"])


def _job(ctx: Context, cri: Cri, cid: str, **fields: Any) -> Job:
    status, pid = _live_status(cri, cid)
    details = {
        "target": status.id,
        "endpoint": cri.endpoint,
        "name": status.metadata.name,
        "pod": _pod_of(cri, status.id),
        "image": status.image.image,
        "started": psutil.Process(pid).create_time(),
    }
    return Job(jid=ctx.state.jid, type=NAME, pid=pid, details=details, state=JobState.running, **fields)


def _pod_of(cri: Cri, cid: str) -> str:
    return next(c.pod_sandbox_id for c in cri.containers() if c.id == cid)


def manage(ctx: Context) -> Job:
    """Adopt a running container of the CRI endpoint (its full id, or a prefix the runtime accepts)."""
    cri = _cri()
    try:
        return _job(ctx, cri, ctx.request.target, managed=True, command=["cri", ctx.request.target])
    except JobNotFound:
        raise JobNotFound(f"no CRI container {ctx.request.target!r} at {cri.endpoint}") from None


def prepare_dump(ctx: Context, next_: Handler) -> Any:
    """Check the container runs and record what a restore needs: its name, pod and image."""
    req, job = ctx.request, ctx.job
    if req.criu != CriuOptions():
        raise UsageError("CRI CheckpointContainer takes no CRIU options", hint="dump without them")
    cri = _cri(job)
    status, pid = _live_status(cri, job.details["target"])
    ctx.state.pid = pid
    ctx.state.details = {
        "container": status.id,
        "name": status.metadata.name,
        "pod": job.details["pod"],
        "pod_config": json_mapping().MessageToDict(cri.pod(job.details["pod"])[1]),
        "own_pod": job.details.get("own_pod", False),  # a restore made it: whoever restores into it owns it
        "image": status.image.image,
        "image_ref": status.image_ref,
        "log": Path(status.log_path).name,
        "runtime": cri.runtime_name(),
    }
    return next_(ctx)


def checkpoint(ctx: Context) -> None:
    """CheckpointContainer into the image dir: the runtime writes the archive there itself."""
    job = ctx.job
    try:
        _cri(job).checkpoint(job.details["target"], str(ctx.state.images / ARCHIVE))
    except JobNotFound as exc:
        raise DumpError(str(exc)) from exc


def verify_first(ctx: Context, next_: Handler) -> Any:
    """Verify the archive before the runtime reads it. The core would verify an in-place
    checkpoint while the restored container sits stopped, but a CRI restore cannot leave
    it stopped: so an unverified archive never reaches the runtime."""
    if ctx.state.leave_stopped:
        ctx.state.store.verify(ctx.state.manifest, ctx.request.streams)
    return next_(ctx)


def _free_name(cri: Cri, pod_config: Any, name: str) -> None:
    """Remove the exited container of that name (the dumped one) from the pod, or from an
    earlier pod of the same name, where it still holds the name; refuse a live one."""
    pods = {p.id for p in cri.pods() if _same_pod(p.metadata, pod_config.metadata)}
    for c in cri.containers():
        if c.pod_sandbox_id in pods and c.metadata.name == name:
            if c.state == RUNNING and not _wait_exited(cri, c.id):  # the dump's kill may be in flight
                raise StateError(
                    f"CRI container {name} is running in pod {c.pod_sandbox_id}", hint="restore a clone with --jid NEW"
                )
            cri.remove(c.id)


class RestoreFacts(BaseModel):
    """What a CRI checkpoint's details must hold to be restored."""

    name: Name
    pod: OneLine
    log: Name  # relative to the pod's log directory
    pod_config: dict[str, Any] | None = None
    own_pod: bool = False


def restore(ctx: Context) -> Job:
    """CreateContainer from the checkpoint archive in its pod (or a new one), then StartContainer."""
    manifest = ctx.state.manifest
    details, cri = manifest.details, _cri()
    name = manifest.facts(RestoreFacts).name if ctx.state.jid == manifest.jid else ctx.state.jid
    pod, pod_config, new_pod = _pod_for(cri, details)
    try:
        _free_name(cri, pod_config, name)
        job = _create(ctx, cri, pod, pod_config, name)
    except BaseException:
        if new_pod:
            cri.remove_pod(pod)
        raise
    own = new_pod or (pod == details["pod"] and details.get("own_pod", False))
    return job.model_copy(update={"details": {**job.details, "own_pod": own}})


def _create(ctx: Context, cri: Cri, pod: str, pod_config: Any, name: str) -> Job:
    manifest = ctx.state.manifest
    pb = messages()
    config = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=name),
        image=pb.ImageSpec(image=str(ctx.state.images / ARCHIVE)),
        log_path=manifest.details["log"] if name == manifest.details["name"] else f"{name}.log",
    )
    try:
        cid = cri.create(pod, config, pod_config)
        cri.start(cid)
        return _job(ctx, cri, cid, command=ctx.state.command)
    except (JobNotFound, StateError) as exc:
        raise RestoreError(f"restore of checkpoint {manifest.checkpoint} as {name} failed: {exc}") from exc


def _pod_for(cri: Cri, details: dict[str, Any]) -> tuple[str, Any, bool]:
    """The container's pod while it is ready here; else a new pod from the config the dump
    recorded (the pod was removed, or this is another node), with the next attempt number
    of its name here, as the kubelet counts. (pod id, its config, whether it is new)"""
    with contextlib.suppress(JobNotFound):
        status, config = cri.pod(details["pod"])
        if status.state == SANDBOX_READY:
            return details["pod"], config, False
    if "pod_config" not in details:
        raise RestoreError(f"pod sandbox {details['pod']} is not ready, and the checkpoint does not describe it")
    config = json_mapping().ParseDict(details["pod_config"], messages().PodSandboxConfig())
    meta = config.metadata
    attempts = [p.metadata.attempt for p in cri.pods() if _same_pod(p.metadata, meta)]
    if attempts:
        meta.attempt = max(attempts) + 1
    return cri.run_pod(config), config, True


def _same_pod(a: Any, b: Any) -> bool:
    return (a.name, a.namespace, a.uid) == (b.name, b.namespace, b.uid)


def query(ctx: Context) -> list[dict[str, Any]]:
    """The containers of the endpoint with their pod, image, state and job."""
    cri = _cri()
    jobs = {j.details["target"]: j.jid for j in ctx.request if j.details.get("endpoint") == cri.endpoint}
    states = messages().ContainerState
    return [
        {
            "id": c.id,
            "name": c.metadata.name,
            "pod": c.pod_sandbox_id,
            "image": c.image.image,
            "state": states.Name(c.state).removeprefix("CONTAINER_").lower(),
            "jid": jobs.get(c.id),
        }
        for c in sorted(cri.containers(), key=lambda c: c.created_at)
    ]


def _wait_exited(cri: Cri, cid: str) -> Any | None:
    """The container's status once the runtime has seen it exit, or None if it still runs
    after REAP_WAIT_S. A process we saw die (or SIGKILLed after a dump) can be reported
    running for a moment, until the runtime's shim has reaped it."""
    deadline = time.monotonic() + REAP_WAIT_S
    while True:
        status, _ = cri.status(cid)
        if status.state == EXITED:
            return status
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def reaper(job: Job) -> int | None:
    """The exit code the runtime recorded (asked as soon as the PID is gone)."""
    try:
        status = _wait_exited(_cri(job), job.details["target"])
    except (JobNotFound, StateError):
        return None
    return status.exit_code if status else None


def health_checks() -> list[HealthCheck]:
    """The endpoint answers, and whether its runtime implements CheckpointContainer."""
    cri = Cri.from_env()
    try:
        v = cri.version()
    except (CedanaError, ImportError) as exc:  # the cri extra missing, or the endpoint silent: the finding
        return [HealthCheck(name="cri endpoint", ok=False, fatal=False, detail=str(exc))]
    runtime = f"{v.runtime_name} {v.runtime_version} (CRI {v.runtime_api_version}) at {cri.endpoint}"
    checks = [HealthCheck(name="cri endpoint", ok=True, detail=runtime)]
    try:
        cri.probe_checkpoint()
    except CedanaError as exc:
        return [*checks, HealthCheck(name="cri checkpoint", ok=False, fatal=False, detail=str(exc))]
    return [*checks, HealthCheck(name="cri checkpoint", ok=True, detail="CheckpointContainer is implemented")]


def cleanup(job: Job) -> None:
    """Remove the container from the runtime, and its pod where a restore made it (the kit
    then removes the job dir)."""
    cri = _cri(job)
    cri.remove(job.details["target"])
    if job.details.get("own_pod"):
        cri.remove_pod(job.details["pod"])


# what the k8s plugin reuses to dump and restore a pod's containers (plugins/k8s/containers.py)
container_job = _job
cri_of = _cri
pod_of = _pod_of
free_name = _free_name
same_pod = _same_pod


plugin = Runtime(
    NAME,
    manage=manage,
    dump=checkpoint,
    restore=restore,
    query=query,
    dump_middleware=[prepare_dump],
    restore_middleware=[verify_first],
    commands=commands.COMMANDS,
    health_checks=health_checks,
    reaper=reaper,
    cleanup=cleanup,
)
