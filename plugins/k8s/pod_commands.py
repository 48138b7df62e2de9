"""``dump k8s NAMESPACE/POD`` and ``restore k8s NAMESPACE/POD``: a pod's containers,
checkpointed and restored through the node's CRI (see :mod:`.containers`)."""

from __future__ import annotations

from typing import Any

import click
from cedana_ray.plugins.crio.client import Cri
from cedana_ray.plugins.crio.commands import endpoint_option

from cedana_ray.backend import job_for
from cedana_ray.cli.common import common, engine
from cedana_ray.cli.options import dump_options, key_file_option, quiet_option
from cedana_ray.cli.output import progress, show, table
from cedana_ray.crypto import load_key
from cedana_ray.errors import JobNotFound, StateError, UsageError
from cedana_ray.models import JobState
from cedana_ray.requests import DumpRequest, ManageRequest

from .commands import DNS_LABEL
from .image import Ref
from .pods import find_pod, running_containers


def _pod(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, str]:
    namespace, _, name = value.partition("/")
    if not (DNS_LABEL.match(namespace) and name and len(name) <= 253 and "/" not in name):
        raise UsageError(f"{value!r} is not a pod NAMESPACE/NAME")
    return namespace, name


def _containers(cri: Cri, namespace: str, name: str, only: str | None) -> dict[str, str]:
    """The pod's running containers to dump (name -> id): all, or ``only``."""
    found = running_containers(cri, find_pod(cri, namespace, name))
    if not found:
        raise StateError(f"pod {namespace}/{name} has no running container")
    if only is not None and only not in found:
        raise JobNotFound(f"pod {namespace}/{name} has no running container {only!r} (it has: {', '.join(found)})")
    return {only: found[only]} if only else found


def _export_refs(ref: str | None, names: list[str]) -> dict[str, str | None]:
    """Where each container's image goes: REF for one, REF's tag with ``-NAME`` for several."""
    if ref is None:
        return dict.fromkeys(names)
    parsed = Ref.parse(ref)
    if len(names) == 1:
        return {names[0]: str(parsed)}
    return {n: str(parsed.with_tag(f"{parsed.tag}-{n}")) for n in names}


DUMP_COLUMNS = ("container", "jid", "checkpoint", "image", "path")


@click.command("k8s")
@click.argument("pod", metavar="NAMESPACE/POD", callback=_pod)
@click.option("--container", metavar="NAME", help="Only this container of the pod (default: all that run).")
@click.option("--export-image", metavar="REF", help="Also push each checkpoint as an OCI checkpoint image.")
@endpoint_option
@dump_options
@common
def dump(
    pod: tuple[str, str], container: str | None, export_image: str | None, request: DumpRequest, **kw: Any
) -> None:
    """Checkpoint the containers of pod NAMESPACE/POD through this node's CRI: one job and
    checkpoint per container. With --export-image REF, each is also pushed as the OCI
    checkpoint image Kubernetes restores from (REF, or REF's tag with -CONTAINER for several)."""
    from .containers import PodDumpRequest

    found = _containers(Cri.from_env(), *pod, container)
    refs = _export_refs(export_image, list(found))
    rows = []
    for name, cid in found.items():
        job = job_for(engine(), "k8s", cid)
        req = PodDumpRequest.model_validate({**dict(request), "export_image": refs[name]})
        with progress(not kw["as_json"]) as bar:
            result = engine().dump(job.jid, req, bar)
        rows.append(
            {
                "container": name,
                "jid": job.jid,
                "checkpoint": result.checkpoint,
                "image": refs[name],
                "path": result.path,
            }
        )
    show(kw["as_json"], rows, lambda: table(DUMP_COLUMNS, [[r[c] for c in DUMP_COLUMNS] for r in rows]))


RESTORE_COLUMNS = ("container", "jid", "id", "sandbox", "from")


@click.command("k8s")
@click.argument("pod", metavar="NAMESPACE/POD", callback=_pod)
@click.option("--from-image", "images", multiple=True, metavar="REF", help="A checkpoint image (repeatable).")
@click.option("--path", "paths", multiple=True, metavar="URL", help="A checkpoint's URL (repeatable).")
@endpoint_option
@key_file_option
@quiet_option
@common
def restore(
    pod: tuple[str, str], images: tuple[str, ...], paths: tuple[str, ...], key_file: str | None, **kw: Any
) -> None:
    """Restore the containers of pod NAMESPACE/POD through this node's CRI, into a new pod
    sandbox made as the kubelet makes it (or the pod's ready one): from checkpoint images,
    from checkpoints' URLs, or, without either, from the last checkpoint of each of the pod's jobs."""
    if images and paths:
        raise UsageError("--from-image and --path are alternatives")
    if images:
        rows = [_from_image(Ref.parse(ref), *pod) for ref in images]
    else:
        rows = [_from_checkpoint(pod, path, jid, load_key(key_file)) for path, jid in _sources(pod, paths)]
    show(kw["as_json"], rows, lambda: table(RESTORE_COLUMNS, [[r[c] for c in RESTORE_COLUMNS] for r in rows]))


def _sources(pod: tuple[str, str], paths: tuple[str, ...]) -> list[tuple[str | None, str | None]]:
    """(URL, None) for each --path; else (None, JID) for each checkpointed job of the pod."""
    if paths:
        return [(p, None) for p in paths]
    jobs = [
        j
        for j in engine().jobs()
        if j.type == "k8s"
        and (j.details.get("namespace"), j.details.get("pod_name")) == pod
        and j.state is JobState.checkpointed
    ]
    if not jobs:
        raise JobNotFound(
            f"no checkpointed container of pod {'/'.join(pod)}", hint="give --path URL or --from-image REF"
        )
    return [(None, j.jid) for j in jobs]


def _from_checkpoint(pod: tuple[str, str], path: str | None, jid: str | None, key: Any) -> dict[str, Any]:
    from .containers import PodRestoreRequest

    request = PodRestoreRequest(path=path, key=key, pod="/".join(pod))
    with progress(not click.get_current_context().params["as_json"]) as bar:
        job = engine().restore(request, jid=jid, jtype="k8s", progress=bar).job
    return _row(job, path or job.last_checkpoint)


def _from_image(ref: Ref, namespace: str, name: str) -> dict[str, Any]:
    from .containers import restore_image

    cid = restore_image(Cri.from_env(), ref, namespace, name)
    return _row(engine().manage("k8s", ManageRequest(target=cid)), str(ref))


def _row(job: Any, source: str | None) -> dict[str, Any]:
    d = job.details
    return {
        "container": d.get("container_name"),
        "jid": job.jid,
        "id": d["target"],
        "sandbox": d["pod"],
        "from": source,
    }
