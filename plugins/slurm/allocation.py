"""The cedana-ray side of a SLURM job: where its state lives, its cluster, its workloads.

Our batch template keeps each allocation's state in ``STATE_ROOT/SLURM_JOB_ID`` (its
``CEDANA_RAY_HOME``) and records STATE_ROOT in the job's comment, so anyone who can
run ``scontrol`` finds it: the batch script itself, a requeued run of the same job
(SLURM keeps the job id on requeue), and ``cedana-ray dump|restore|query slurm`` on a
login node. The workloads of an allocation are the jobs of its coordinator.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from cedana_ray.cluster import Cluster
from cedana_ray.cluster import connect as join_ray
from cedana_ray.cluster_state import ClusterState, load_state
from cedana_ray.errors import NotFoundError, StateError, UsageError
from cedana_ray.models import LIVE_STATES, CheckpointInfo, Job, JobState
from cedana_ray.pipeline import Context
from cedana_ray.registry import Registry

from . import client

T = TypeVar("T")
# What a restarted allocation brings back: workloads stopped by the batch script's
# checkpoint, gone with their node, or killed on the way out when their checkpoint
# failed. (To drop a workload for good, `job delete` it; a cancelled SLURM job is not
# requeued, so nothing of it comes back.)
RESTORABLE = (JobState.checkpointed, JobState.lost, JobState.killed)


def home_of(job: client.SlurmJob) -> Path:
    """The CEDANA_RAY_HOME of a job our template rendered."""
    if job.state_root is None:
        raise UsageError(f"SLURM job {job.job_id} does not run cedana-ray", hint="`cedana-ray query slurm` lists those")
    return job.state_root / job.job_id


def cluster_state(home: Path) -> ClusterState | None:
    """What ``cedana-ray up`` recorded in the allocation, if it got that far."""
    return load_state(home)


def catalog(home: Path) -> Registry | None:
    """The coordinator's registry of the allocation, read directly (no Ray needed) and only
    read: the coordinator, on another machine, is its one writer."""
    db = home / "cluster" / "coordinator.db"
    return Registry(db, readonly=True) if db.exists() else None


def connect(job_id: str) -> Cluster:
    """The cedana-ray cluster of running SLURM job ``job_id``."""
    job = client.job(job_id)
    home = home_of(job)
    if job.state not in ("RUNNING", "COMPLETING"):  # COMPLETING: being signalled, Ray may still answer
        raise StateError(f"SLURM job {job_id} is {job.state}, not RUNNING")
    state = cluster_state(home)
    if state is None:
        raise StateError(f"cedana-ray is not up in SLURM job {job_id} yet")
    return Cluster(state.address, state)  # with the allocation's Ray auth token


def wait_for_nodes(address: str, wanted: int, timeout: float) -> int:
    """Until ``wanted`` Ray nodes are alive at ``address`` (the workers of an allocation join
    its head while it starts up), or ``timeout``: how many are."""
    import ray

    join_ray(address)
    deadline = time.monotonic() + timeout
    while (alive := sum(n["Alive"] for n in ray.nodes())) < wanted and time.monotonic() < deadline:
        time.sleep(0.5)
    return alive


def each(jobs: list[Job], action: Callable[[Job], T]) -> list[T]:
    """``action`` on every job at once: a warning leaves little time to go one by one."""
    with ThreadPoolExecutor(max(1, len(jobs))) as pool:
        return list(pool.map(action, jobs))


def live(cluster: Cluster, job_id: str) -> list[Job]:
    found = [j for j in cluster.jobs() if j.state in LIVE_STATES]
    if not found:
        raise StateError(f"no running cedana-ray workload in SLURM job {job_id}")
    return found


def restorable(cluster: Cluster, job_id: str) -> list[Job]:
    found = [j for j in cluster.jobs() if j.state in RESTORABLE and j.last_checkpoint]
    if not found:
        raise NotFoundError(f"no workload of SLURM job {job_id} has a checkpoint to restore")
    return found


def last_checkpoint(registry: Registry) -> CheckpointInfo | None:
    found = registry.checkpoints()
    return max(found, key=lambda c: c.created) if found else None


def summary(job: client.SlurmJob) -> dict[str, Any]:
    """One row of ``query slurm``: SLURM's view and the allocation's cedana-ray state."""
    home = home_of(job)
    state = cluster_state(home)
    registry = catalog(home)
    workloads = registry.jobs() if registry else []
    last = last_checkpoint(registry) if registry else None
    return {
        "slurm_job": job.job_id,
        "state": job.state,
        "nodes": job.nodes,
        "restarts": job.restarts,
        "ray_address": state.address if state else None,
        "workloads": [{"jid": w.jid, "state": w.state.value} for w in workloads],
        "last_checkpoint": last.checkpoint if last else None,
        "last_checkpoint_at": last.created.isoformat() if last else None,
        "home": str(home),
    }


def query(ctx: Context) -> list[dict[str, Any]]:
    """The query handler: every queued or running SLURM job our template rendered."""
    return [summary(job) for job in client.cedana_jobs()]
