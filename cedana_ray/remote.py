"""Calls into cedana-ray actors, with Ray's failures turned into cedana-ray errors."""

from __future__ import annotations

from typing import Any

import ray
from ray import exceptions as rex

from cedana_ray.errors import CedanaError, Unreachable

NAMESPACE = "cedana-ray"
COORDINATOR = "cedana-ray-coordinator"
GONE = (rex.RayActorError, rex.ActorUnavailableError, rex.ActorUnschedulableError)


def call(ref: Any, timeout: float | None = None) -> Any:
    """``ray.get(ref)``; the actor's own CedanaError is re-raised as it was."""
    try:
        return ray.get(ref, timeout=timeout)
    except rex.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, CedanaError):
            raise cause from None
        if isinstance(cause, GONE):
            raise Unreachable(f"the cedana-ray actor is gone: {_first_line(cause)}") from None
        raise CedanaError(f"{type(cause).__name__}: {cause}") from exc
    except rex.GetTimeoutError:
        raise Unreachable(f"no answer within {timeout:.0f} s") from None
    except GONE as exc:
        raise Unreachable(f"the cedana-ray actor is gone: {_first_line(exc)}") from None


def detached(cls: type, name: str, node: str, *args: Any, concurrency: int = 16) -> Any:
    """A detached, named actor pinned to ``node`` and restarted by Ray when it dies;
    the running one if it exists already."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return (
        ray.remote(cls)
        .options(
            name=name,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            max_concurrency=concurrency,
            num_cpus=0,
            # jobs' supervisors are our children (spawn.py, plugins/process/launch.py) and outlive us
            runtime_env={"env_vars": {"RAY_kill_child_processes_on_worker_exit": "0"}},
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False),
        )
        .remote(*args)
    )


def agent_name(node_id: str) -> str:
    return f"cedana-ray-agent-{node_id}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
