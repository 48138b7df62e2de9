"""``cedana-ray <verb> runc ...``: the runc plugin's commands."""

from __future__ import annotations

from pathlib import Path

import click
from cedana_ray.plugins.process.commands import dump_command, state_command

from cedana_ray.cli.options import common, engine, restore_options
from cedana_ray.cli.output import progress, show, show_job, show_restore, table
from cedana_ray.models import check_name
from cedana_ray.policy import parse_duration
from cedana_ray.requests import ManageRequest, RestoreRequest

NAME = "runc"
BUNDLE = click.Path(exists=True, file_okay=False, path_type=Path)


def _container_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    return check_name(value, "container id")


@click.command(NAME)
@click.option("--bundle", required=True, type=BUNDLE, help="OCI bundle: config.json and its rootfs.")
@click.option("--id", "container", required=True, callback=_container_id, help="Container id.")
@click.option("--jid", metavar="ID", help="Job id (default: the container id).")
@click.option("--storage", metavar="URL", help="Default checkpoint store of this job.")
@click.option("--checkpoint-every", metavar="DUR", help="Checkpoint (leaving it running) every DUR: 30s, 5m, 1h.")
@click.option("--keep", type=click.IntRange(1), metavar="N", help="Keep only the last N of those checkpoints.")
@common
def run(
    bundle: Path,
    container: str,
    jid: str | None,
    storage: str | None,
    checkpoint_every: str | None,
    keep: int | None,
    as_json: bool,
    local: bool,
) -> None:
    """Run the OCI bundle as container ID under our runc root, checkpointable."""
    from .plugin import RuncRunRequest

    every = parse_duration(checkpoint_every) if checkpoint_every else None
    if keep and not every:
        raise click.BadParameter("needs --checkpoint-every", param_hint="--keep")
    request = RuncRunRequest(
        cmd=["runc", "run", "--bundle", str(bundle.resolve()), container],
        bundle=str(bundle.resolve()),
        container=container,
        jid=jid or container,
        checkpoint_every=every,
        keep=keep,
    )
    job = engine().run(NAME, request)
    if storage:
        job = engine().set_storage(job.jid, storage)
    show_job(as_json, job, "started")


@click.command(NAME)
@click.argument("container", metavar="ID")
@click.option("--jid", metavar="ID", help="Job id (default: generated).")
@common
def manage(container: str, jid: str | None, as_json: bool, local: bool) -> None:
    """Adopt the running container ID (under our runc root) as a job."""
    show_job(as_json, engine().manage(NAME, ManageRequest(target=container, jid=jid)), "managing")


@click.command(NAME)
@click.option("--path", required=True, metavar="URL", help="The checkpoint's URL (see `checkpoint list`).")
@click.option("--bundle", type=BUNDLE, help="Bundle to restore into (default: the one recorded at the dump).")
@restore_options
@common
def restore(request: RestoreRequest, bundle: Path | None, as_json: bool, local: bool) -> None:
    """Restore a runc checkpoint as a new container (named by --jid, else as dumped)."""
    from .plugin import RuncRestoreRequest

    request = RuncRestoreRequest(**request.model_dump(), bundle=str(bundle.resolve()) if bundle else None)
    with progress(not as_json) as bar:
        show_restore(as_json, engine().restore(request, jtype=NAME, progress=bar))


@click.command(NAME)
@common
def query(as_json: bool, local: bool) -> None:
    """List the containers under our runc root with their state, PID and job."""
    rows = engine().query(NAME)

    def human() -> None:
        cols = ("id", "status", "pid", "jid", "bundle", "created")
        table(cols, [[r.get(c) for c in cols] for r in rows])

    show(as_json, rows, human)


dump = dump_command(NAME, "ID", "the runc container")
freeze = state_command(NAME, "freeze", "ID", "the runc container")
unfreeze = state_command(NAME, "unfreeze", "ID", "the runc container")
