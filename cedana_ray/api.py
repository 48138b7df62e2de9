"""The Python API of cedana-ray, on a cluster or on this machine.

Every function works against the backend :func:`init` chose: the cluster when one is
known (``init(address)``, ``CEDANA_RAY_ADDRESS``/``RAY_ADDRESS``, or ``cedana-ray up``
run on this machine), this machine alone otherwise or with ``init(local=True)``. The
models returned are those the CLI prints with ``--json``; errors are
:class:`cedana_ray.errors.CedanaError` subclasses::

    import cedana_ray
    job = cedana_ray.run(["python", "train.py"], checkpoint_every=60, keep=3)
    job.migrate("worker-3")      # a hostname, an IP or a node id prefix
    job.dump(leave_running=True)
    print(job.status, job.logs()[-200:])

Code running *inside* a job uses :func:`cedana_ray.checkpoint` and
:func:`cedana_ray.on_restore` (see :mod:`cedana_ray.inside`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .backend import Backend, Progress, open_backend
from .follow import follow
from .models import (
    CheckpointInfo,
    Compression,
    CriuOptions,
    DumpResult,
    Event,
    Job,
    JobState,
    MigrateResult,
    NodeStatus,
    RestoreResult,
)
from .requests import DumpRequest, ManageRequest, MigrateRequest, Resources, RestoreRequest, RunRequest
from .store import DEFAULT_STREAMS
from .working_dir import caller_cwd, pack

_backend: Backend | None = None


def init(address: str | None = None, *, local: bool = False) -> Backend:
    """Choose where jobs live: the cluster at ``address`` (default: the one known here), or this machine."""
    global _backend
    _backend = open_backend(address, local=local)
    return _backend


def _engine() -> Backend:
    return _backend or init()


class JobHandle(Job):
    """A job as the API returns it: its record when it was read, and its verbs, through the
    backend :func:`init` chose."""

    @property
    def status(self) -> JobState:
        """The job's state now (``state`` is what it was when this object was made)."""
        return job(self.jid).state

    def dump(self, **options: Any) -> DumpResult:
        """Checkpoint the job (``leave_running=True`` keeps it running); see :func:`dump`."""
        return dump(self.jid, **options)

    def restore(self, **options: Any) -> RestoreResult:
        """Restore the job; see :func:`restore`."""
        return restore(self.jid, **options)

    def migrate(self, node: str, **options: Any) -> MigrateResult:
        """Move the job to ``node``; see :func:`migrate`."""
        return migrate(self.jid, node, **options)

    def freeze(self) -> JobHandle:
        return freeze(self.jid)

    def unfreeze(self) -> JobHandle:
        return unfreeze(self.jid)

    def kill(self, signal: int | str | None = None) -> JobHandle:
        """Stop the job, or only send it ``signal``: see :func:`kill`."""
        return kill(self.jid, signal=signal)

    def logs(self) -> str:
        return logs(self.jid)

    def wait(self, output: Callable[[bytes], None] | None = None) -> JobHandle:
        """Wait until the job is over for good: see :func:`wait`."""
        return wait(self.jid, output=output)


def _handle(found: Job) -> JobHandle:
    return JobHandle.model_validate(found.model_dump())


def run(
    cmd: Sequence[str],
    *,
    jid: str | None = None,
    cwd: str | None = None,
    working_dir: str | None = None,
    env: dict[str, str] | None = None,
    inherit_env: bool = False,
    type: str = "process",
    node: str | None = None,
    checkpoint_every: float | None = None,
    keep: int | None = None,
    restore_on_loss: bool = False,
    storage: str | None = None,
    encrypt: bool = False,
    key: bytes | None = None,
    gpu: bool = False,
    gpu_tracing: bool = False,
    cpus: float = 0,
    gpus: float = 0,
    memory: int | str = 0,
) -> JobHandle:
    """Start ``cmd`` as a checkpointable job (on ``node``, or where it fits best). Returns the running job.
    ``gpu`` and ``gpu_tracing`` as ``run --gpu --gpu-tracing`` (docs/gpu.md); ``cpus``, ``gpus``
    and ``memory`` (bytes, or a size such as ``"4GiB"``) reserved in Ray while the job runs, as
    ``run --cpus --gpus --memory`` (docs/cluster.md); ``working_dir``: a directory packed
    here, and the job runs in a copy of it on each node it runs on (``run --working-dir``).

    The job's environment is ``env`` plus ``PATH``, ``HOME``, the locale and a few more
    (:data:`cedana_ray.environment.DEFAULTS`) of this process, wherever the job runs; with
    ``inherit_env`` all of this process's environment except its keys and credentials
    (:func:`cedana_ray.environment.secret`), which only ``env`` can pass.

    With ``encrypt``, every checkpoint of the job is encrypted (policy, migration, drain and
    ``checkpoint()`` ones too) with ``key``, else ``CEDANA_RAY_KEY``, else the cluster's own.
    """
    request = RunRequest(
        cmd=list(cmd),
        jid=jid,
        cwd=caller_cwd(cwd, working_dir),
        working_dir=pack(working_dir) if working_dir else None,
        env=env or {},
        inherit_env=inherit_env,
        node=node,
        checkpoint_every=checkpoint_every,
        keep=keep,
        restore_on_loss=restore_on_loss,
        encrypt=encrypt,
        key=key,
        gpu=gpu,
        gpu_tracing=gpu_tracing,
        resources=Resources(cpus=cpus, gpus=gpus, memory=memory),
    )
    return submit(type, request, storage=storage)


def submit(type: str, request: RunRequest, *, storage: str | None = None) -> JobHandle:
    """Start a job of ``type`` from its run request: for a type whose run takes more than a
    command, its plugin's own request (a VM: ``cedana_ray.plugins.qemu.plugin.vm_request(...)``)."""
    started = _engine().run(type, request)
    return _handle(_engine().set_storage(started.jid, storage) if storage else started)


