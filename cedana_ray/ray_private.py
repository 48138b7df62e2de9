"""The private Ray internals cedana-ray uses, in one place: each where Ray has no public API
for it yet, and each checked on a live cluster by ``tests/test_cluster.py`` and
``tests/test_cluster_cli.py`` (``test_..._private_ray_...``), so that a Ray upgrade that
changes one fails there, loudly, instead of losing a feature quietly.
"""

from __future__ import annotations


def draining_nodes() -> dict[str, int]:
    """The nodes Ray is draining (``ray drain-node``, an autoscaler's preemption notice), with
    their deadline in ms since the epoch (0: none)."""
    from ray._private.state import state

    return dict(state.get_draining_nodes())


def job_server_registered(node: str) -> bool:
    """Whether the dashboard agent of ``node`` (the head's serves ``ray job submit``) has
    registered: the job API refuses submissions before it has."""
    from ray._private.ray_constants import KV_NAMESPACE_DASHBOARD
    from ray.dashboard.consts import DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX
    from ray.experimental.internal_kv import _internal_kv_get

    return bool(_internal_kv_get(f"{DASHBOARD_AGENT_ADDR_NODE_ID_PREFIX}{node}", namespace=KV_NAMESPACE_DASHBOARD))


def available_resources() -> dict[str, dict[str, float]]:
    """Each alive node's free resources (``CPU``, ``GPU``, ``memory``...), by node id: Ray's
    public API gives only the cluster's sum."""
    from ray._private.state import available_resources_per_node

    return available_resources_per_node()
