"""Placement: the alive nodes, their agents, and the node each job goes to.

Mixed into the :class:`~cedana_ray.actors.coordinator.Coordinator`, whose state it reads.
"""

from __future__ import annotations

from typing import Any

import ray

from cedana_ray import ray_private
from cedana_ray.errors import CedanaError, NotFoundError, PrerequisiteError, StateError, UsageError
from cedana_ray.models import Job, Manifest, NodeStatus
from cedana_ray.remote import call
from cedana_ray.requests import Resources


class Placement:
    agents: dict[str, Any]
    draining: dict[str, float]

    def _agent(self, node: str) -> Any:
        agent = self.agents.get(node)
        if agent is None:
            raise StateError(f"node {node[:12]} is not alive")
        return agent

    def nodes(self) -> list[NodeStatus]:
        found = []
        gpus = gpus_by_node()
        for node in sorted(self.agents):
            try:
                status = call(self._agent(node).status.remote(), timeout=30)
            except CedanaError as exc:
                status = NodeStatus(node=node, error=str(exc))
            found.append(status.model_copy(update={"draining": node in self.draining, "gpus": gpus.get(node, 0)}))
        return found

    def resolve_node(self, name: str) -> str:
        """The alive node ``name`` names: its Ray id, its IP, its hostname, or a prefix of its id."""
        alive = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] in self.agents]
        matches = named(name, alive)
        if len(matches) > 1:
            found = ", ".join(
                f"{n['NodeID'][:12]} ({n['NodeManagerHostname']}, {n['NodeManagerAddress']})" for n in matches
            )
            raise UsageError(f"node {name!r} is ambiguous: {found}", hint="name one by its id (a prefix is enough)")
        if not matches:
            raise NotFoundError(f"no alive node {name!r}", hint="`cedana-ray nodes` lists them")
        return matches[0]["NodeID"]

    def _place(
        self, jtype: str, node: str | None = None, exclude: str | None = None, gpu: bool = False,
        needs: Resources = Resources(),
    ) -> str:  # fmt: skip
        """The node for a ``jtype`` job: the one named, or the least loaded that can run it
        (among those with a GPU when the job needs one, and the Ray resources it ``needs`` free)."""
        what = f"{jtype} job that needs a GPU" if gpu else f"{jtype} job"
        free = ray_private.available_resources() if needs else {}
        if node is not None:
            chosen = self.resolve_node(node)
            status = call(self._agent(chosen).status.remote(), timeout=30)
            if jtype not in status.types or (gpu and not gpus_by_node().get(chosen)):
                raise PrerequisiteError(
                    f"node {chosen[:12]} cannot run a {what}", hint="`cedana-ray nodes` shows what each can run"
                )
            if short := needs.short_of(free.get(chosen, {})):
                raise PrerequisiteError(f"node {chosen[:12]} lacks {short} for the job", hint="`ray status`")
            return chosen
        fit = [
            s
            for s in self.nodes()
            if s.error is None and jtype in s.types and not s.draining and s.node != exclude and (s.gpus or not gpu)
            and not needs.short_of(free.get(s.node, {}))
        ]  # fmt: skip
        if not fit:
            what += f" that reserves {needs}" if needs else ""
            raise PrerequisiteError(f"no node can take a {what} now", hint="`cedana-ray nodes`, `ray status`")
        return min(fit, key=lambda s: (s.live_jobs, -s.memory_available, s.node)).node


def named(name: str, nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The nodes (as ``ray.nodes()`` describes them) that ``name`` names: those whose id, IP or
    hostname it is, else those whose id it begins."""
    exact = [n for n in nodes if name in (n["NodeID"], n["NodeManagerAddress"], n["NodeManagerHostname"])]
    return exact or [n for n in nodes if n["NodeID"].startswith(name)]


def one_machine(*nodes: str) -> bool:
    """Whether the nodes (Ray node ids) are on one machine: they have one IP."""
    return len({n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] in nodes}) == 1


def gpus_by_node() -> dict[str, float]:
    """Each alive node's GPUs, as Ray counts them (detected, or declared with ``--num-gpus``)."""
    return {n["NodeID"]: n["Resources"].get("GPU", 0) for n in ray.nodes() if n["Alive"]}


def needs_gpu(job: Job | None, manifest: Manifest | None = None) -> bool:
    """A job run with ``--gpu`` or ``--gpus``, or a checkpoint that holds CUDA state, goes to a GPU node only."""
    return bool((job and job.details.get("needs_gpu")) or (manifest and manifest.details.get("gpu")))
