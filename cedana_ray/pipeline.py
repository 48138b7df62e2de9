"""Requests as a handler wrapped by middleware, run in list order.

A middleware is ``fn(ctx, next) -> result``: it may prepare ``ctx`` before calling
``next(ctx)`` and finish after it. ``Pipeline(handler).with_(m1, m2)`` runs ``m1``
outermost. Each stage's own time (excluding the stages it wraps) is recorded in
``ctx.timings`` under the function's name, for ``--json`` output.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass
class Context:
    """One request flowing through a pipeline."""

    request: Any
    job: Any = None
    state: dict[str, Any] = field(default_factory=dict)  # scratch shared by stages
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
