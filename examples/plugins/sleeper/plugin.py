"""The example ``sleeper`` plugin: what it does, stated as a :class:`~cedana_ray.runtime.Runtime`,
which gives it its hooks (its entry point names the object: ``sleeper.plugin:plugin``).

A sleeper job is a command started by a small parent of its own (``reaper.py``), in a
session of its own, in the host's namespaces, with its output discarded: CRIU restores an
open regular file only if its size is unchanged, and a log keeps growing after a
``--leave-running`` dump. The core's CRIU driver dumps it (the plugin only says which PID);
the restore handler runs ``criu restore`` under a new reaper. The restored tree keeps its
PIDs, so a restore on the same machine needs the original ones free: the reaper frees them
by reaping the workload when the dump kills it. The built-in ``process`` plugin avoids the
constraint with PID namespaces.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import click
import psutil
from pydantic import BaseModel

from cedana_ray import criu
from cedana_ray.cli.common import common
from cedana_ray.cli.workload import start
from cedana_ray.environment import workload_env
from cedana_ray.errors import RestoreError, UsageError
from cedana_ray.models import HealthCheck, Job, JobState
from cedana_ray.pipeline import Context, Handler
from cedana_ray.proctree import signal_tree
from cedana_ray.requests import RunRequest
from cedana_ray.retry import until
from cedana_ray.runtime import Commands, Runtime

NAME = "sleeper"
REAPER = Path(__file__).with_name("reaper.py")
REAP_GRACE_S = 2.0  # how long a reaper may take to record an exit once its workload is gone


def _reaper(ctx: Context, mode: str, argv: list[str], env: dict[str, str], cwd: str | None = None) -> dict[str, Any]:
    """Start a reaper for ``argv``: its answer (the workload's PID and start) plus its own PID;
    OSError if it could not start the workload. The reaper gets ``env``, never ours (which may
    hold a store's credentials), and passes it on to the workload."""
    cmd = [sys.executable, "-I", "-S", str(REAPER), str(ctx.state.job_dir), mode, *argv]
    out = subprocess.PIPE
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, env=env, cwd=cwd, start_new_session=True)
    # a long-lived engine (a node agent, a test) collects the reaper when it ends; a CLI leaves it to init
    threading.Thread(target=proc.wait, daemon=True).start()
    assert proc.stdout is not None
    with proc.stdout:
        line = proc.stdout.readline()
    answer = json.loads(line) if line else {"error": "the reaper exited without answering"}
    if "error" in answer:
        raise OSError(answer["error"])
    return {**answer, "reaper": proc.pid}


def _job(ctx: Context, reaper: dict[str, Any], state: JobState, command: list[str]) -> Job:
    details = {
        # as psutil's create_time(): the core tells our process from a later one of the same PID by it
        "started": psutil.boot_time() + reaper["start_ticks"] / os.sysconf("SC_CLK_TCK"),
        "exit_file": str(ctx.state.job_dir / f"exit-{reaper['reaper']}.json"),
    }
    return Job(jid=ctx.state.jid, type=NAME, pid=reaper["pid"], state=state, command=command, details=details)


def run(ctx: Context) -> Job:
    """Start ``ctx.request.cmd`` under a reaper, with the environment the request gives it."""
    req: RunRequest = ctx.request
    try:
        reaper = _reaper(ctx, "run", req.cmd, workload_env(req.env, req.inherit_env), req.cwd)
    except OSError as exc:
        raise UsageError(f"cannot start {req.cmd[0]}: {exc}") from exc
    return _job(ctx, reaper, JobState.running, req.cmd)


def prepare_dump(ctx: Context, next_: Handler) -> Any:
    """Tell the core's CRIU dump which tree to dump, and record what a restore needs."""
    ctx.state.pid = ctx.state.tree_root = ctx.job.pid  # tree_root: for GPU middleware, had we any
    ctx.state.details = {"frozen": ctx.job.state is JobState.frozen}  # into the manifest
    return next_(ctx)


class RestoreFacts(BaseModel):
    """What the manifest's details must hold: checked, since a checkpoint is untrusted input."""

    frozen: bool = False


def restore(ctx: Context) -> Job:
    """``criu restore`` the fetched images under a new reaper."""
    manifest, work = ctx.state.manifest, ctx.state.work
    facts = manifest.facts(RestoreFacts)
    # leave_stopped: the core resumes the tree once it has verified every chunk
    argv = criu.restore_args(ctx.state.images, work, manifest.criu, leave_stopped=ctx.state.leave_stopped)
    argv += ["--restore-sibling", "--pidfile", str(work / "restored.pid")]
    try:
        reaper = _reaper(ctx, "restore", argv, workload_env({}, inherit=False))
    except OSError as exc:
        detail = criu.first_error(work / "restore.log") or str(exc)
        raise RestoreError(f"restore of checkpoint {manifest.checkpoint} failed: {detail}") from exc
    state = JobState.frozen if facts.frozen else JobState.running
    return _job(ctx, reaper, state, ctx.state.command)


def freeze(ctx: Context) -> None:
    signal_tree(ctx.job.pid, signal.SIGSTOP)


def unfreeze(ctx: Context) -> None:
    signal_tree(ctx.job.pid, signal.SIGCONT)


def query(ctx: Context) -> list[dict[str, Any]]:
    """The sleeper jobs here (``ctx.request``: the jobs of this type)."""
    return [job.row() for job in ctx.request]


def _recorded_exit(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(json.loads(path.read_text())["exit_code"])
    return None


def stopped(job: Job) -> bool:
    """Reaped, not only dead: a restore on this machine needs the PID free again."""
    try:
        started = psutil.Process(job.pid).create_time()
    except psutil.NoSuchProcess:
        return True
    return abs(started - job.details["started"]) >= 0.01  # the PID is another process's; else ours, a zombie or alive


def reaper(job: Job) -> int | None:
    """The exit code the job's reaper recorded; None (the job is then ``lost``) if none came."""
    path = Path(job.details.get("exit_file", ""))
    if not until(lambda: path.is_file(), REAP_GRACE_S, 0.05):
        return None
    return _recorded_exit(path)


def cleanup(job: Job) -> None:
    """`job delete`: remove what the job's reapers wrote."""
    if exit_file := job.details.get("exit_file"):
        shutil.rmtree(os.path.dirname(exit_file), ignore_errors=True)


def health_checks() -> list[HealthCheck]:
    root = os.geteuid() == 0
    return [
        HealthCheck.probe("criu", lambda: f"criu {criu.version()} at {criu.binary()}"),
        HealthCheck(name="privileges", ok=root, detail="root" if root else "CRIU needs root"),
    ]


@click.command(NAME, context_settings={"ignore_unknown_options": True})
@click.option("--jid", metavar="ID", help="Job id (default: generated).")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
@common
def run_command(jid: str | None, cmd: tuple[str, ...], as_json: bool, local: bool) -> None:
    """Run CMD as a sleeper job: its output is discarded."""
    start(NAME, RunRequest(cmd=list(cmd), jid=jid), None, as_json)


plugin = Runtime(
    NAME,
    run=run,  # the one run handler: locally, and by a cluster node's agent
    restore=restore,
    freeze=freeze,
    unfreeze=unfreeze,
    query=query,
    dump_middleware=[prepare_dump],  # no dump handler: the core's CRIU dump is the final step
    commands=Commands(
        columns=("jid", "state", "pid", "last_checkpoint"),  # `query sleeper` (no target: no manage or dump command)
        query_help="List sleeper jobs.",
        restore_help="Restore a sleeper checkpoint from its URL.",  # with options of its own: its own command
        own={"run": run_command},
    ),
    health_checks=health_checks,
    stopped=stopped,
    reaper=reaper,  # its own reaper and cleanup: the kit's read the job log's directory, and a sleeper has no log
    cleanup=cleanup,
)
