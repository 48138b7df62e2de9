"""The ``k8s`` job type: a container of a Kubernetes pod, checkpointed through the node's CRI.

A pod's container is a ``crio`` container that the kubelet labelled, so its dump is the
``crio`` plugin's (its middleware and handler: ``CheckpointContainer`` into the image dir),
with the pod's identity recorded beside, and, asked for, the archive exported as an OCI
checkpoint image (:mod:`.image`). A restore brings it back into the pod as the kubelet would
make it again: a ready sandbox of the same pod (namespace, name, uid) where one is here,
such as the one the restore of a sibling container made, else a new sandbox from the
recorded config with the next attempt number; then ``CreateContainer`` with the archive's
path or the checkpoint image as its image, labelled as the kubelet labels containers.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Any

from cedana_ray.plugins.crio import client as crio_client
from cedana_ray.plugins.crio import plugin as crio
from cedana_ray.plugins.crio.client import IMAGES, Cri, json_mapping, messages
from pydantic import BaseModel

from cedana_ray.errors import JobNotFound, RestoreError, StateError, UsageError
from cedana_ray.models import Job, Name, OneLine
from cedana_ray.pipeline import Context, Handler
from cedana_ray.requests import DumpRequest, RestoreRequest

from . import image
from .pods import CONTAINER_NAME, POD_NAME, POD_NAMESPACE, POD_UID

NAME = "k8s"
READY = 0  # runtime.v1.PodSandboxState
RESTORED = "io.cedana-ray.restored"  # the annotation of a sandbox a restore made (no kubelet made it)


class PodDumpRequest(DumpRequest):
    """A dump of a pod's container that may also export it as an OCI checkpoint image."""

    export_image: str | None = None  # HOST[:PORT]/REPO:TAG


class PodRestoreRequest(RestoreRequest):
    """A restore of a pod's container that must be of pod ``pod`` (``NAMESPACE/NAME``)."""

    pod: str | None = None


# -- what the kubelet made
def pod_labels(cri: Cri, pod_id: str) -> dict[str, str]:
    """The kubelet's labels of sandbox ``pod_id`` (name, namespace, uid); refused where it has none."""
    pod = next((p for p in cri.pods() if p.id == pod_id), None)
    if pod is None or POD_NAME not in pod.labels or POD_NAMESPACE not in pod.labels:
        raise JobNotFound(f"pod sandbox {pod_id} is not a Kubernetes pod (no io.kubernetes.pod.* labels)")
    return dict(pod.labels)


def manage(ctx: Context) -> Job:
    """Adopt a running container of a kubelet's pod (its id), as the crio plugin does, with
    the pod's namespace and name and the container's name in the pod."""
    cri, cid = Cri.from_env(), ctx.request.target
    try:
        status, _ = cri.status(cid)
    except JobNotFound:
        raise JobNotFound(f"no CRI container {cid!r} at {cri.endpoint}") from None
    labels = pod_labels(cri, crio.pod_of(cri, status.id))
    name = status.labels.get(CONTAINER_NAME) or status.metadata.name
    where = f"{labels[POD_NAMESPACE]}/{labels[POD_NAME]}/{name}"
    job = crio.container_job(ctx, cri, status.id, managed=True, command=["k8s", where])
    facts = {"namespace": labels[POD_NAMESPACE], "pod_name": labels[POD_NAME], "container_name": name}
    return job.model_copy(update={"type": NAME, "details": {**job.details, **facts}})


# -- dump: the crio plugin's, and the export
def pod_facts(ctx: Context, next_: Handler) -> Any:
    """Record the pod's identity in the checkpoint; once the runtime wrote the archive,
    export it as a checkpoint image where asked (a failed export fails the dump, before the
    container is stopped)."""
    job = ctx.job
    ctx.state.details |= {k: job.details[k] for k in ("namespace", "pod_name", "container_name")}
    result = next_(ctx)
    ref = getattr(ctx.request, "export_image", None)
    if ref:
        ctx.state.details["exported_image"] = export(ctx.state.images / crio.ARCHIVE, image.Ref.parse(ref), ctx)
    return result


def export(archive: Path, ref: image.Ref, ctx: Context) -> str:
    """Push the archive as a checkpoint image to ``ref``; ``REF@DIGEST``."""
    d = ctx.state.details
    cri_o = "io.kubernetes.cri-o.annotations.checkpoint."
    annotations = {
        image.CHECKPOINT_NAME: d["container_name"],
        cri_o + "rootfsImageName": d["image"],
        cri_o + "rootfsImageID": d["image_ref"],
        image.CRIU_NAME: d["container_name"],
        "org.criu.checkpoint.pod.name": d["pod_name"],
        "org.criu.checkpoint.pod.namespace": d["namespace"],
        "org.criu.checkpoint.rootfsImageName": d["image"],
        "org.criu.checkpoint.rootfsImageID": d["image_ref"],
        "org.criu.checkpoint.engine": d["runtime"],
        image.POD_CONFIG: json_mapping().MessageToJson(_config(d["pod_config"]), indent=None),
    }
    with tempfile.TemporaryDirectory(dir=ctx.state.work) as work:
        blobs, manifest = image.build(archive, Path(work), annotations)
        digest = image.push(ref, blobs, manifest)
    return f"{ref}@{digest}"


# -- restore
class PodFacts(BaseModel):
    """What a pod container's checkpoint must hold to be restored."""

    name: Name
    container_name: Name
    namespace: Name
    pod_name: Name
    pod_config: dict[str, Any]
    pod: OneLine


def _config(doc: dict[str, Any]) -> Any:
    return json_mapping().ParseDict(doc, messages().PodSandboxConfig())


