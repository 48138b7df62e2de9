"""The ``k8s`` plugin: ``cedana-ray k8s setup|destroy`` (see docs/kubernetes.md).

Kubernetes is not a workload runtime: a pod's containers are checkpointed by the ``crio``
plugin through the node's CRI. What this plugin adds is the install of cedana-ray's node
agents, built from the official client's typed models and applied with it, and its
health check: whether that client (the ``k8s`` extra) is installed.
"""

from __future__ import annotations

from cedana_ray.extras import installed
from cedana_ray.models import HealthCheck
from cedana_ray.runtime import Commands, Runtime

from .client import REQUIRED
from .commands import k8s_group

NAME = "k8s"


def health_checks() -> list[HealthCheck]:
    # optional: without the extra the column is incompatible, `check` does not fail
    ok = installed("kubernetes")
    detail = "the kubernetes client is installed" if ok else REQUIRED
    return [HealthCheck(name="kubernetes client", ok=ok, fatal=False, detail=detail)]


plugin = Runtime(NAME, commands=Commands(helpers=[k8s_group]), health_checks=health_checks)
