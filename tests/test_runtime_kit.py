"""The kit for runtime plugins (cedana_ray.runtime): a stated Runtime implements exactly the
hooks of what it states plus the shared ones, and the GPU hooks reach a type only through the
gpu plugin, where the type supports GPU jobs."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from cedana_ray.models import Job, JobState
from cedana_ray.pipeline import Context, Handler
from cedana_ray.plugins_manager import PluginManager
from cedana_ray.runtime import Commands, Runtime


def handler(ctx: Context) -> None:
    return None


def middleware(ctx: Context, next_: Handler) -> Any:
    return next_(ctx)


def hooks(pm: PluginManager, name: str) -> set[str]:
    return {hook for hook in vars(pm.hook) if getattr(pm.hook, hook).has_spec() and pm.implements(name, hook)}


def registered(**plugins: Runtime) -> PluginManager:
    pm = PluginManager()
    for name, plugin in plugins.items():
        pm.register_checked(plugin, name)
    assert pm.failures == {}
    return pm


def test_a_runtime_implements_what_it_states_and_the_shared_job_hooks() -> None:
    commands = Commands(target="ID", what="the thing", columns=("jid",), query_help="List.", restore_help="Restore.")
    plugin = Runtime("thing", restore=handler, query=handler, dump_middleware=[middleware], commands=commands)
    pm = registered(thing=plugin)
    assert hooks(pm, "thing") == {
        "cedana_restore_handler",
        "cedana_query_handler",
        "cedana_dump_middleware",
        "cedana_dump_command",  # a target: dump, but no manage or freeze without their handlers
        "cedana_query_command",
        "cedana_restore_command",
        "cedana_kill_signal",
        "cedana_reaper",
        "cedana_cleanup",
    }
    assert pm.call_for("thing", "cedana_kill_signal") == signal.SIGKILL
    assert pm.call_for("thing", "cedana_dump_middleware") == [middleware]
    assert {pm.call_for("thing", f"cedana_{verb}_command").name for verb in ("dump", "query", "restore")} == {"thing"}


def test_a_plugin_that_starts_no_workload_gets_no_job_hooks() -> None:
    pm = registered(other=Runtime("other", query=handler, health_checks=list))
    assert hooks(pm, "other") == {"cedana_query_handler", "cedana_health_checks"}


def test_cleanup_is_the_runtimes_own_then_the_job_dir(tmp_path: Path) -> None:
    job_dir = tmp_path / "jobs" / "j1"
    job_dir.mkdir(parents=True)
    seen: list[bool] = []
    plugin = Runtime("thing", run=handler, cleanup=lambda job: seen.append(job_dir.exists()))
    job = Job(jid="j1", type="thing", pid=1, state=JobState.exited, log=str(job_dir / "log"))
    registered(thing=plugin).call_for("thing", "cedana_cleanup", job=job)
    assert seen == [True] and not job_dir.exists()


def test_gpu_hooks_come_from_the_gpu_plugin_for_types_that_support_gpu_jobs() -> None:
    gpu = Runtime("gpu", hooks={"cedana_gpu_interception": [middleware]})
    pm = registered(gpu=gpu, yes=Runtime("yes", run=handler, supports_gpu=True), no=Runtime("no", run=handler))
    assert pm.call_for("yes", "cedana_gpu_interception") == [middleware]
    assert pm.implements("yes", "cedana_gpu_interception")
    assert pm.call_for("no", "cedana_gpu_interception") is None
    assert not pm.implements("yes", "cedana_gpu_tracing")  # the gpu plugin does not implement it
    without_gpu = registered(yes=Runtime("yes", run=handler, supports_gpu=True))
    assert without_gpu.call_for("yes", "cedana_gpu_interception") is None
