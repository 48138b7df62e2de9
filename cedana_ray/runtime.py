"""The kit for runtime plugins: a plugin states what it does, the kit makes its hooks.

A runtime plugin's module states its handlers, middleware, commands and health checks and
one :class:`Runtime`; its entry point names that object (``"pkg.plugin:plugin"``), which
pluggy registers like a module: the kit gives it a ``@hookimpl`` attribute for each hook
the runtime serves, and none for the others, since the feature matrix is computed from
which hooks a plugin implements. What every runtime would otherwise copy comes from here:

- a type that starts workloads (a run or restore handler) gets SIGKILL as its kill signal
  (a container's or namespace's init ignores signals it has no handler for, and a dumped
  tree is stopped), the shared reaper (the exit code its supervisor recorded, see
  :mod:`cedana_ray.spawn`) and the removal of its job dir after its own cleanup;
- ``supports_gpu=True`` gives its jobs the gpu plugin's middleware (the plugin manager
  answers the GPU hooks of such a type with the gpu plugin's, see
  :meth:`cedana_ray.plugins_manager.PluginManager.call_for`);
- its ``manage``, ``dump``, ``freeze``, ``unfreeze`` and ``query`` commands are built from
  how users name its workloads (:class:`Commands`).
"""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .hookspecs import hookimpl
from .spawn import EXIT_FILE, recorded_exit

if TYPE_CHECKING:
    import click

    from .models import HealthCheck, Job
    from .pipeline import Context, Handler, Middleware
    from .requests import RestoreRequest

REAP_GRACE_S = 2.0  # how long a supervisor may take to record an exit once its workload is gone
VERBS = ("run", "restore", "manage", "dump", "freeze", "unfreeze", "query")


def reap_recorded(job: Job) -> int | None:
    """The exit code the job's supervisor recorded in its job dir; None for a job that has
    none (adopted with ``manage``: its parent is not ours) or whose code never came."""
    if not job.log:
        return None
    return recorded_exit(os.path.join(os.path.dirname(job.log), EXIT_FILE), job.pid, REAP_GRACE_S)


def remove_job_dir(job: Job) -> None:
    """Remove the job dir (log, exit file, the runtime's own files) once the job is gone."""
    if job.log:
        shutil.rmtree(os.path.dirname(job.log), ignore_errors=True)


def require_gpu(ctx: Context, next_: Handler) -> Job:
    """Run middleware of a type with a ``--gpu`` option: refused where the driver sees no GPU;
    the job is marked as needing one (a cluster then places, migrates and restores it only
    where there is a GPU)."""
    if not ctx.request.gpu:
        return next_(ctx)
    from . import nvml
    from .errors import PrerequisiteError

    nvml.required("--gpu")
    if not nvml.gpus():
        raise PrerequisiteError("--gpu: the NVIDIA driver sees no GPU on this node")
    job = next_(ctx)
    return job.model_copy(update={"details": {**job.details, "needs_gpu": True}})


@dataclass(frozen=True, eq=False)
class Commands:
    """A type's CLI commands: those of its own (``own``, by verb: ``run``, whose options are
    the type's), and the shared ones the kit builds: with a ``target`` (how users name a
    workload: ``PID``, ``ID``), ``dump TYPE TARGET``, and ``manage``/``freeze``/``unfreeze``
    where the type has their handler; with ``columns``, ``query TYPE``, and with
    ``restore_help``, ``restore TYPE --path URL``, where it has that handler. A restore with options of the type's
    own (runc's ``--bundle``) is one of its own commands."""

    target: str | None = None
    what: str = "the workload"  # in the commands' help: "the runc container"
    adopt: str | None = None  # what `manage` adopts, where it says more than `what`
    columns: tuple[str, ...] = ()
    query_help: str = ""
    restore_help: str = ""
    own: Mapping[str, click.Command] = field(default_factory=dict)
    helpers: Sequence[click.Command] = ()  # top-level commands (`slurm sbatch`)
    wrap: Callable[[click.Command], click.Command] | None = None  # applied to each verb's command (an option of all)

    def verbs(self, handles: Callable[[str], bool]) -> list[str]:
        """The verbs with a command, given which handlers the type has."""
        built = {"dump", *(v for v in ("manage", "freeze", "unfreeze") if handles(v))} if self.target else set()
        if self.columns and handles("query"):
            built.add("query")
        if self.restore_help and handles("restore"):
            built.add("restore")
        return [v for v in VERBS if v in self.own or v in built]

    def build(self, name: str, verb: str) -> click.Command:
        from .cli import workload  # only here: building them needs the CLI, stating them does not

        if verb in self.own:
            command = self.own[verb]
        elif verb == "query":
            command = workload.query_command(name, self.columns, self.query_help)
        elif verb == "restore":
            command = workload.restore_command(name, self.restore_help)(_as_asked)
        elif verb == "manage":
            command = workload.manage_command(name, self.target, self.adopt or self.what)
        elif verb == "dump":
            command = workload.dump_command(name, self.target, self.what)
        else:
            command = workload.state_command(name, verb, self.target, self.what)
        return self.wrap(command) if self.wrap else command


def _as_asked(request: RestoreRequest) -> RestoreRequest:
    """A type's restore request when the type has no restore options of its own."""
    return request


def _returning(value: Any) -> Callable[[], Any]:
    def hook() -> Any:
        return value

    return hook


