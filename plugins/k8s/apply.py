"""Apply (create or replace) and delete objects through the official Kubernetes client.

Each object is dispatched by its ``apiVersion`` and ``kind`` to the client's typed call
(``create_namespaced_daemon_set``...). The API server's answers become our errors at this
boundary, one line each: no configuration or no answer is a :class:`PrerequisiteError`,
401/403 a :class:`PermissionDenied`, anything else a :class:`StateError`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import urllib3
from kubernetes import client as k
from kubernetes import config as kconfig
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from cedana_ray.errors import CedanaError, PermissionDenied, PrerequisiteError, StateError

TIMEOUT_S = (5.0, 30.0)  # connect, read
APIS: dict[str, type] = {
    "v1": k.CoreV1Api,
    "apps/v1": k.AppsV1Api,
    "rbac.authorization.k8s.io/v1": k.RbacAuthorizationV1Api,
}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "Node"}


def api_client(kubeconfig: str | None = None, context: str | None = None) -> k.ApiClient:
    """A client for the cluster of ``kubeconfig`` (``KUBECONFIG``, else ``~/.kube/config``),
    else of the pod we run in."""
    cfg = k.Configuration()
    try:
        kconfig.load_kube_config(config_file=kubeconfig, context=context, client_configuration=cfg)
    except (ConfigException, FileNotFoundError, TypeError) as exc:
        try:
            kconfig.load_incluster_config(client_configuration=cfg)
        except ConfigException:
            raise PrerequisiteError(
                f"no Kubernetes API server configured: {_first_line(exc)}",
                hint="set KUBECONFIG or --kubeconfig, or run in a pod",
            ) from exc
    cfg.retries = 0  # one try: a server that does not answer is said at once
    return k.ApiClient(cfg)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _snake(kind: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", kind).lower()


def _call(api: k.ApiClient, obj: Any, verb: str) -> Callable[..., Any]:
    """The client's ``VERB_[namespaced_]KIND`` for ``obj``, its namespace bound where it has one."""
    scoped = "" if obj.kind in CLUSTER_SCOPED else "namespaced_"
    method = getattr(APIS[obj.api_version](api), f"{verb}_{scoped}{_snake(obj.kind)}")
    if scoped:
        return lambda *args, **kw: method(*args, namespace=obj.metadata.namespace, **kw)
    return method


@contextlib.contextmanager
def translated(api: k.ApiClient, what: str) -> Iterator[None]:
    """The client's and urllib3's errors as ours, naming the server and ``what`` was asked."""
    host = api.configuration.host
    try:
        yield
    except ApiException as exc:
        raise _api_error(exc, host, what) from exc
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise PrerequisiteError(f"the Kubernetes API server at {host} is not reachable: {_first_line(reason)}") from exc


def _api_error(exc: ApiException, host: str, what: str) -> CedanaError:
    message = f"{what}: the Kubernetes API server at {host} answered {exc.status} {exc.reason}"
    if exc.status in (401, 403):
        return PermissionDenied(message, hint="the kubeconfig's user needs to manage these objects")
    return StateError(message)


def _status(exc: BaseException) -> int | None:
    cause = exc.__cause__
    return cause.status if isinstance(cause, ApiException) else None


def apply(api: k.ApiClient, obj: Any) -> str:
    """Create ``obj`` (a typed ``kubernetes.client`` model), or replace it where it exists;
    ``created`` or ``replaced``."""
    name, what = obj.metadata.name, f"{obj.kind} {obj.metadata.name}"
    try:
        with translated(api, f"create {what}"):
            _call(api, obj, "create")(body=obj, _request_timeout=TIMEOUT_S)
        return "created"
    except StateError as exc:
        if _status(exc) != 409:  # 409 Conflict: it exists
            raise
    with translated(api, f"replace {what}"):
        current = _call(api, obj, "read")(name, _request_timeout=TIMEOUT_S)
        body = obj.model_copy(deep=True)
        body.metadata.resource_version = current.metadata.resource_version
        _call(api, obj, "replace")(name, body=body, _request_timeout=TIMEOUT_S)
    return "replaced"


def delete(api: k.ApiClient, obj: Any) -> str:
    """Delete ``obj``; ``deleted``, or ``absent`` where there was none."""
    name = obj.metadata.name
    try:
        with translated(api, f"delete {obj.kind} {name}"):
            _call(api, obj, "delete")(name, _request_timeout=TIMEOUT_S)
    except StateError as exc:
        if _status(exc) == 404:
            return "absent"
        raise
    return "deleted"
