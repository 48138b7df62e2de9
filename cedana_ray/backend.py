"""What cedana-ray does, wherever it runs: the verbs of local mode and of a cluster.

:class:`Backend` declares every verb once. Local mode (:class:`~cedana_ray.engine.Engine`)
implements it on this machine; a cluster's client (:class:`~cedana_ray.cluster.Cluster`)
forwards each verb to the coordinator, which implements it on the cluster's nodes. The CLI
and the Python API pick one with :func:`open_backend` and never ask which they got.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from .models import (
    LIVE_STATES,
    CheckpointInfo,
    DumpResult,
    Event,
    Job,
    Manifest,
    MigrateResult,
    NodeStatus,
    RestoreResult,
)
from .requests import DumpRequest, ManageRequest, RestoreRequest, RunRequest

Progress = Callable[[str, int, int], None]  # (stage, done, total): a progress bar's update


class Backend(Protocol):
    node: str  # where this process runs: "local", or its Ray node id

    # -- jobs
    def run(self, jtype: str, request: RunRequest) -> Job:
        """Start a workload of type ``jtype`` (on ``request.node``, or where it fits best)."""
        ...

    def manage(self, jtype: str, request: ManageRequest) -> Job:
        """Adopt a workload started elsewhere, on ``request.node`` (default: this one)."""
        ...

    def job(self, jid: str) -> Job: ...

    def jobs(self) -> list[Job]: ...

    def set_storage(self, jid: str, url: str) -> Job:
        """Make ``url`` the default checkpoint store of job ``jid``."""
        ...

    def freeze(self, jid: str) -> Job: ...

    def unfreeze(self, jid: str) -> Job: ...

    def kill(self, jid: str, sig: int | str | None = None) -> Job:
        """Stop job ``jid`` and record it killed; given ``sig``, only send it that."""
        ...

    def delete(self, jid: str) -> Job:
        """Forget a job that is no longer live."""
        ...

    def query(self, jtype: str) -> list[dict[str, Any]]:
        """The workloads of runtime ``jtype`` (every node's, on a cluster)."""
        ...

    def read_log(self, jid: str, offset: int = 0, limit: int = 1 << 20) -> bytes:
        """Up to ``limit`` bytes of job ``jid``'s output from ``offset`` (from the end if negative)."""
        ...

    def events(self, jid: str | None = None, after: int = 0) -> list[Event]:
        """The history of job ``jid`` (of every job if None) after its ``after``-th event."""
        ...

    # -- checkpoint and restore
    def dump(self, jid: str, request: DumpRequest, progress: Progress | None = None) -> DumpResult: ...

    def restore(
        self,
        request: RestoreRequest,
        jid: str | None = None,
        jtype: str | None = None,
        progress: Progress | None = None,
        node: str | None = None,
    ) -> RestoreResult:
        """Restore job ``jid`` (its last or a given checkpoint) or ``request.path``, on ``node``
        if given; with ``jtype``, only a checkpoint of that job type."""
        ...

    def checkpoints(self, jid: str | None = None) -> list[CheckpointInfo]: ...

    def inspect(self, ckpt: str) -> Manifest: ...

    def import_checkpoint(self, url: str) -> CheckpointInfo:
        """Trust and catalog the checkpoint at ``url``, made elsewhere."""
        ...

    def delete_checkpoint(self, ckpt: str) -> CheckpointInfo: ...

    # -- the cluster (local mode refuses these)
    def migrate(
        self,
        jid: str,
        node: str,
        request: DumpRequest | None = None,
        progress: Progress | None = None,
        live: bool = False,
    ) -> MigrateResult:
        """Move job ``jid`` to ``node`` (a hostname, an IP or an id prefix): it keeps its id.
        ``live``: a VM, by its hypervisor's own pre-copy migration while it runs (no checkpoint)."""
        ...

    def drain(self, node: str) -> list[MigrateResult]:
        """Move every job off ``node``; no new job is placed there."""
        ...

    def undrain(self, node: str) -> str: ...

    def nodes(self) -> list[NodeStatus]: ...

    def info(self) -> dict[str, Any]: ...


VERBS = frozenset(name for name in vars(Backend) if not name.startswith("_") and callable(vars(Backend)[name]))


def open_backend(address: str | None = None, *, local: bool = False) -> Backend:
    """The cluster at ``address`` (default: the one known here, see
    :func:`cedana_ray.cluster_state.address`) unless ``local``; else this machine alone."""
    from . import cluster
    from .cluster_state import address as known_address
    from .engine import Engine

    found = None if local else (address or known_address())
    if not found:
        return Engine()
    return cluster.through_gateway(found) or cluster.Cluster(found)


def job_for(backend: Backend, jtype: str, target: str) -> Job:
    """The live job of ``target`` (a PID, a container id) on this node, adopting it if needed."""
    for job in backend.jobs():
        if job.type == jtype and job.state in LIVE_STATES and job.node == backend.node and job.target == target:
            return job
    return backend.manage(jtype, ManageRequest(target=target))
