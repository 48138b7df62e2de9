"""The ``k8s`` plugin: ``cedana-ray k8s setup|destroy`` and ``query k8s`` (docs/kubernetes.md).

A pod's containers are checkpointed through the node's CRI with the ``crio`` plugin's dump
(``dump k8s NAMESPACE/POD``: one ``k8s`` job per container, optionally exported as OCI
checkpoint images) and restored into a pod sandbox made as the kubelet makes it
(``restore k8s NAMESPACE/POD``, from those checkpoints or images; see :mod:`.containers`).
The plugin also installs cedana-ray's node agents (``k8s setup``), built from the official
client's typed models and applied with it, and lists this node's pods with their
cedana-ray jobs, read from the node's CRI.

Its health checks are what both need: the Kubernetes client (the ``k8s`` extra) and the
node's CRI endpoint. The feature matrix has one health per plugin, so the column shows ✔
only where both are there, ✖ (and why, in ``features --errors``) elsewhere.
"""

from __future__ import annotations

from cedana_ray.plugins.crio import plugin as crio
from cedana_ray.plugins.crio.client import Cri

from cedana_ray.errors import CedanaError
from cedana_ray.extras import installed
from cedana_ray.models import HealthCheck
from cedana_ray.runtime import Commands, Runtime

from . import containers, pod_commands, pods
from .client import REQUIRED
from .commands import k8s_group, query

NAME = "k8s"


def _cri() -> str:
    cri = Cri.from_env()
    v = cri.version()
    return f"{v.runtime_name} {v.runtime_version} at {cri.endpoint}"


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
    manage=containers.manage,  # a pod's container, by its id (`dump k8s NS/POD` adopts them)
    dump=crio.checkpoint,  # the crio plugin's: CheckpointContainer into the image dir
    restore=containers.restore,
    query=pods.query,
    dump_middleware=[crio.prepare_dump, containers.pod_facts],
    restore_middleware=[crio.verify_first],
    commands=Commands(
        own={"dump": pod_commands.dump, "restore": pod_commands.restore, "query": query}, helpers=[k8s_group]
    ),
    health_checks=health_checks,
    reaper=crio.reaper,
    cleanup=containers.cleanup,  # a sandbox goes with its last container
)
