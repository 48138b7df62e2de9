"""One interface, two backends: local mode and a cluster's coordinator take each verb of
:class:`~cedana_ray.backend.Backend` as it is declared, so the CLI and the API never ask
which one they have."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
from cedana_ray.actors.agent import NodeAgent
from cedana_ray.actors.coordinator import Coordinator

from cedana_ray.backend import VERBS, Backend
from cedana_ray.cluster import Cluster
from cedana_ray.engine import Engine
from cedana_ray.errors import UsageError
from cedana_ray.remote import STREAMED
from cedana_ray.requests import ManageRequest, RestoreRequest

CLUSTER_ONLY = {"migrate": ("j", "n"), "drain": ("n",), "undrain": ("n",), "nodes": ()}


def params(fn: Callable[..., Any], drop: set[str] | None = None) -> list[tuple[str, Any, Any, Any]]:
    """``fn``'s parameters, less ``drop`` and the one Ray's tracing adds to the signature of
    every method of an actor class (the coordinator's, once ``ray.remote`` has seen it in
    this process: the catalog verbs it shares with the engine too)."""
    found = inspect.signature(fn).parameters.values()
    skip = {*(drop or ()), "_ray_trace_ctx"}
    return [(p.name, p.kind, p.default, p.annotation) for p in found if p.name not in skip]


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_local_mode_takes_every_verb_as_declared(verb: str) -> None:
    assert params(getattr(Engine, verb)) == params(getattr(Backend, verb))


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_the_coordinator_takes_every_verb_the_cluster_client_forwards(verb: str) -> None:
    """The client passes a verb's arguments by name; a progress callback stays with the client,
    which the coordinator's ``stream`` feeds (for the verbs in ``STREAMED``)."""
    assert params(getattr(Coordinator, verb)) == params(getattr(Backend, verb))


def test_the_verbs_that_report_progress_stream_it() -> None:
    reporting = {verb for verb in VERBS if "progress" in inspect.signature(getattr(Backend, verb)).parameters}
    assert reporting == STREAMED


def test_the_cluster_client_forwards_only_verbs() -> None:
    client = Cluster.__new__(Cluster)  # no cluster: only the forwarding is looked at
    assert callable(client.checkpoints)
    with pytest.raises(AttributeError):
        _ = client.not_a_verb


def test_a_node_agent_serves_only_verbs() -> None:
    agent = NodeAgent.__new__(NodeAgent)
    with pytest.raises(UsageError, match="no such verb"):
        agent.serve("forget", "j")


@pytest.mark.parametrize("verb", sorted(CLUSTER_ONLY))
def test_local_mode_refuses_cluster_verbs_in_one_line(engine: Engine, verb: str) -> None:
    with pytest.raises(UsageError, match="needs a cluster") as refused:
        getattr(engine, verb)(*CLUSTER_ONLY[verb])
    assert "\n" not in str(refused.value)


def test_local_mode_knows_only_its_own_node(engine: Engine) -> None:
    with pytest.raises(UsageError, match="the only node is 'local'"):
        engine.restore(RestoreRequest(path="file:///nowhere/c1"), node="elsewhere")
    with pytest.raises(UsageError, match="the only node is 'local'"):
        engine.manage("process", ManageRequest(target="1", node="elsewhere"))
