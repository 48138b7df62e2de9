"""The ``k8s`` plugin: ``cedana-ray k8s setup|destroy`` and ``query k8s`` (docs/kubernetes.md).

Kubernetes is not a workload runtime: a pod's containers are checkpointed by the ``crio``
plugin through the node's CRI. What this plugin adds is the install of cedana-ray's node
agents, built from the official client's typed models and applied with it, and the list
of this node's pods with their cedana-ray jobs, read from the node's CRI.

Its health checks are what both need: the Kubernetes client (the ``k8s`` extra) and the
node's CRI endpoint. The feature matrix has one health per plugin, so the column shows ✔
only where both are there, ✖ (and why, in ``features --errors``) elsewhere.
"""

from __future__ import annotations

from cedana_ray.plugins.crio.client import Cri

from cedana_ray.errors import CedanaError
from cedana_ray.extras import installed
from cedana_ray.models import HealthCheck
from cedana_ray.runtime import Commands, Runtime

from . import pods
from .client import REQUIRED
from .commands import k8s_group, query

NAME = "k8s"


def _cri() -> str:
    v = Cri.from_env().version()
    return f"{v.runtime_name} {v.runtime_version} at {Cri.from_env().endpoint}"


def health_checks() -> list[HealthCheck]:
    # optional: a failure makes the column incompatible, `check` does not fail
    ok = installed("kubernetes")
    detail = "the kubernetes client is installed" if ok else REQUIRED
    client = HealthCheck(name="kubernetes client", ok=ok, fatal=False, detail=detail)
    try:
        cri = HealthCheck(name="node cri", ok=True, fatal=False, detail=_cri())
    except (CedanaError, ImportError) as exc:  # the cri extra missing, or no runtime here
        cri = HealthCheck(name="node cri", ok=False, fatal=False, detail=str(exc))
    return [client, cri]


plugin = Runtime(
    NAME,
    query=pods.query,  # no run or restore handler: no kill signal, reaper or cleanup
    commands=Commands(own={"query": query}, helpers=[k8s_group]),
    health_checks=health_checks,
)
