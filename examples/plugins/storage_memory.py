"""An example storage plugin: checkpoints kept in this process's memory (``ckptmem://NAME/PREFIX``).

A storage plugin gives the core an fsspec filesystem class per URL scheme; the core's
:class:`cedana_ray.store.CheckpointStore` does the rest (chunks, compression, sha256,
the signed manifest). This one is fsspec's in-memory filesystem under a scheme of its
own, with files of its own, so that it never mixes with other users of ``memory://``.
Its checkpoints last as long as the process: it is for tests and for reading, not for jobs.
"""

from __future__ import annotations

from typing import Any, ClassVar

from fsspec.implementations.memory import MemoryFileSystem

from cedana_ray.hookspecs import hookimpl
from cedana_ray.models import HealthCheck

SCHEME = "ckptmem"


class CheckpointMemoryFileSystem(MemoryFileSystem):
    """fsspec's ``MemoryFileSystem`` as ``ckptmem://``, with its own files."""

    protocol = (SCHEME,)
    store: ClassVar[dict[str, Any]] = {}  # not memory://'s: a class of its own keeps its own files
    pseudo_dirs: ClassVar[list[str]] = [""]

    @classmethod
    def _strip_protocol(cls, path: Any) -> str:
        # the parent strips only "memory://"
        if isinstance(path, str):
            path = path.removeprefix(f"{SCHEME}://")
        return super()._strip_protocol(path)


@hookimpl
def cedana_checkpoint_storage() -> dict[str, Any]:
    # a class, or its import path as a string when importing it is slow (see storage/s3)
    return {SCHEME: CheckpointMemoryFileSystem}


@hookimpl
def cedana_health_checks() -> list[HealthCheck]:
    # memory has no prerequisite; a real backend checks its credentials and endpoint here
    files = len(CheckpointMemoryFileSystem.store)
    return [HealthCheck(name="memory store", ok=True, detail=f"{files} files, gone when the process exits")]
