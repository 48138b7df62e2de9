"""The cluster as a client sees it: the Coordinator behind the Engine's methods.

Any process (the CLI, a driver, a Ray job's entrypoint) that can reach the Ray cluster
talks to the coordinator through :class:`Cluster`, which has the verbs of the local
:class:`~cedana_ray.engine.Engine` (:class:`~cedana_ray.backend.Backend`), so commands
and the Python API work the same in both modes.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import auth
from .backend import VERBS, Backend
from .cluster_state import ClusterState, load_state
from .errors import PrerequisiteError
from .models import Job
from .plugins_manager import register_storage
from .requests import ManageRequest


def use_auth_of(addr: str, state: ClusterState | None) -> None:
    """Connect to ``addr`` as ``up`` set it up (see cedana_ray.auth), unless the environment
    already says how (a Ray job's, a node's, or the user's own RAY_AUTH_MODE)."""
    if auth.MODE in os.environ or state is None or state.address != addr:
        return
    auth.use(Path(state.auth_token_file) if state.auth_token_file else None)


def _refused(exc: BaseException) -> bool:
    """Whether a failed ``ray.init`` was refused for its token: Ray's GCS client gives up with
    a RuntimeError that holds the AuthenticationError only as text."""
    cause: BaseException | None = exc
    while cause is not None and "InvalidAuthToken" not in str(cause):
        cause = cause.__cause__
    return cause is not None


def connect(addr: str, state: ClusterState | None = None) -> None:
    """Connect this process to the Ray cluster at ``addr``, with the auth token of ``state``
    (default: what ``up`` recorded here)."""
    import ray

    from .remote import NAMESPACE

    if ray.is_initialized():
        return
    use_auth_of(addr, state or load_state())
    try:
        ray.init(
            address=addr,
            namespace=NAMESPACE,
            logging_level=logging.ERROR,
            log_to_driver=False,
            configure_logging=False,
        )
    except ConnectionError as exc:
        if _refused(exc):
            raise PrerequisiteError(
                f"the Ray cluster at {addr} refused our auth token",
                hint=f"use the head's token: {auth.TOKEN_PATH}=FILE (see docs/cluster.md)",
            ) from None
        raise PrerequisiteError(
            f"cannot reach the Ray cluster at {addr}: {exc}", hint="`cedana-ray up`, or --local"
        ) from None


def through_gateway(addr: str) -> Backend | None:
    """The cluster at ``addr`` through its coordinator's gateway, where ``up`` recorded one here
    that commands may use (see :func:`~cedana_ray.wire.endpoint`); it connects to Ray only for
    what needs Ray."""
    from .gateway import GatewayClient
    from .wire import endpoint

    found = endpoint(addr)
    return None if found is None else GatewayClient(*found, lambda: Cluster(addr))


class Cluster:
    """cedana-ray on a Ray cluster: every verb of :class:`~cedana_ray.backend.Backend` is
    the coordinator's, called with the same arguments."""

    def __init__(self, addr: str, state: ClusterState | None = None) -> None:
        import ray

        from .remote import COORDINATOR, NAMESPACE

        connect(addr, state)
        register_storage()  # the plugins' schemes, for checkpoint URLs read here
        self.address = addr
        try:
            self.coordinator = ray.get_actor(COORDINATOR, namespace=NAMESPACE)
        except ValueError:
            raise PrerequisiteError(
                f"no cedana-ray coordinator on the Ray cluster at {addr}", hint="`cedana-ray up`, or --local"
            ) from None

    def __getattr__(self, verb: str) -> Callable[..., Any]:
        if verb not in VERBS:
            raise AttributeError(verb)
        return functools.partial(self._call, verb)

    def _call(self, verb: str, *args: Any, **kwargs: Any) -> Any:
        """The coordinator's ``verb``, its arguments passed by name; a progress callback stays
        here (it is this process's): the coordinator streams the progress to it."""
        from .remote import STREAMED, call, followed

        bound = inspect.signature(getattr(Backend, verb)).bind(self, *args, **kwargs).arguments
        named = {k: v for k, v in bound.items() if k not in ("self", "progress")}
        progress = bound.get("progress")
        if progress is not None and verb in STREAMED:
            return followed(self.coordinator.stream.options(num_returns="streaming").remote(verb, named), progress)
        return call(getattr(self.coordinator, verb).remote(**named))

    @property
    def node(self) -> str:
        """The node this client runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def manage(self, jtype: str, request: ManageRequest) -> Job:
        """Adopt a workload of the node this client runs on (default)."""
        return self._call("manage", jtype, request.model_copy(update={"node": request.node or self.node}))
