"""``cedana-ray <verb> containerd ...``: the containerd plugin's commands."""

from __future__ import annotations

import click
from cedana_ray.plugins.process.commands import dump_command, state_command

from cedana_ray.cli.options import common, engine, restore_options
from cedana_ray.cli.output import progress, show, show_job, show_restore, table
from cedana_ray.models import check_name
from cedana_ray.policy import parse_duration
from cedana_ray.requests import ManageRequest, RestoreRequest

NAME = "containerd"


def _container_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    return check_name(value, "container id")


@click.command(NAME)
@click.option("--image", required=True, metavar="REF", help="An image already in the namespace (`ctr images import`).")
@click.option("--id", "container", required=True, callback=_container_id, help="Container id.")
@click.option("--snapshotter", help="containerd snapshotter (default: containerd's).")
@click.option("--jid", metavar="ID", help="Job id (default: the container id).")
@click.option("--storage", metavar="URL", help="Default checkpoint store of this job.")
@click.option("--checkpoint-every", metavar="DUR", help="Checkpoint (leaving it running) every DUR: 30s, 5m, 1h.")
@click.option("--keep", type=click.IntRange(1), metavar="N", help="Keep only the last N of those checkpoints.")
@common
def run(
    image: str,
    container: str,
    snapshotter: str | None,
    jid: str | None,
    storage: str | None,
    checkpoint_every: str | None,
    keep: int | None,
    as_json: bool,
    local: bool,
) -> None:
    """Run IMAGE as container ID in containerd (CONTAINERD_ADDRESS, CONTAINERD_NAMESPACE)."""
    from .plugin import ContainerdRunRequest

    every = parse_duration(checkpoint_every) if checkpoint_every else None
    if keep and not every:
        raise click.BadParameter("needs --checkpoint-every", param_hint="--keep")
    request = ContainerdRunRequest(
        cmd=["ctr", "run", image, container],
        image=image,
        container=container,
        snapshotter=snapshotter,
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
    """Adopt the containerd container ID (with a running task) as a job."""
    show_job(as_json, engine().manage(NAME, ManageRequest(target=container, jid=jid)), "managing")


@click.command(NAME)
@click.option("--path", required=True, metavar="URL", help="The checkpoint's URL (see `checkpoint list`).")
@restore_options
@common
def restore(request: RestoreRequest, as_json: bool, local: bool) -> None:
    """Restore a containerd checkpoint as a new container and task (named by --jid, else as dumped)."""
    with progress(not as_json) as bar:
        show_restore(as_json, engine().restore(request, jtype=NAME, progress=bar))


@click.command(NAME)
@common
def query(as_json: bool, local: bool) -> None:
    """List the containers of the namespace with their task and job."""
    rows = engine().query(NAME)

    def human() -> None:
        cols = ("id", "image", "status", "pid", "jid")
        table(cols, [[r.get(c) for c in cols] for r in rows])

    show(as_json, rows, human)


dump = dump_command(NAME, "ID", "the containerd container")
freeze = state_command(NAME, "freeze", "ID", "the containerd container")
unfreeze = state_command(NAME, "unfreeze", "ID", "the containerd container")
