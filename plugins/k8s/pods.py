"""``query k8s``: the Kubernetes pods of this node, read from the node's CRI.

The kubelet labels every pod sandbox it creates with the pod's name, namespace and uid
(``io.kubernetes.pod.*``), and each container with its name in the pod
(``io.kubernetes.container.name``): that is how the pods are told from other sandboxes of
the runtime, without asking the API server. Each container is matched with the ``crio``
job that holds it (the job's container id on the same endpoint), for its job id, state
and last checkpoint. Uses the ``crio`` plugin's CRI client (the ``cri`` extra), not the
Kubernetes client: it runs on the node, in the agent's image.
"""

from __future__ import annotations

from typing import Any

from cedana_ray.plugins.crio.client import Cri, messages

from cedana_ray.errors import JobNotFound
from cedana_ray.models import Job
from cedana_ray.pipeline import Context

POD_NAME = "io.kubernetes.pod.name"
POD_NAMESPACE = "io.kubernetes.pod.namespace"
POD_UID = "io.kubernetes.pod.uid"
CONTAINER_NAME = "io.kubernetes.container.name"
CRI_TYPES = ("crio", "k8s")  # the job types of containers adopted through the CRI
READY, RUNNING = 0, 1  # runtime.v1.PodSandboxState, ContainerState


def _jobs_by_container(jobs: list[Job], endpoint: str) -> dict[str, Job]:
    return {j.details["target"]: j for j in jobs if j.type in CRI_TYPES and j.details.get("endpoint") == endpoint}


def _container(c: Any, jobs: dict[str, Job]) -> dict[str, Any]:
    job = jobs.get(c.id)
    return {
        "name": c.labels.get(CONTAINER_NAME) or c.metadata.name,
        "id": c.id,
        "image": c.image.image,
        "state": messages().ContainerState.Name(c.state).removeprefix("CONTAINER_").lower(),
        "jid": job.jid if job else None,
        "job_state": job.state.value if job else None,
        "last_checkpoint": job.last_checkpoint if job else None,
    }


def _pod(p: Any, containers: list[Any], jobs: dict[str, Job]) -> dict[str, Any]:
    return {
        "namespace": p.labels[POD_NAMESPACE],
        "name": p.labels[POD_NAME],
        "uid": p.labels.get(POD_UID),
        "sandbox": p.id,
        "attempt": p.metadata.attempt,
        "state": messages().PodSandboxState.Name(p.state).removeprefix("SANDBOX_").lower(),
        "containers": [_container(c, jobs) for c in sorted(containers, key=lambda c: c.created_at)],
    }


def query(ctx: Context) -> list[dict[str, Any]]:
    """The pods the kubelet made on this node's CRI endpoint, oldest first, each with its
    containers and their cedana-ray jobs."""
    cri = Cri.from_env()
    jobs = _jobs_by_container(ctx.state.jobs, cri.endpoint)
    containers = cri.containers()
    pods = [p for p in cri.pods() if POD_NAME in p.labels and POD_NAMESPACE in p.labels]
    return [
        _pod(p, [c for c in containers if c.pod_sandbox_id == p.id], jobs)
        for p in sorted(pods, key=lambda p: p.created_at)
    ]


def rows(pods: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """The table's columns and one row per container (a pod without any: one row of its
    own), with the node and agent columns where the pods have them."""
    extra = [key for key in ("node", "agent") if any(key in p for p in pods)]
    found: list[list[Any]] = []
    for p in pods:
        pod = [p.get(key) for key in extra] + [p["namespace"], p["name"], p["state"]]
        for c in p["containers"] or [{}]:
            found.append([*pod, *(c.get(key) for key in CONTAINER_KEYS)])
    return [*extra, *COLUMNS], found


COLUMNS = ("namespace", "pod", "pod state", "container", "state", "jid", "job state", "last checkpoint")
CONTAINER_KEYS = ("name", "state", "jid", "job_state", "last_checkpoint")


def find_pod(cri: Cri, namespace: str, name: str) -> Any:
    """The pod's sandbox on this node: the newest ready one, else the newest; refused in one
    line where the kubelet made none of that name."""
    found = [p for p in cri.pods() if p.labels.get(POD_NAMESPACE) == namespace and p.labels.get(POD_NAME) == name]
    if not found:
        raise JobNotFound(f"no pod {namespace}/{name} at the CRI endpoint {cri.endpoint}")
    return max(found, key=lambda p: (p.state == READY, p.created_at))


def running_containers(cri: Cri, pod: Any) -> dict[str, str]:
    """The pod's running containers: name in the pod -> container id, oldest first."""
    found = [c for c in cri.containers() if c.pod_sandbox_id == pod.id and c.state == RUNNING]
    return {(c.labels.get(CONTAINER_NAME) or c.metadata.name): c.id for c in sorted(found, key=lambda c: c.created_at)}
