"""Reservations: the Ray resources a job holds on its node while it runs.

A job run with ``--cpus``, ``--gpus`` or ``--memory`` gets a holder: a detached, named
actor pinned to the job's node that asks Ray for those resources and does nothing else.
While it lives, Ray's scheduler and autoscaler count them as used, as they would a Ray
task's. The coordinator takes one on each node the job moves to and kills it when the job
leaves the node, ends, stops at a checkpoint or is lost. The GPUs Ray gives a holder are
the job's ``CUDA_VISIBLE_DEVICES``.
"""

from __future__ import annotations

from contextlib import suppress

import ray
from ray.exceptions import GetTimeoutError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cedana_ray.errors import PrerequisiteError
from cedana_ray.models import Job
from cedana_ray.remote import NAMESPACE
from cedana_ray.requests import Resources

RESERVE_TIMEOUT_S = 30.0  # Ray places a holder at once where its resources are free


class Holder:
    """Holds what it was created with; knows which GPUs Ray gave it."""

    def gpus(self) -> list[str]:
        return [str(g) for g in ray.get_gpu_ids()]


def holder_name(jid: str, node: str) -> str:
    return f"cedana-ray-hold-{jid}-{node}"


def resources_of(job: Job | None) -> Resources:
    """What ``job`` reserves (recorded by the coordinator when it ran the job)."""
    return Resources.model_validate(job.details.get("resources", {})) if job else Resources()


def reserve(jid: str, node: str, resources: Resources) -> list[str]:
    """Hold ``resources`` on ``node`` for job ``jid`` (the holder it has there already, if
    any); the GPUs Ray gave them."""
    if not resources:
        return []
    holder = (
        ray.remote(Holder)
        .options(
            name=holder_name(jid, node),
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=resources.cpus,
            num_gpus=resources.gpus,
            memory=resources.memory or None,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        )
        .remote()
    )
    try:
        return ray.get(holder.gpus.remote(), timeout=RESERVE_TIMEOUT_S)
    except GetTimeoutError:
        ray.kill(holder)
        raise PrerequisiteError(
            f"node {node[:12]} could not reserve {resources} for job {jid}",
            hint="other work holds them: `ray status`",
        ) from None


def release(jid: str, node: str) -> None:
    """Give back what job ``jid`` holds on ``node`` (nothing if it holds nothing there)."""
    with suppress(ValueError):  # no holder by that name
        ray.kill(ray.get_actor(holder_name(jid, node), namespace=NAMESPACE))
