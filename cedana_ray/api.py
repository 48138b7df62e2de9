"""The Python API of cedana-ray, on this machine (local mode).

Each function raises :class:`cedana_ray.errors.CedanaError` subclasses; the
models it returns are those the CLI prints with ``--json``::

    import cedana_ray
    job = cedana_ray.run(["python", "train.py"])
    ckpt = cedana_ray.dump(job.jid)
    cedana_ray.restore(job.jid)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from .engine import Engine
from .models import CheckpointInfo, Compression, CriuOptions, DumpResult, Job
from .requests import DumpRequest, ManageRequest, RestoreRequest, RunRequest


@functools.cache
def _engine() -> Engine:
    return Engine()


def run(cmd: Sequence[str], *, jid: str | None = None, cwd: str | None = None, type: str = "process") -> Job:
    """Start ``cmd`` as a checkpointable job. Returns the running :class:`Job`."""
    return _engine().run(type, RunRequest(cmd=list(cmd), jid=jid, cwd=cwd))


def manage(target: int | str, *, jid: str | None = None, type: str = "process") -> Job:
    """Adopt a running workload (a PID for ``process``) as a job."""
    return _engine().manage(type, ManageRequest(target=str(target), jid=jid))


def dump(
    jid: str,
    *,
    leave_running: bool = False,
    storage: str | None = None,
    compression: str = "zstd",
    criu: CriuOptions | None = None,
) -> DumpResult:
    """Checkpoint job ``jid``; without ``leave_running`` the job stops once it is stored."""
    request = DumpRequest(
        leave_running=leave_running, storage=storage, compression=Compression(compression), criu=criu or CriuOptions()
    )
    return _engine().dump(jid, request)


def restore(
    jid: str | None = None, *, checkpoint: str | None = None, path: str | None = None, new_jid: str | None = None
) -> Job:
    """Restore job ``jid`` (its last or a given checkpoint), or the checkpoint at ``path``."""
    return _engine().restore(RestoreRequest(checkpoint=checkpoint, path=path, jid=new_jid), jid=jid).job


def freeze(jid: str) -> Job:
    return _engine().freeze(jid)


def unfreeze(jid: str) -> Job:
    return _engine().unfreeze(jid)


def kill(jid: str) -> Job:
    return _engine().kill(jid)


def delete(jid: str) -> Job:
    return _engine().delete(jid)


def job(jid: str) -> Job:
    return _engine().job(jid)


def jobs() -> list[Job]:
    return _engine().jobs()


def checkpoints(jid: str | None = None) -> list[CheckpointInfo]:
    return _engine().checkpoints(jid)
