"""The ``qemu`` plugin: virtual machines run by QEMU, checkpointed through QEMU's own
migration, not CRIU.

Why migration and not CRIU: QEMU knows its devices and the guest's RAM, and writes both as
a migration stream that any QEMU of the same machine type loads (``-incoming``); CRIU would
have to restore the emulator process itself, with its threads, its accelerator's state and
its file descriptors. A dump stops the guest (QMP ``stop``), migrates it into a file in the
checkpoint's image dir, beside copies of its kernel and initrd, and of its disk if it has one
(copied once the migration completed: QEMU flushed it, and the guest cannot write while
paused), and the core stores that dir like any checkpoint (chunks, checksums, signed manifest;
a disk's unchanged chunks are stored once across checkpoints). Until the checkpoint is stored the VM
stays paused, not gone: a failed dump resumes it (QMP ``cont``, its ``resume``), as does the
next command after a dump that died (:mod:`cedana_ray.recovery`); once stored the
core stops it with SIGTERM, on which QEMU quits as on QMP ``quit``. A restore starts QEMU with
the same machine, ``-S -incoming`` from the state file, waits for the state to load, then
``cont``: the guest goes on where it stopped.

Each VM runs under a supervisor (``watch.py``) whose job log is the guest's serial console.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from cedana_ray.errors import DumpError, RestoreError, StorageError, UsageError
from cedana_ray.models import AbsolutePath, Job, JobState
from cedana_ray.pipeline import Context
from cedana_ray.requests import RunRequest
from cedana_ray.runtime import Runtime
from cedana_ray.spawn import LOG, LaunchError, launch, started_at

from . import commands, guest, pace, watch
from .guest import DISK, ERRORS, HOLD, INITRD, KERNEL, QMP_SOCKET, STATE, Vm
from .live import QemuLive
from .qmp import Qmp, QmpError

NAME = "qemu"
LIVE = (JobState.running, JobState.frozen)


class QemuRunRequest(RunRequest):
    """``run qemu``: the guest's kernel, initrd and disk (``cmd`` only describes the VM); the
    disk's format is detected at run, whatever ``vm.disk`` says."""

    kernel: AbsolutePath
    initrd: AbsolutePath | None = None
    disk: AbsolutePath | None = None
    vm: Vm


def vm_request(
    kernel: str | Path,
    *,
    initrd: str | Path | None = None,
    disk: str | Path | None = None,
    memory: str = "256M",
    cpus: int = 1,
    kvm: bool = False,
    append: Sequence[str] = (),
    **options: Any,
) -> QemuRunRequest:
    """A VM job's run request, as ``run qemu`` makes it, for the Python API's ``submit``: the
    files checked (one-line errors before anything starts), the disk's format told by its
    magic, ``append`` the kernel command line's words (default: console=ttyS0 panic=-1 quiet);
    ``options`` are RunRequest's (``jid``, ``node``, ``checkpoint_every``, ``keep``,
    ``restore_on_loss``, ``encrypt``...)."""
    kernel_file, initrd_file = _file(kernel, "--kernel"), _file(initrd, "--initrd")
    disk_file, fmt = guest.require_disk(Path(disk)) if disk else (None, None)
    append_line = " ".join(append) or guest.DEFAULT_APPEND
    accel = "kvm" if kvm else "tcg"
    vm = Vm(memory=memory, cpus=cpus, accel=accel, append=append_line, initrd=initrd_file is not None, disk=fmt)
    cmd = [guest.QEMU, "-kernel", kernel_file, *(["-initrd", initrd_file] if initrd_file else [])]
    cmd += ["-drive", str(disk_file)] if disk_file else []
    files = {"kernel": kernel_file, "initrd": initrd_file, "disk": disk_file}
    return QemuRunRequest(cmd=[*cmd, "-m", vm.memory, "-append", vm.append], **files, vm=vm, **options)


def _file(value: str | Path | None, what: str) -> str | None:
    """An absolute path to a readable file; a one-line UsageError before anything starts."""
    return str(guest.require_file(Path(value), what)) if value else None


class RestoreFacts(BaseModel):
    """What a VM checkpoint's details must hold to be restored."""

    vm: Vm
    frozen: bool = False


def _job_dir(job: Job) -> Path:
    assert job.log, f"qemu job {job.jid} has no log"  # every VM job has one, beside its QMP socket
    return Path(job.log).parent


def _qmp(job: Job) -> Qmp:
    return Qmp(_job_dir(job) / QMP_SOCKET)


def _place(job_dir: Path, kernel: Path, initrd: Path | None) -> None:
    """The VM's own copies of its boot files in its job dir: a dump stores them with the
    state (QEMU's ROMs must match it on restore) whatever becomes of the originals."""
    shutil.copyfile(kernel, job_dir / KERNEL)
    if initrd:
        shutil.copyfile(initrd, job_dir / INITRD)


