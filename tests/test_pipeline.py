"""Pipeline and Context: middleware order, results, timings, errors, progress."""

from __future__ import annotations

import time
from typing import Any

import pytest

from cedana_ray.pipeline import Context, Handler, Pipeline


def trace(ctx: Context) -> list[str]:
    return ctx.state.setdefault("trace", [])


def fake_mw_a(ctx: Context, next_: Handler) -> str:
    trace(ctx).append("a:before")
    result = next_(ctx)
    trace(ctx).append("a:after")
    return f"a({result})"


def fake_mw_b(ctx: Context, next_: Handler) -> str:
    trace(ctx).append("b:before")
    result = next_(ctx)
    trace(ctx).append("b:after")
    return f"b({result})"


def fake_mw_c(ctx: Context, next_: Handler) -> str:
    trace(ctx).append("c:before")
    result = next_(ctx)
    trace(ctx).append("c:after")
    return f"c({result})"


def fake_handler(ctx: Context) -> str:
    trace(ctx).append("handler")
    return "h"


def test_middleware_run_outermost_first() -> None:
    ctx = Context(request=None, state={})
    result = Pipeline(fake_handler).with_(fake_mw_a, fake_mw_b)(ctx)
    assert result == "a(b(h))"
    assert ctx.state["trace"] == ["a:before", "b:before", "handler", "b:after", "a:after"]


def test_handler_alone() -> None:
    ctx = Context(request=None, state={})
    assert Pipeline(fake_handler)(ctx) == "h"
    assert ctx.state["trace"] == ["handler"]
    assert list(ctx.timings) == ["fake_handler"]


def test_middleware_may_change_ctx_and_result() -> None:
    def fake_mw_prepare(ctx: Context, next_: Handler) -> int:
        ctx.state["n"] = 20
        return next_(ctx) + 1

    def fake_handler_n(ctx: Context) -> int:
        return ctx.state["n"] * 2

    assert Pipeline(fake_handler_n).with_(fake_mw_prepare)(Context(request=None, state={})) == 41


def test_middleware_may_short_circuit() -> None:
    def fake_mw_stop(ctx: Context, next_: Handler) -> str:
        return "stopped"

    ctx = Context(request=None, state={})
    assert Pipeline(fake_handler).with_(fake_mw_a, fake_mw_stop, fake_mw_b)(ctx) == "a(stopped)"
    assert ctx.state["trace"] == ["a:before", "a:after"]
    assert set(ctx.timings) == {"fake_mw_a", "fake_mw_stop"}


def test_with_appends_inside_and_keeps_the_original() -> None:
    base = Pipeline(fake_handler).with_(fake_mw_a)
    extended = base.with_(fake_mw_b).with_(fake_mw_c)
    assert base.middleware == (fake_mw_a,)
    assert extended.middleware == (fake_mw_a, fake_mw_b, fake_mw_c)
    assert extended.handler is base.handler
    assert base(Context(request=None, state={})) == "a(h)"
    ctx = Context(request=None, state={})
    assert extended(ctx) == "a(b(c(h)))"
    assert ctx.state["trace"][:3] == ["a:before", "b:before", "c:before"]


def test_a_pipeline_can_run_twice() -> None:
    pipeline = Pipeline(fake_handler).with_(fake_mw_a)
    first, second = Context(request=1, state={}), Context(request=2, state={})
    assert pipeline(first) == pipeline(second) == "a(h)"
    assert first.state["trace"] == second.state["trace"]


def test_timings_are_exclusive() -> None:
    def fake_mw_outer(ctx: Context, next_: Handler) -> Any:
        time.sleep(0.05)
        return next_(ctx)

    def fake_mw_inner(ctx: Context, next_: Handler) -> Any:
        return next_(ctx)

    def fake_handler_slow(ctx: Context) -> str:
        time.sleep(0.3)
        return "done"

    ctx = Context(request=None, state={})
    assert Pipeline(fake_handler_slow).with_(fake_mw_outer, fake_mw_inner)(ctx) == "done"
    assert set(ctx.timings) == {"fake_mw_outer", "fake_mw_inner", "fake_handler_slow"}
    assert 0.3 <= ctx.timings["fake_handler_slow"] < 1.0
    assert 0.05 <= ctx.timings["fake_mw_outer"] < 0.25  # excludes the handler's 0.3 s
    assert ctx.timings["fake_mw_inner"] < 0.15


def test_timings_accumulate_per_stage_name() -> None:
    def fake_mw_retry(ctx: Context, next_: Handler) -> Any:
        next_(ctx)
        return next_(ctx)

    def fake_handler_sleepy(ctx: Context) -> str:
        time.sleep(0.1)
        return "ok"

    ctx = Context(request=None, state={})
    Pipeline(fake_handler_sleepy).with_(fake_mw_retry)(ctx)
    assert set(ctx.timings) == {"fake_mw_retry", "fake_handler_sleepy"}
    assert ctx.timings["fake_handler_sleepy"] >= 0.2
    assert ctx.timings["fake_mw_retry"] < 0.1


def test_stage_name_drops_leading_underscores() -> None:
    def _fake_mw_private(ctx: Context, next_: Handler) -> Any:
        return next_(ctx)

    ctx = Context(request=None, state={})
    Pipeline(fake_handler).with_(_fake_mw_private)(ctx)
    assert set(ctx.timings) == {"fake_mw_private", "fake_handler"}


def test_handler_error_propagates_through_middleware() -> None:
    seen: list[str] = []

    def fake_mw_watch(ctx: Context, next_: Handler) -> Any:
        try:
            return next_(ctx)
        except RuntimeError as exc:
            seen.append(str(exc))
            raise

    def fake_handler_fails(ctx: Context) -> Any:
        time.sleep(0.05)
        raise RuntimeError("boom")

    ctx = Context(request=None, state={})
    with pytest.raises(RuntimeError, match="boom"):
        Pipeline(fake_handler_fails).with_(fake_mw_a, fake_mw_watch)(ctx)
    assert seen == ["boom"]
    assert ctx.state["trace"] == ["a:before"]  # fake_mw_a never reached its "after"
    assert set(ctx.timings) == {"fake_mw_a", "fake_mw_watch", "fake_handler_fails"}
    assert ctx.timings["fake_handler_fails"] >= 0.05
    assert ctx.timings["fake_mw_a"] < 0.05


def test_middleware_error_stops_inner_stages() -> None:
    def fake_mw_fails(ctx: Context, next_: Handler) -> Any:
        raise ValueError("refused")

    ctx = Context(request=None, state={})
    with pytest.raises(ValueError, match="refused"):
        Pipeline(fake_handler).with_(fake_mw_a, fake_mw_fails, fake_mw_b)(ctx)
    assert ctx.state["trace"] == ["a:before"]
    assert set(ctx.timings) == {"fake_mw_a", "fake_mw_fails"}


def test_report_calls_progress_with_stage_names() -> None:
    calls: list[tuple[str, int, int]] = []

    def fake_handler_reports(ctx: Context) -> None:
        ctx.report("store", 5, 10)

    ctx = Context(request=None, state={}, progress=lambda *a: calls.append(a))
    Pipeline(fake_handler_reports).with_(fake_mw_a, fake_mw_b)(ctx)
    assert calls == [("fake_mw_a", 0, 0), ("fake_mw_b", 0, 0), ("fake_handler_reports", 0, 0), ("store", 5, 10)]


def test_report_without_progress_is_silent() -> None:
    ctx = Context(request=None, state={})
    ctx.report("store", 1, 2)  # no callback: nothing happens
    assert Pipeline(fake_handler)(ctx) == "h"
