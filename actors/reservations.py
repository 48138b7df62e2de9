"""Reservations: the Ray resources a job holds on its node while it runs.

A job run with ``--cpus``, ``--gpus`` or ``--memory`` gets a placement group of one bundle
of those resources, pinned to the job's node by its ``ray.io/node-id`` label: while it
exists, Ray's scheduler and autoscaler count them as used, as they would a Ray task's, at
no cost (no process holds them). The coordinator takes one on each node the job moves to
and removes it when the job leaves the node, ends, stops at a checkpoint or is lost. The
GPUs of the bundle, as Ray numbers them, are the job's ``CUDA_VISIBLE_DEVICES``.
"""

from __future__ import annotations

from contextlib import suppress

import ray
from ray.util import get_placement_group, placement_group, remove_placement_group
from ray.util.placement_group import NODE_ID_LABEL_KEY, PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cedana_ray.errors import PrerequisiteError
from cedana_ray.models import Job
from cedana_ray.requests import Resources

RESERVE_TIMEOUT_S = 30.0  # Ray commits a bundle at once where its resources are free


def holder_name(jid: str, node: str) -> str:
    return f"cedana-ray-hold-{jid}-{node}"


def resources_of(job: Job | None) -> Resources:
    """What ``job`` reserves (recorded by the coordinator when it ran the job)."""
    return Resources.model_validate(job.details.get("resources", {})) if job else Resources()


def reserve(jid: str, node: str, resources: Resources) -> list[str]:
    """Hold ``resources`` on ``node`` for job ``jid`` (the reservation it has there already,
    if any); the GPUs they include."""
    if not resources:
        return []
    try:
        group = get_placement_group(holder_name(jid, node))
    except ValueError:  # none yet
        group = placement_group(
            [resources.ray()],
            name=holder_name(jid, node),
            lifetime="detached",
            bundle_label_selector=[{NODE_ID_LABEL_KEY: node}],
        )
    if not group.wait(RESERVE_TIMEOUT_S):
        remove_placement_group(group)
        raise PrerequisiteError(
            f"node {node[:12]} could not reserve {resources} for job {jid}",
            hint="other work holds them: `ray status`",
        )
    return _gpus_of(group, resources.gpus) if resources.gpus else []


@ray.remote(num_cpus=0)
def _gpu_ids() -> list[str]:
    return [str(g) for g in ray.get_gpu_ids()]


def _gpus_of(group: PlacementGroup, gpus: float) -> list[str]:
    """The GPUs Ray gave ``group``'s bundle: what a task run in it is given."""
    strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
    return ray.get(_gpu_ids.options(num_gpus=gpus, scheduling_strategy=strategy).remote())


def give_back(job: Job) -> None:
    """Give back what ``job`` holds on its node, if it reserves anything at all (a job that
    reserves nothing costs no lookup)."""
    if "resources" in job.details:
        release(job.jid, job.node)


def release(jid: str, node: str) -> None:
    """Give back what job ``jid`` holds on ``node`` (nothing if it holds nothing there)."""
    with suppress(ValueError):  # no reservation by that name
        remove_placement_group(get_placement_group(holder_name(jid, node)))