def copy_disk(source: Path, dest: Path) -> None:
    """A disk image copied, by reflink where the filesystem shares blocks (instant, no space
    taken), holes kept; raises OSError with cp's own words (No space left on device)."""
    try:
        subprocess.run(
            ["cp", "--reflink=auto", "--sparse=always", "--", str(source), str(dest)],
            capture_output=True,
            text=True,
            check=True,
            timeout=3600,
        )
    except subprocess.CalledProcessError as exc:
        said = (exc.stderr or "").strip().splitlines()
        raise OSError(said[-1] if said else f"cp exited {exc.returncode}") from exc
    except subprocess.TimeoutExpired as exc:
        raise OSError(f"copying {source} took over {exc.timeout:.0f} s") from exc


def _start(ctx: Context, vm: Vm, incoming: Path | None = None) -> dict[str, Any]:
    """QEMU under its supervisor, in the job dir; its reply once QMP listens."""
    return start_in(ctx.state.job_dir, guest.argv(vm, ctx.state.job_dir, incoming))


def start_in(job_dir: Path, argv: list[str], hold: bool = False) -> dict[str, Any]:
    """QEMU run with ``argv`` under its supervisor in ``job_dir``; with ``hold``, its console
    held back until the file :data:`~.guest.HOLD` there is removed (a live migration's target)."""
    (job_dir / QMP_SOCKET).unlink(missing_ok=True)  # a dead QEMU's socket would look ready
    spec = {"argv": argv, "cwd": str(job_dir), "qmp": QMP_SOCKET, "errors": str(job_dir / ERRORS)}
    if hold:
        (job_dir / HOLD).touch()
        spec["hold"] = HOLD
    return launch(spec, job_dir, watch)