def sandbox_for(cri: Cri, config: Any) -> tuple[str, Any, bool]:
    """A ready sandbox of the pod (its namespace, name and uid) here, else a new one made
    from ``config`` as the kubelet makes the next one: the next attempt after the newest of
    that pod here or in ``config``. (sandbox id, its config, whether it is new)"""
    same = [p for p in cri.pods() if crio.same_pod(p.metadata, config.metadata)]
    ready = sorted((p for p in same if p.state == READY), key=lambda p: p.created_at)
    if ready:
        return ready[-1].id, cri.pod(ready[-1].id)[1], False
    config.metadata.attempt = max([config.metadata.attempt, *(p.metadata.attempt for p in same)]) + 1
    config.annotations[RESTORED] = "true"
    return cri.run_pod(config), config, True


def start_container(cri: Cri, pod: str, pod_config: Any, name: str, image_name: str) -> str:
    """CreateContainer of ``name`` from a checkpoint (archive path or image) in ``pod``,
    with the kubelet's labels and log path, then StartContainer; the container's id."""
    pb, meta = messages(), pod_config.metadata
    labels = {CONTAINER_NAME: name, POD_NAME: meta.name, POD_NAMESPACE: meta.namespace, POD_UID: meta.uid}
    config = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=name),
        image=pb.ImageSpec(image=image_name),
        labels=labels,
        log_path=f"{name}/0.log",
    )
    if pod_config.log_directory:  # the kubelet makes the container's log directory
        with contextlib.suppress(OSError):
            (Path(pod_config.log_directory) / name).mkdir(parents=True, exist_ok=True)
    crio.free_name(cri, pod_config, name)
    cid = cri.create(pod, config, pod_config)
    cri.start(cid)
    return cid


def restore(ctx: Context) -> Job:
    """The container again, in its pod as the kubelet would make it, from the archive in the images."""
    manifest = ctx.state.manifest
    facts = manifest.facts(PodFacts)
    if ctx.state.jid != manifest.jid:
        raise UsageError("a pod's container is restored as itself, not as a clone", hint="restore without --jid")
    asked = getattr(ctx.request, "pod", None)
    if asked and asked != f"{facts.namespace}/{facts.pod_name}":
        raise UsageError(f"checkpoint {manifest.checkpoint} is of pod {facts.namespace}/{facts.pod_name}, not {asked}")
    cri = Cri.from_env()
    pod, pod_config, new = sandbox_for(cri, _config(facts.pod_config))
    try:
        cid = start_container(cri, pod, pod_config, facts.container_name, str(ctx.state.images / crio.ARCHIVE))
        job = crio.container_job(ctx, cri, cid, command=ctx.state.command)
    except BaseException as exc:
        if new:
            cri.remove_pod(pod)
        if isinstance(exc, (JobNotFound, StateError)):
            raise RestoreError(f"restore of checkpoint {manifest.checkpoint} into pod {facts.pod_name}: {exc}") from exc
        raise
    own = {"namespace": facts.namespace, "pod_name": facts.pod_name}
    return job.model_copy(
        update={"type": NAME, "details": {**job.details, **own, "container_name": facts.container_name}}
    )


# -- restore from a checkpoint image
def image_facts(ref: image.Ref, namespace: str, pod_name: str) -> tuple[str, Any]:
    """The container's name and the pod's config that checkpoint image ``ref`` holds; an
    image that is no checkpoint image, or one of another pod, is refused in one line."""
    notes = image.manifest_of(ref).get("annotations") or {}
    name = next((notes[k] for k in image.CHECKPOINT_NAMES if k in notes), None)
    if name is None:
        raise UsageError(f"image {ref} is not a checkpoint image (no {image.CHECKPOINT_NAME} annotation)")
    if image.POD_CONFIG not in notes:
        raise UsageError(
            f"checkpoint image {ref} does not describe its pod ({image.POD_CONFIG})",
            hint="export it with `dump k8s --export-image`",
        )
    config = json_mapping().Parse(notes[image.POD_CONFIG], messages().PodSandboxConfig())
    if (config.metadata.namespace, config.metadata.name) != (namespace, pod_name):
        meta = config.metadata
        raise UsageError(f"checkpoint image {ref} holds pod {meta.namespace}/{meta.name}, not {namespace}/{pod_name}")
    return name, config


def restore_image(cri: Cri, ref: image.Ref, namespace: str, pod_name: str) -> str:
    """Pull checkpoint image ``ref`` through the CRI and restore its container into the
    pod, as the kubelet restores a container whose image is a checkpoint image; its id."""
    name, config = image_facts(ref, namespace, pod_name)
    pb = messages()
    pull = pb.PullImageRequest(image=pb.ImageSpec(image=str(ref)), sandbox_config=config)
    cri.call("PullImage", pull, service=IMAGES, timeout=crio_client.CHECKPOINT_TIMEOUT_S)
    pod, pod_config, new = sandbox_for(cri, config)
    try:
        return start_container(cri, pod, pod_config, name, str(ref))
    except BaseException:
        if new:
            cri.remove_pod(pod)
        raise


def cleanup(job: Job) -> None:
    """Remove the container from the runtime, and its sandbox once no container is left in
    it, where a restore made it (its siblings, restored into it, may outlive this one); the
    kit then removes the job dir."""
    cri, pod = crio.cri_of(job), job.details["pod"]
    cri.remove(job.details["target"])
    try:
        made_here = cri.pod(pod)[0].annotations.get(RESTORED) == "true"
    except JobNotFound:  # gone already
        return
    if made_here and not any(c.pod_sandbox_id == pod for c in cri.containers()):
        cri.remove_pod(pod)