def manage(target: int | str, *, jid: str | None = None, type: str = "process") -> JobHandle:
    """Adopt a running workload of this node (a PID for ``process``) as a job."""
    return _handle(_engine().manage(type, ManageRequest(target=str(target), jid=jid)))


def dump(
    jid: str,
    *,
    leave_running: bool = False,
    storage: str | None = None,
    compression: str | None = None,
    criu: CriuOptions | None = None,
    encrypt: bool = False,
    key: bytes | None = None,
    streams: int = DEFAULT_STREAMS,
    metadata: dict[str, str | int | float | bool | None] | None = None,
    progress: Progress | None = None,
) -> DumpResult:
    """Checkpoint job ``jid``; without ``leave_running`` the job stops once it is stored.
    ``encrypt`` with ``key`` (a job run with ``encrypt``, or a key configured, is always encrypted);
    ``compression`` (``"none"``, ``"lz4"``, ``"zstd"``, ``"gzip"``), where None the store's default:
    none on local disk, zstd on a remote store; ``streams`` as ``--streams``; ``metadata``
    labels the checkpoint (``{"step": 1200}``);
    ``progress(stage, done, total)`` is told each stage and, while data moves, its bytes
    (from the job's node, on a cluster)."""
    request = DumpRequest(
        leave_running=leave_running,
        storage=storage,
        compression=Compression(compression) if compression else None,
        criu=criu or CriuOptions(),
        encrypt=encrypt,
        key=key if encrypt else None,
        streams=streams,
        metadata=metadata or {},
    )
    return _engine().dump(jid, request, progress)


def restore(
    jid: str | None = None,
    *,
    checkpoint: str | None = None,
    path: str | None = None,
    new_jid: str | None = None,
    node: str | None = None,
    gpu_map: dict[str, str] | None = None,
    key: bytes | None = None,
    progress: Progress | None = None,
) -> RestoreResult:
    """Restore job ``jid`` (its last or a given checkpoint), or the checkpoint at ``path``; on
    ``node`` if given; ``gpu_map``: checkpointed GPU -> GPU there, as ``restore --gpu-map``;
    ``key``: of an encrypted checkpoint (default: the job's, or the one configured);
    ``progress`` as :func:`dump`'s. Returns what ``restore --json`` prints: the checkpoint,
    the time each stage took, and the restored job (a :class:`JobHandle`) as ``job``."""
    request = RestoreRequest(checkpoint=checkpoint, path=path, jid=new_jid, gpu_map=gpu_map or {}, key=key)
    result = _engine().restore(request, jid=jid, progress=progress, node=node)
    return result.model_copy(update={"job": _handle(result.job)})


def migrate(
    jid: str,
    node: str,
    *,
    store: bool = True,
    through_store: bool | None = None,
    live: bool = False,
    progress: Progress | None = None,
) -> MigrateResult:
    """Move job ``jid`` to ``node`` (a hostname, an IP or an id prefix), same id: its images go
    straight there, or through the store (``through_store``; by default whichever copies less),
    and are kept as its checkpoint once it runs there unless ``store`` is false; ``progress``
    as :func:`dump`'s, through both.
    ``live``: a VM job, moved by its hypervisor's own pre-copy migration while it runs, with
    no checkpoint (``downtime_s`` is the hypervisor's figure; see docs/vms.md)."""
    request = MigrateRequest(store=store, through_store=through_store)
    return _engine().migrate(jid, node, request, progress=progress, live=live)


def freeze(jid: str) -> JobHandle:
    return _handle(_engine().freeze(jid))


def unfreeze(jid: str) -> JobHandle:
    return _handle(_engine().unfreeze(jid))


def kill(jid: str, *, signal: int | str | None = None) -> JobHandle:
    """Stop job ``jid`` with its type's kill signal and record it killed; given ``signal``
    (a number or a name: ``"TERM"``, ``"SIGINT"``), only send it that, as ``kill`` does:
    a workload that exits on it is then recorded as exited, with its code.

    Raises:
        UsageError: no such signal.
        StateError: the job is not running or frozen.
    """
    return _handle(_engine().kill(jid, signal))


def delete(jid: str) -> JobHandle:
    return _handle(_engine().delete(jid))


def job(jid: str) -> JobHandle:
    return _handle(_engine().job(jid))


def jobs() -> list[JobHandle]:
    return [_handle(j) for j in _engine().jobs()]


def wait(jid: str, *, output: Callable[[bytes], None] | None = None) -> JobHandle:
    """Wait until job ``jid`` is over for good (exited, killed, or lost with no restore to come),
    through dumps, restores and migrations; ``output`` gets what it prints, from the start, as it
    comes. The job as it ended: ``exit_code`` is the workload's."""
    return _handle(follow(_engine(), jid, output))


def logs(jid: str) -> str:
    """Everything job ``jid`` printed so far."""
    data = b""
    while chunk := _engine().read_log(jid, len(data)):
        data += chunk
    return data.decode(errors="replace")


def checkpoints(jid: str | None = None) -> list[CheckpointInfo]:
    return _engine().checkpoints(jid)


def events(jid: str | None = None, after: int = 0) -> list[Event]:
    """The history of job ``jid`` (of every job if None), oldest first, after its ``after``-th
    event (``cedana-ray events``)."""
    return _engine().events(jid, after)


def import_checkpoint(url: str) -> CheckpointInfo:
    """Trust and catalog the checkpoint at ``url``, made by another cluster or state dir
    (``cedana-ray checkpoint import``)."""
    return _engine().import_checkpoint(url)


def nodes() -> list[NodeStatus]:
    return _engine().nodes()
