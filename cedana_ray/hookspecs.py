"""Every hook a cedana-ray plugin can implement: one per feature row that a pipeline serves
(the "Run handler" row has none; see :mod:`cedana_ray.features`).

A plugin is registered under its name (``process``, ``runc``, ``storage/s3``...);
that name is the workload type it serves. Per-type hooks are called only on the
plugin of the job's type (see :func:`cedana_ray.plugins_manager.call_for`);
the others are called on every plugin. A plugin implements a hook only when that
feature works: the feature matrix is computed from these implementations. A runtime
plugin usually states what it does as a :class:`cedana_ray.runtime.Runtime`, which
implements these hooks for it.

The GPU hooks are the ``gpu`` plugin's: called for a job whose type supports GPU jobs
(see :mod:`cedana_ray.plugins_manager`), they give it the gpu plugin's middleware. Such a
type's dump middleware sets ``ctx.state.tree_root`` (its tree's host PID), and its
job's ``pid`` is its tree's root.

Middleware and handlers are those of :mod:`cedana_ray.pipeline`; what they may read and
write in ``ctx.state`` is its dataclass for each pipeline: :class:`~cedana_ray.pipeline.RunState`
(run and manage hooks), :class:`~cedana_ray.pipeline.DumpState`,
:class:`~cedana_ray.pipeline.RestoreState` and :class:`~cedana_ray.pipeline.QueryState`;
freeze and unfreeze handlers get the job only (``ctx.job``). Every hook is called through
pluggy (:meth:`cedana_ray.plugins_manager.PluginManager.call_for` calls a per-type hook on
one plugin's implementation), so a spec's ``firstresult`` and its argument names hold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import click

    from .live import LiveMigrator
    from .models import HealthCheck, Job
    from .pipeline import Handler, Middleware

PROJECT = "cedana_ray"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# -- commands (called on every plugin; each returns a click command named after its type)
@hookspec
def cedana_dump_command() -> click.Command:
    """``cedana-ray dump <type> ...``."""


@hookspec
def cedana_restore_command() -> click.Command:
    """``cedana-ray restore <type> ...``."""


@hookspec
def cedana_run_command() -> click.Command:
    """``cedana-ray run <type> ...``."""


@hookspec
def cedana_manage_command() -> click.Command:
    """``cedana-ray manage <type> ID``: adopt a workload started elsewhere."""


@hookspec
def cedana_freeze_command() -> click.Command:
    """``cedana-ray freeze <type> ID``."""


@hookspec
def cedana_unfreeze_command() -> click.Command:
    """``cedana-ray unfreeze <type> ID``."""


@hookspec
def cedana_query_command() -> click.Command:
    """``cedana-ray query <type>``."""


@hookspec
def cedana_helper_commands() -> list[click.Command]:
    """Top-level helper commands of the plugin (setup, teardown...)."""


# -- per-type pipeline pieces (called on the plugin of the job's type)
@hookspec(firstresult=True)
def cedana_dump_middleware() -> list[Middleware]:
    """Middleware run around the core dump chain, outermost first."""


@hookspec(firstresult=True)
def cedana_dump_handler() -> Handler:
    """Replaces the core's CRIU dump as the final step."""


@hookspec(firstresult=True)
def cedana_dump_vm_middleware() -> list[Middleware]:
    """Middleware of a virtual machine's dump (the VM pipeline: no CRIU, no GPU middleware)."""


@hookspec(firstresult=True)
def cedana_dump_vm_handler() -> Handler:
    """Dumps a virtual machine's state into ``ctx.state.images``: for a VM type, the dump's
    final step instead of CRIU (or a dump handler). Each file there is written once, in order,
    and read by the store alone, as it grows: where the images are staged, the store gives
    back the space of each part it stored, so nothing may read them back during the dump."""


@hookspec(firstresult=True)
def cedana_restore_middleware() -> list[Middleware]:
    """Middleware run around the core restore chain."""


@hookspec(firstresult=True)
def cedana_restore_middleware_late() -> list[Middleware]:
    """Middleware that wraps the final restore handler directly."""


