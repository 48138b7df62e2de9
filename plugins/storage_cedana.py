"""The ``storage/cedana`` plugin: ``cedana://PREFIX``, the cluster's own checkpoint store.

Files live on the head node (``actors.store_server``) and travel through Ray, so
migration and recovery work without a bucket or a shared filesystem. Any process that
reaches the cluster (an agent, the coordinator, the CLI after ``cedana-ray up``) can use
it; in local mode there is no such store.
"""

from __future__ import annotations

import sys
from typing import Any

from fsspec import AbstractFileSystem

from cedana_ray.errors import StorageError
from cedana_ray.hookspecs import hookimpl
from cedana_ray.models import HealthCheck


def _cluster() -> str:
    """The cluster whose store ``cedana://`` is, found without contacting it."""
    from cedana_ray import cluster_state

    ray = sys.modules.get("ray")  # not imported only to ask: the import costs most of a second
    if ray is not None and ray.is_initialized():
        return "the Ray cluster this process is connected to"
    address = cluster_state.address()
    if not address:
        raise StorageError("cedana:// is the cluster's store: no cluster here", hint="`cedana-ray up` first")
    return address


def _server() -> Any:
    import ray
    from cedana_ray.actors.store_server import STORE

    from cedana_ray import cluster
    from cedana_ray.remote import NAMESPACE

    if not ray.is_initialized():
        cluster.connect(_cluster())
    try:
        return ray.get_actor(STORE, namespace=NAMESPACE)
    except ValueError:
        raise StorageError("the cluster has no cedana:// store", hint="`cedana-ray up` starts it") from None


class CedanaFileSystem(AbstractFileSystem):
    """fsspec over the head node's StoreServer; whole-object writes, ranged reads."""

    protocol = "cedana"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.server = _server()

    def _call(self, method: str, *args: Any) -> Any:
        import ray
        from ray import exceptions as rex

        from cedana_ray.remote import GONE

        try:
            return ray.get(getattr(self.server, method).remote(*args))
        except rex.RayTaskError as exc:
            if isinstance(exc.cause, OSError):
                raise exc.cause from None  # FileNotFoundError and friends, as fsspec callers expect
            raise
        except GONE as exc:
            raise ConnectionError(f"the cedana:// store is unreachable: {type(exc).__name__}") from None

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        entries = self._call("ls", self._strip_protocol(path))
        return entries if detail else [e["name"] for e in entries]

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        return self._call("info", self._strip_protocol(path))

    def exists(self, path: str, **kwargs: Any) -> bool:
        if "/" not in self._strip_protocol(path).strip("/"):
            return True  # no buckets here: a top-level folder is made on first write
        return super().exists(path, **kwargs)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        return self._call("cat_file", self._strip_protocol(path), start, end)

    def pipe_file(self, path: str, value: bytes, **kwargs: Any) -> None:
        self._call("pipe_file", self._strip_protocol(path), value)

    def put_file(self, lpath: str, rpath: str, **kwargs: Any) -> None:
        with open(lpath, "rb") as f:
            self.pipe_file(rpath, f.read())

    def get_file(self, rpath: str, lpath: str, **kwargs: Any) -> None:
        with open(lpath, "wb") as f:
            f.write(self.cat_file(rpath))

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self._call("makedirs", self._strip_protocol(path))

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        self.makedirs(path, exist_ok=True)

    def rm(self, path: str, recursive: bool = False, maxdepth: int | None = None) -> None:
        self._call("rm", self._strip_protocol(path), recursive)


@hookimpl
def cedana_checkpoint_storage() -> dict[str, Any]:
    return {"cedana": CedanaFileSystem}


@hookimpl
def cedana_health_checks() -> list[HealthCheck]:
    # Whether a cluster is known, not whether it answers: connecting to Ray would make every
    # `features` and `check` wait seconds. Not fatal: local mode needs no cluster store.
    return [HealthCheck.probe("cluster store", lambda: f"cedana:// on {_cluster()} (not contacted)", fatal=False)]