def _calling(fn: Callable[[], Any]) -> Callable[[], Any]:
    def hook() -> Any:  # a function of its own: marking the plugin's would make it a hook where it is defined
        return fn()

    return hook


def _of_job(fn: Callable[[Job], Any]) -> Callable[[Job], Any]:
    def hook(job: Job) -> Any:  # its argument named as the hook specs name it
        return fn(job)

    return hook


def _cleaning(own: Callable[[Job], None] | None) -> Callable[[Job], None]:
    def hook(job: Job) -> None:
        if own:
            own(job)  # first: what the runtime holds may live in the job dir (runc's bundle copy)
        remove_job_dir(job)

    return hook


@dataclass(frozen=True, eq=False)
class Runtime:
    """A runtime plugin, stated: its handlers and middleware (those of :mod:`cedana_ray.pipeline`),
    and the rest; each field that is set becomes the hook of the same feature row (see
    docs/plugins.md). ``dump`` replaces the core's CRIU dump; without it, the dump middleware
    sets ``ctx.state.pid`` and the core dumps that tree. ``hooks``: any other hook taking
    no argument, by name, with what it returns."""

    name: str
    run: Handler | None = None
    manage: Handler | None = None
    dump: Handler | None = None
    restore: Handler | None = None
    freeze: Handler | None = None
    unfreeze: Handler | None = None
    query: Handler | None = None
    dump_vm: Handler | None = None  # a virtual machine's type: its dump and restore, instead of
    restore_vm: Handler | None = None  # dump and restore (no CRIU; see docs/vms.md)
    dump_vm_middleware: Sequence[Middleware] = ()
    restore_vm_middleware: Sequence[Middleware] = ()
    run_middleware: Sequence[Middleware] = ()
    run_middleware_late: Sequence[Middleware] = ()
    dump_middleware: Sequence[Middleware] = ()
    restore_middleware: Sequence[Middleware] = ()
    restore_middleware_late: Sequence[Middleware] = ()
    commands: Commands = Commands()
    health_checks: Callable[[], list[HealthCheck]] | None = None
    kill_signal: int | None = None  # default SIGKILL for a type that starts workloads
    stopped: Callable[[Job], bool] | None = None
    resume: Callable[[Job], None] | None = None  # default: SIGCONT to the tree CRIU left stopped
    reaper: Callable[[Job], int | None] | None = None  # default: reap_recorded
    cleanup: Callable[[Job], None] | None = None  # what the runtime holds; the job dir goes after it
    supports_gpu: bool = False  # read by the plugin manager: its jobs get the gpu plugin's middleware
    hooks: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, fn in self._hooks().items():
            object.__setattr__(self, name, hookimpl(fn))

    def _handles(self, verb: str) -> bool:
        """Whether this type has ``verb``'s handler (a VM's dump and restore are its VM handlers)."""
        return getattr(self, verb) is not None or getattr(self, f"{verb}_vm", None) is not None

    def _hooks(self) -> dict[str, Callable[..., Any]]:
        """Hook name -> implementation, for what this runtime states."""
        values: dict[str, Any] = {
            "cedana_run_handler_serverless": self.run,
            "cedana_manage_handler": self.manage,
            "cedana_dump_handler": self.dump,
            "cedana_restore_handler": self.restore,
            "cedana_dump_vm_handler": self.dump_vm,
            "cedana_restore_vm_handler": self.restore_vm,
            "cedana_dump_vm_middleware": list(self.dump_vm_middleware) or None,
            "cedana_restore_vm_middleware": list(self.restore_vm_middleware) or None,
            "cedana_freeze_handler": self.freeze,
            "cedana_unfreeze_handler": self.unfreeze,
            "cedana_query_handler": self.query,
            "cedana_run_middleware": list(self.run_middleware) or None,
            "cedana_run_middleware_late": list(self.run_middleware_late) or None,
            "cedana_dump_middleware": list(self.dump_middleware) or None,
            "cedana_restore_middleware": list(self.restore_middleware) or None,
            "cedana_restore_middleware_late": list(self.restore_middleware_late) or None,
            "cedana_helper_commands": list(self.commands.helpers) or None,
            **self.hooks,
        }
        verbs = self.commands.verbs(self._handles)
        values |= {f"cedana_{verb}_command": self.commands.build(self.name, verb) for verb in verbs}
        hooks = {name: _returning(value) for name, value in values.items() if value is not None}
        if self.health_checks:
            hooks["cedana_health_checks"] = _calling(self.health_checks)
        if self.stopped:
            hooks["cedana_stopped"] = _of_job(self.stopped)
        if self.resume:
            hooks["cedana_resume"] = _of_job(self.resume)
        return hooks | self._job_hooks()

    def _job_hooks(self) -> dict[str, Callable[..., Any]]:
        """Kill signal, reaper and cleanup: those stated, else, for a type that starts
        workloads, the shared ones."""
        starts = self.run is not None or self._handles("restore")
        kill = self.kill_signal or (signal.SIGKILL if starts else None)
        reaper = self.reaper or (reap_recorded if starts else None)
        hooks: dict[str, Callable[..., Any]] = {}
        if kill:
            hooks["cedana_kill_signal"] = _returning(kill)
        if reaper:
            hooks["cedana_reaper"] = _of_job(reaper)
        if self.cleanup or starts:
            hooks["cedana_cleanup"] = _cleaning(self.cleanup)
        return hooks