@hookspec(firstresult=True)
def cedana_restore_handler() -> Handler:
    """Restores the workload from the local image dir in ``ctx.state.images``;
    returns the restored :class:`Job`. When ``ctx.state.leave_stopped`` is set, the
    restored tree must be left stopped: the core resumes it once the images are verified."""


@hookspec(firstresult=True)
def cedana_restore_vm_middleware() -> list[Middleware]:
    """Middleware of a virtual machine's restore."""


@hookspec(firstresult=True)
def cedana_restore_vm_handler() -> Handler:
    """Restores a virtual machine from ``ctx.state.images``; returns the restored :class:`Job`.
    For a VM type, the restore's final step; ``ctx.state.leave_stopped`` as for a restore handler."""


@hookspec(firstresult=True)
def cedana_freeze_handler() -> Handler:
    """Pauses the whole workload of ``ctx.job``."""


@hookspec(firstresult=True)
def cedana_unfreeze_handler() -> Handler:
    """Resumes the whole workload of ``ctx.job``."""


@hookspec(firstresult=True)
def cedana_live_migration() -> LiveMigrator:
    """A VM type's live migration between nodes by its hypervisor's own pre-copy migration
    (``migrate --live``): a :class:`~cedana_ray.live.LiveMigrator`, whose methods each node's
    agent calls on its side (see :mod:`cedana_ray.live`). Types without it refuse ``--live``."""


@hookspec(firstresult=True)
def cedana_run_handler_serverless() -> Handler:
    """Starts ``ctx.request`` as a workload; returns the new :class:`Job`. The only run
    handler: called by every ``run``, in local mode and by a cluster node's agent alike."""


@hookspec(firstresult=True)
def cedana_run_middleware() -> list[Middleware]:
    """Middleware around the run handler."""


@hookspec(firstresult=True)
def cedana_run_middleware_late() -> list[Middleware]:
    """Middleware that wraps the run handler directly."""


@hookspec(firstresult=True)
def cedana_manage_handler() -> Handler:
    """Adopts the workload named by ``ctx.request``; returns the new :class:`Job`."""


@hookspec(firstresult=True)
def cedana_kill_signal() -> int:
    """The signal that stops this type's workload after a dump or on `job kill`."""


@hookspec(firstresult=True)
def cedana_stopped(job: Job) -> bool:
    """Whether ``job``'s workload, sent its kill signal after a dump, is gone as its runtime
    reports it (containerd: its task is no longer running). The dump returns only once it is,
    asking again until a timeout; without this hook, once the job's process is dead."""


@hookspec(firstresult=True)
def cedana_resume(job: Job) -> None:
    """Lets ``job``'s workload go on after a dump stopped it and then failed or died (QEMU:
    QMP ``cont``). Without this hook, SIGCONT to its process tree, which CRIU leaves stopped."""


@hookspec(firstresult=True)
def cedana_cleanup(job: Job) -> None:
    """Removes what the workload left behind once it is gone (`job delete`)."""


@hookspec(firstresult=True)
def cedana_reaper(job: Job) -> int | None:
    """The exit code of a workload that is no longer running, or None if unknown."""


@hookspec(firstresult=True)
def cedana_gpu_interception() -> list[Middleware]:
    """Dump middleware that makes the job's GPU state checkpointable."""


@hookspec(firstresult=True)
def cedana_gpu_interception_restore() -> list[Middleware]:
    """Restore middleware that puts the GPU state back."""


@hookspec(firstresult=True)
def cedana_gpu_tracing() -> list[Middleware]:
    """Run middleware that traces the job's GPU activity."""


@hookspec(firstresult=True)
def cedana_gpu_tracing_restore() -> list[Middleware]:
    """Restore middleware that continues the GPU trace."""


@hookspec(firstresult=True)
def cedana_query_handler() -> Handler:
    """Lists this type's workloads on the node: a list of dicts."""


# -- called on every plugin
@hookspec
def cedana_checkpoint_storage() -> dict[str, Any]:
    """URL schemes this plugin stores checkpoints on: ``{scheme: fsspec class}``.

    A class may be given as its import path (``"pkg.module.Class"``), imported when
    the scheme is first used, so that heavy backends do not slow every command."""


@hookspec
def cedana_health_checks() -> list[HealthCheck]:
    """The plugin's prerequisites, checked now (binary, version, kernel features)."""
