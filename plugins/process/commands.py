"""``cedana-ray <verb> process ...``: the process plugin's commands."""

from __future__ import annotations

import click

from cedana_ray.cli.options import common, dump_options, engine, restore_options
from cedana_ray.cli.output import progress, show, show_dump, show_job, show_restore, table
from cedana_ray.policy import parse_duration
from cedana_ray.requests import DumpRequest, ManageRequest, RestoreRequest, RunRequest

NAME = "process"


@click.command(NAME, context_settings={"ignore_unknown_options": True})
@click.option("--jid", metavar="ID", help="Job id (default: generated).")
@click.option("--storage", metavar="URL", help="Default checkpoint store of this job.")
@click.option("--cwd", type=click.Path(exists=True, file_okay=False), help="Working directory.")
@click.option("--env", "env", multiple=True, metavar="K=V", help="Extra environment variable (repeatable).")
@click.option("--checkpoint-every", metavar="DUR", help="Checkpoint (leaving it running) every DUR: 30s, 5m, 1h.")
@click.option("--keep", type=click.IntRange(1), metavar="N", help="Keep only the last N of those checkpoints.")
@click.option("--gpu-tracing", is_flag=True, help="Trace the job's GPU use (Chrome/Perfetto JSON).")
@click.option("--node", metavar="NODE", help="With a cluster: the node to run on (default: the least loaded).")
@click.option(
    "--restore-on-loss", is_flag=True, help="With a cluster: restore from the last checkpoint if the node dies."
)
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
@common
def run(
    jid: str | None,
    storage: str | None,
    cwd: str | None,
    env: tuple[str, ...],
    checkpoint_every: str | None,
    keep: int | None,
    gpu_tracing: bool,
    node: str | None,
    restore_on_loss: bool,
    cmd: tuple[str, ...],
    as_json: bool,
    local: bool,
) -> None:
    """Run CMD as a checkpointable process job (in its own PID namespace)."""
    bad = [e for e in env if "=" not in e]
    if bad:
        raise click.BadParameter(f"{bad[0]!r} is not K=V", param_hint="--env")
    env_vars = dict(e.split("=", 1) for e in env)
    every = parse_duration(checkpoint_every) if checkpoint_every else None
    if keep and not every:
        raise click.BadParameter("needs --checkpoint-every", param_hint="--keep")
    request = RunRequest(
        cmd=list(cmd),
        jid=jid,
        cwd=cwd,
        env=env_vars,
        gpu_tracing=gpu_tracing,
        checkpoint_every=every,
        keep=keep,
        node=node,
        restore_on_loss=restore_on_loss,
    )
    job = engine().run(NAME, request)
    if storage:
        job = engine().set_storage(job.jid, storage)
    show_job(as_json, job, "started")


@click.command(NAME)
@click.argument("pid")
@click.option("--jid", metavar="ID", help="Job id (default: generated).")
@common
def manage(pid: str, jid: str | None, as_json: bool, local: bool) -> None:
    """Adopt the running process tree PID as a job."""
    show_job(as_json, engine().manage(NAME, ManageRequest(target=pid, jid=jid)), "managing")


def dump_command(name: str, target: str, what: str) -> click.Command:
    """``dump NAME TARGET``: checkpoint a workload by the id users know it by."""

    @click.command(name, help=f"Checkpoint {what} {target} (adopting it as a job if it is not one).")
    @click.argument("target", metavar=target)
    @dump_options
    @common
    def command(target: str, request: DumpRequest, as_json: bool, local: bool) -> None:
        job = engine().job_for(name, target)
        with progress(not as_json) as bar:
            show_dump(as_json, engine().dump(job.jid, request, bar))

    return command


dump = dump_command(NAME, "PID", "the process tree")


@click.command(NAME)
@click.option("--path", required=True, metavar="URL", help="The checkpoint's URL (see `checkpoint list`).")
@restore_options
@common
def restore(request: RestoreRequest, as_json: bool, local: bool) -> None:
    """Restore a process checkpoint from its URL."""
    with progress(not as_json) as bar:
        show_restore(as_json, engine().restore(request, jtype=NAME, progress=bar))


def state_command(name: str, verb: str, target: str, what: str) -> click.Command:
    """``freeze|unfreeze NAME TARGET``."""

    @click.command(name, help=f"{verb.capitalize()} {what} {target}.")
    @click.argument("target", metavar=target)
    @common
    def command(target: str, as_json: bool, local: bool) -> None:
        job = engine().job_for(name, target)
        show_job(as_json, getattr(engine(), verb)(job.jid), f"{verb}d")

    return command


freeze = state_command(NAME, "freeze", "PID", "the process tree")
unfreeze = state_command(NAME, "unfreeze", "PID", "the process tree")


@click.command(NAME)
@common
def query(as_json: bool, local: bool) -> None:
    """List process jobs with what their trees use now."""
    rows = engine().query(NAME)

    def human() -> None:
        cols = ("jid", "state", "pid", "processes", "rss_bytes", "gpu_memory_bytes", "last_checkpoint")
        table(cols, [[r.get(c) for c in cols] for r in rows])

    show(as_json, rows, human)