@contextlib.contextmanager
def _killed_on_failure(pid: int) -> Iterator[None]:
    """A QEMU that started but whose job is not made must not run on unseen."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        raise


def _job(ctx: Context, reply: dict[str, Any], vm: Vm, state: JobState, command: list[str]) -> Job:
    return job_of(ctx.state.jid, ctx.state.job_dir, reply, vm, state, command)


def job_of(jid: str, job_dir: Path, reply: dict[str, Any], vm: Vm, state: JobState, command: list[str]) -> Job:
    """The job of the QEMU that ``reply`` (its supervisor's) describes, in ``job_dir``."""
    details = {"started": started_at(reply), "target": jid, "vm": vm.model_dump()}
    log = str(job_dir / LOG)
    return Job(jid=jid, type=NAME, pid=reply["pid"], state=state, command=command, log=log, details=details)


def run(ctx: Context) -> Job:
    """Boot the VM under QEMU; the machine type recorded as the versioned one it is."""
    req: QemuRunRequest = ctx.request
    guest.require_accel(req.vm.accel)
    kernel = guest.require_file(Path(req.kernel), "--kernel")
    initrd = guest.require_file(Path(req.initrd), "--initrd") if req.initrd else None
    disk, fmt = guest.require_disk(Path(req.disk)) if req.disk else (None, None)
    _place(ctx.state.job_dir, kernel, initrd)
    if disk:  # the VM writes its own copy, never the user's file
        try:
            copy_disk(disk, ctx.state.job_dir / DISK)
        except OSError as exc:
            raise StorageError(f"--disk {disk}: cannot copy it into the job dir: {exc}") from exc
    vm = req.vm.model_copy(update={"disk": fmt})
    try:
        reply = _start(ctx, vm)
    except LaunchError as exc:
        raise UsageError(f"QEMU could not start the VM: {exc}") from exc
    with _killed_on_failure(reply["pid"]):
        vm = vm.model_copy(update={"machine": _machine(ctx.state.job_dir, vm.machine)})
    return _job(ctx, reply, vm, JobState.running, req.cmd)


def _machine(job_dir: Path, alias: str) -> str:
    """The versioned machine type the new QEMU runs (QEMU may also have exited at once: a
    kernel it cannot load)."""
    try:
        with Qmp(job_dir / QMP_SOCKET) as qmp:
            return qmp.machine(alias) or alias
    except QmpError as exc:
        raise UsageError(f"QEMU could not start the VM: {qemu_said(job_dir) or exc}") from exc


def dump(ctx: Context) -> None:
    """Stop the guest and migrate it into the image dir; resumed if the dump fails, and
    after it with ``--leave-running``."""
    job: Job = ctx.job
    images: Path = ctx.state.images
    vm = Vm.model_validate(job.details["vm"])
    frozen = job.state is JobState.frozen
    ctx.state.details = {"vm": vm.model_dump(), "frozen": frozen, "qemu": guest.version()}
    for name in (KERNEL, INITRD) if vm.initrd else (KERNEL,):
        shutil.copyfile(_job_dir(job) / name, images / name)
    try:
        with _qmp(job) as qmp:
            qmp.execute("stop")  # a failed dump resumes it: resume=_resume below
            qmp.migrate_to_file(images / STATE, ctx.state.staged_max)
            if vm.disk:  # flushed by QEMU as the migration completed; the guest is paused
                _copy_disk_into(job, images, ctx.state.staged_max)
            if ctx.request.leave_running and not frozen:
                qmp.execute("cont")
    except QmpError as exc:
        raise DumpError(f"dump of VM {job.jid} failed: {exc}") from exc


def _copy_disk_into(job: Job, images: Path, staged_max: int | None) -> None:
    """The disk into the images: copied (a reflink where it can be) into a store's own folder,
    or staged at the store's pace."""
    try:
        if staged_max is None:
            copy_disk(_job_dir(job) / DISK, images / DISK)
        else:
            with open(_job_dir(job) / DISK, "rb") as disk:
                pace.write(disk.fileno(), str(images / DISK), staged_max)
    except OSError as exc:
        raise DumpError(f"dump of VM {job.jid} failed: its disk: {exc}") from exc


def _resume(job: Job) -> None:
    with _qmp(job) as qmp:
        qmp.execute("cont")


def restore(ctx: Context) -> Job:
    """A new QEMU of the same machine loads the state, then the guest goes on (or stays
    paused, if it was frozen when dumped)."""
    manifest = ctx.state.manifest
    facts = manifest.facts(RestoreFacts)
    images: Path = ctx.state.images
    guest.require_accel(facts.vm.accel)
    wanted = (STATE, KERNEL, *((INITRD,) if facts.vm.initrd else ()), *((DISK,) if facts.vm.disk else ()))
    missing = [n for n in wanted if not (images / n).exists()]
    if missing:
        raise RestoreError(f"checkpoint {manifest.checkpoint} has no {', '.join(missing)}: not a VM checkpoint")
    _place(ctx.state.job_dir, images / KERNEL, images / INITRD if facts.vm.initrd else None)
    if facts.vm.disk:  # its own copy: the images may be the store's files themselves
        try:
            copy_disk(images / DISK, ctx.state.job_dir / DISK)
        except OSError as exc:
            raise RestoreError(f"restore of checkpoint {manifest.checkpoint} failed: its disk: {exc}") from exc
    try:
        reply = _start(ctx, facts.vm, incoming=images / STATE)
    except LaunchError as exc:
        raise RestoreError(f"QEMU could not restore checkpoint {manifest.checkpoint}: {exc}") from exc
    with _killed_on_failure(reply["pid"]):
        _load(ctx, facts.frozen)
    state = JobState.frozen if facts.frozen else JobState.running
    return _job(ctx, reply, facts.vm, state, ctx.state.command)


def _load(ctx: Context, frozen: bool) -> None:
    """Wait for the incoming state to load (QEMU reads it before the handler's images go),
    then resume the guest unless it was frozen."""
    try:
        with Qmp(ctx.state.job_dir / QMP_SOCKET) as qmp:
            qmp.wait_migration()
            if not frozen:
                qmp.execute("cont")
    except QmpError as exc:
        said = qemu_said(ctx.state.job_dir) or exc
        raise RestoreError(f"restore of checkpoint {ctx.state.manifest.checkpoint} failed: {said}") from exc


def qemu_said(job_dir: Path) -> str:
    """QEMU's last word in ``job_dir`` (its stderr, kept apart from the guest's console)."""
    return watch.last_line(str(job_dir / ERRORS))


def freeze(ctx: Context) -> None:
    with _qmp(ctx.job) as qmp:
        qmp.execute("stop")


def unfreeze(ctx: Context) -> None:
    with _qmp(ctx.job) as qmp:
        qmp.execute("cont")


def query(ctx: Context) -> list[dict[str, Any]]:
    """The VM jobs of this node, with what QEMU says of each live one (QMP ``query-status``)."""
    return [_row(job) for job in ctx.request]


def _row(job: Job) -> dict[str, Any]:
    vm = job.details.get("vm", {})
    status = None
    if job.state in LIVE:
        try:
            with _qmp(job) as qmp:
                status = qmp.status()
        except QmpError:
            status = "unreachable"
    row = {"jid": job.jid, "state": job.state.value, "pid": job.pid, "status": status}
    return {**row, **{k: vm.get(k) for k in ("memory", "cpus", "accel", "machine")}}


def cleanup(job: Job) -> None:
    """QMP ``quit`` if QEMU still answers (the kit then removes the job dir: socket, boot files, log)."""
    with contextlib.suppress(QmpError), _qmp(job) as qmp:
        qmp.execute("quit")


plugin = Runtime(
    NAME,
    run=run,
    dump_vm=dump,  # the VM pipeline: QEMU's migration, no CRIU
    restore_vm=restore,
    freeze=freeze,
    unfreeze=unfreeze,
    query=query,
    commands=commands.COMMANDS,
    health_checks=guest.health_checks,
    resume=_resume,
    kill_signal=signal.SIGTERM,  # QEMU quits on it as on QMP `quit`; a paused guest too
    cleanup=cleanup,
    hooks={"cedana_live_migration": QemuLive()},  # migrate --live: QEMU's pre-copy migration (live.py)
)
