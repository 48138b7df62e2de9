"""``query k8s`` cluster-wide: the pods the API server knows, each joined to what its node's
agent found on the node's CRI (the container's cedana-ray job, state, last checkpoint).

The API server says where each pod runs and which container ids its containers have
(``status.containerStatuses[].containerID``, ``containerd://ID``); the agents say which of
those ids a cedana-ray job holds. A pod on a node without an agent is listed with no jobs.
Needs read access to pods (the RBAC ``k8s setup`` installs grants it).
"""

from __future__ import annotations

from typing import Any

from kubernetes import client as k

from .apply import TIMEOUT_S, translated


def listed(api: k.ApiClient, namespace: str | None) -> list[dict[str, Any]]:
    """The pods of ``namespace`` (every namespace: None), as the API server has them."""
    core = k.CoreV1Api(api)
    with translated(api, "list pods"):
        if namespace:
            found = core.list_namespaced_pod(namespace, _request_timeout=TIMEOUT_S)
        else:
            found = core.list_pod_for_all_namespaces(_request_timeout=TIMEOUT_S)
    return [_pod(p) for p in sorted(found.items, key=lambda p: (p.metadata.namespace, p.metadata.name))]


def _pod(p: Any) -> dict[str, Any]:
    statuses = {s.name: s for s in (p.status.container_statuses or [])} if p.status else {}
    return {
        "namespace": p.metadata.namespace,
        "name": p.metadata.name,
        "uid": p.metadata.uid,
        "node": p.spec.node_name,
        "state": (p.status.phase or "unknown").lower() if p.status else "unknown",
        "containers": [_container(c.name, c.image, statuses.get(c.name)) for c in p.spec.containers],
    }


def _container(name: str, image: str, status: Any) -> dict[str, Any]:
    cid = status.container_id.split("://", 1)[-1] if status and status.container_id else None
    return {"name": name, "id": cid, "image": image, "state": _state(status)}


def _state(status: Any) -> str:
    """running, waiting or terminated, as the kubelet last reported; pending before that."""
    if status is None or status.state is None:
        return "pending"
    return next((s for s in ("running", "waiting", "terminated") if getattr(status.state, s)), "unknown")


def joined(pods: list[dict[str, Any]], on_nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``pods`` (from the API server), each container with the job an agent found holding it,
    and each pod with the agent that saw its sandbox (``agent``: its node, ``local`` for this
    one; None where no agent did)."""
    seen = {p["uid"]: p.get("node", "local") for p in on_nodes}
    jobs = {c["id"]: c for p in on_nodes for c in p["containers"]}
    return [
        {
            **p,
            "agent": seen.get(p["uid"]),
            "containers": [{**c, **_job(jobs.get(c["id"]))} for c in p["containers"]],
        }
        for p in pods
    ]


def _job(found: dict[str, Any] | None) -> dict[str, Any]:
    keys = ("jid", "job_state", "last_checkpoint")
    return {key: found.get(key) if found else None for key in keys}
