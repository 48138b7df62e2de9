"""``cedana-ray <verb> process ...``: the process plugin's commands."""

from __future__ import annotations

from typing import Any

import click

from cedana_ray.cli.common import common
from cedana_ray.cli.workload import env_option, gpu_tracing_option, policy_options, start
from cedana_ray.requests import Resources, RunRequest
from cedana_ray.runtime import Commands
from cedana_ray.working_dir import caller_cwd, pack

NAME = "process"


@click.command(NAME, context_settings={"ignore_unknown_options": True})
@click.option("--jid", metavar="ID", help="Job id (default: generated).")
@click.option("--cwd", metavar="DIR", help="Working directory, on the node the job runs on (default: this one's).")
@click.option(
    "--working-dir",
    metavar="DIR",
    help="Pack DIR here and run the job in a copy of it, unpacked on each node it runs on (as Ray's working_dir).",
)
@env_option
@click.option(
    "--inherit-env",
    is_flag=True,
    help="Give the job this environment but its keys and credentials, not only PATH, HOME, the locale...",
)
@policy_options
@click.option("--gpu", is_flag=True, help="The job needs a GPU: run it where there is one, refuse where there is none.")
@gpu_tracing_option
@click.option("--node", metavar="NODE", help="With a cluster: the node to run on (default: the least loaded).")
@click.option(
    "--cpus", type=click.FloatRange(0), default=0, help="With a cluster: CPUs to reserve in Ray (default: 0)."
)
@click.option(
    "--gpus",
    type=click.FloatRange(0),
    default=0,
    help="With a cluster: GPUs to reserve in Ray, the job's CUDA_VISIBLE_DEVICES (default: 0).",
)
@click.option("--memory", metavar="SIZE", help="With a cluster: memory to reserve in Ray: 4GiB, 512MiB (default: 0).")
@click.option(
    "--restore-on-loss", is_flag=True, help="With a cluster: restore from the last checkpoint if the node dies."
)
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
@common
def run(
    jid: str | None,
    cwd: str | None,
    working_dir: str | None,
    env: dict[str, str],
    inherit_env: bool,
    storage: str | None,
    every: float | None,
    keep: int | None,
    gpu: bool,
    gpu_tracing: bool,
    node: str | None,
    cpus: float,
    gpus: float,
    memory: str | None,
    restore_on_loss: bool,
    encryption: dict[str, Any],
    cmd: tuple[str, ...],
    as_json: bool,
    local: bool,
) -> None:
    """Run CMD as a checkpointable process job (in its own PID namespace)."""
    request = RunRequest(
        cmd=list(cmd),
        jid=jid,
        cwd=caller_cwd(cwd, working_dir),
        working_dir=pack(working_dir) if working_dir else None,
        env=env,
        inherit_env=inherit_env,
        gpu=gpu,
        gpu_tracing=gpu_tracing,
        checkpoint_every=every,
        keep=keep,
        node=node,
        resources=Resources(cpus=cpus, gpus=gpus, memory=memory or 0),
        restore_on_loss=restore_on_loss,
        **encryption,
    )
    start(NAME, request, storage, as_json)


COMMANDS = Commands(
    target="PID",
    what="the process tree",
    adopt="the running process tree",
    columns=("jid", "state", "pid", "processes", "rss_bytes", "gpu_memory_bytes", "last_checkpoint"),
    query_help="List process jobs with what their trees use now.",
    restore_help="Restore a process checkpoint from its URL.",
    own={"run": run},
)
