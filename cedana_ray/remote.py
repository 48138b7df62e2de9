"""Calls into cedana-ray actors, with Ray's failures turned into cedana-ray errors."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import ray
from ray import exceptions as rex

from cedana_ray.backend import Progress
from cedana_ray.errors import CedanaError, Unreachable

STREAMED = frozenset({"dump", "restore", "migrate"})  # the verbs whose progress a caller can follow
PROGRESS_EVERY_S = 0.1  # how often a stage's byte count travels; a new stage always does

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


@dataclass(frozen=True)
class Finished:
    """The last item of a :func:`streamed` call: what the work returned."""

    value: Any


def streamed(work: Callable[[Progress], Any]) -> Iterator[Any]:
    """Run ``work(progress)`` and yield its progress as ``(stage, done, total)`` as it comes,
    then :class:`Finished` with its result (its error is raised instead). Made for an actor's
    streaming generator method, so progress reaches a caller on another node."""
    updates: queue.Queue[tuple[str, int, int] | None] = queue.Queue()
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = work(lambda stage, done, total: updates.put((stage, done, total)))
        except BaseException as exc:  # raised again in the generator, for the caller
            outcome["error"] = exc
        finally:
            updates.put(None)

    threading.Thread(target=run, name="streamed", daemon=True).start()
    sent, sent_at = ("", -1, 0), 0.0
    while (update := updates.get()) is not None:
        news = update[0] != sent[0] or update[1] >= update[2] or time.monotonic() - sent_at >= PROGRESS_EVERY_S
        if news:
            sent, sent_at = update, time.monotonic()
            yield update
    if "error" in outcome:
        raise outcome["error"]
    yield Finished(outcome["value"])


def followed(stream: Iterable[Any], progress: Progress) -> Any:
    """The result of a :func:`streamed` call made remotely (``stream``: its object refs), its
    progress passed to ``progress`` on the way."""
    for ref in stream:
        item = call(ref)
        if isinstance(item, Finished):
            return item.value
        progress(*item)
    raise Unreachable("the call ended without an answer")
