"""Requests as a handler wrapped by middleware, run in list order, and what the stages share.

A middleware is ``fn(ctx, next) -> result``: it may prepare ``ctx`` before calling
``next(ctx)`` and finish after it. ``Pipeline(handler).with_(m1, m2)`` runs ``m1``
outermost. Each stage's own time (excluding the stages it wraps) is recorded in
``ctx.timings`` under the function's name, for ``--json`` output.

``ctx.state`` is the contract between the core's stages and a plugin's: one dataclass per
pipeline (:class:`RunState`, :class:`DumpState`, :class:`RestoreState`,
:class:`QueryState`), each field saying who sets it and who reads it. A runtime keeps what
only its own middleware and handler share in ``own`` (an object of its own: the core never
reads it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from .models import Job, Manifest
    from .store import CheckpointStore

T = TypeVar("T")
S = TypeVar("S")


@dataclass
class RunState:
    """A run's (``cedana_run_*`` hooks) or an adoption's (``cedana_manage_handler``), set by the engine."""

    jid: str
    job_dir: Path  # the job's private directory: its log, its runtime's files
    # how the job's own checkpoint requests are served (cedana_ray.inside): the supervisor's
    control: dict[str, Any] = field(default_factory=dict)


@dataclass
class DumpState:
    """A dump's: the middleware of ``cedana_dump_middleware`` and the GPU (or, of a virtual
    machine, of ``cedana_dump_vm_middleware``), and the handler."""

    jid: str
    vm: bool = False  # a virtual machine's dump: its VM handler, not CRIU, writes the images
    lock: int = -1  # the job's lock: CRIU inherits it (core: ``locked``)
    images: Path = Path()  # where the images go (core: ``commit``)
    work: Path = Path()  # CRIU's work dir, its logs (core: ``commit``)
    # where the store frees what it stored of a staged VM's state as it grows: the most bytes
    # the VM handler should keep written but not yet stored (core: ``commit``); None: no limit
    staged_max: int | None = None
    pid: int | None = None  # the tree CRIU dumps (the type's middleware; read by the core's CRIU dump)
    enter: int | None = None  # a process whose PID and mount namespaces CRIU dumps from (the type's)
    tree_root: int | None = None  # the tree's host PID (the type's; read by the GPU middleware)
    # what the checkpoint's manifest records (the type's, the GPU's); a restore reads it with Manifest.facts
    details: dict[str, Any] = field(default_factory=dict)
    rollback: list[Callable[[], None]] = field(default_factory=list)  # undone if the dump fails (the GPU's)
    own: Any = None  # the runtime's, between its middleware and its handler


@dataclass
class RestoreState:
    """A restore's: the middleware of ``cedana_restore_middleware*`` and the GPU, and the handler."""

    jid: str  # the restored job's id: the checkpoint's job, or a clone's
    job_dir: Path
    manifest: Manifest  # verified
    store: CheckpointStore
    lock: int = -1  # the job's lock (core: ``locked``)
    control: dict[str, Any] = field(default_factory=dict)  # as RunState.control
    command: list[str] = field(default_factory=list)  # the job's command line, as dumped
    images: Path = Path()  # the images, laid out locally (core: ``fetch``)
    work: Path = Path()  # CRIU's work dir (core: ``fetch``)
    vm: bool = False  # a virtual machine's restore: its VM handler, not CRIU, reads the images
    # the restored tree must stay stopped: the core resumes it once every image is verified
    leave_stopped: bool = False
    own: Any = None  # the runtime's, between its middleware and its handler


@dataclass
class QueryState:
    """A query's: every job of the node (``query gpu`` tells which of them use each GPU)."""

    jobs: list[Job] = field(default_factory=list)


@dataclass
class Context(Generic[S]):
    """One request flowing through a pipeline."""

    request: Any
    state: S = None  # type: ignore[assignment]  # a freeze has none
    job: Any = None
    timings: dict[str, float] = field(default_factory=dict)
    progress: Callable[[str, int, int], None] | None = None  # (stage, done, total)

    def report(self, stage: str, done: int = 0, total: int = 0) -> None:
        if self.progress:
            self.progress(stage, done, total)


Handler = Callable[[Context], T]
Middleware = Callable[[Context, Handler], T]


def _stage_name(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__name__", type(fn).__name__).lstrip("_")


class Pipeline(Generic[T]):
    def __init__(self, handler: Handler, middleware: tuple[Middleware, ...] = ()) -> None:
        self.handler = handler
        self.middleware = middleware

    def with_(self, *middleware: Middleware) -> Pipeline[T]:
        """A new pipeline with ``middleware`` added inside the existing ones."""
        return Pipeline(self.handler, self.middleware + tuple(middleware))

    def __call__(self, ctx: Context) -> T:
        return self._run(ctx, 0)

    def _run(self, ctx: Context, index: int) -> T:
        inner_time = 0.0

        def next_(c: Context) -> T:
            nonlocal inner_time
            t = time.perf_counter()
            try:
                return self._run(c, index + 1)
            finally:
                inner_time += time.perf_counter() - t

        fn: Callable[..., T]
        if index < len(self.middleware):
            fn = self.middleware[index]
            call: Callable[[], T] = lambda: fn(ctx, next_)  # noqa: E731
        else:
            fn = self.handler
            call = lambda: fn(ctx)  # noqa: E731
        start = time.perf_counter()
        try:
            ctx.report(_stage_name(fn))
            return call()
        finally:
            own = time.perf_counter() - start - inner_time
            name = _stage_name(fn)
            ctx.timings[name] = round(ctx.timings.get(name, 0.0) + own, 6)
