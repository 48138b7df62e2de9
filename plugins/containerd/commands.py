"""``cedana-ray <verb> containerd ...``: the containerd plugin's commands."""

from __future__ import annotations

import click

from cedana_ray.cli.options import common
from cedana_ray.cli.workload import (
    container_id,
    dump_command,
    manage_command,
    policy_options,
    query_command,
    restore_command,
    start,
    state_command,
)
from cedana_ray.requests import RestoreRequest

NAME = "containerd"


@click.command(NAME)
@click.option("--image", required=True, metavar="REF", help="An image already in the namespace (`ctr images import`).")
@click.option("--id", "container", required=True, callback=container_id, help="Container id.")
@click.option("--snapshotter", help="containerd snapshotter (default: containerd's).")
@click.option("--jid", metavar="ID", help="Job id (default: the container id).")
@policy_options
@common
def run(
    image: str,
    container: str,
    snapshotter: str | None,
    jid: str | None,
    storage: str | None,
    every: float | None,
    keep: int | None,
    as_json: bool,
    local: bool,
) -> None:
    """Run IMAGE as container ID in containerd (CONTAINERD_ADDRESS, CONTAINERD_NAMESPACE)."""
    from .plugin import ContainerdRunRequest

    request = ContainerdRunRequest(
        cmd=["ctr", "run", image, container],
        image=image,
        container=container,
        snapshotter=snapshotter,
        jid=jid or container,
        checkpoint_every=every,
        keep=keep,
    )
    start(NAME, request, storage, as_json)


@restore_command(NAME, "Restore a containerd checkpoint as a new container and task (named by --jid, else as dumped).")
def restore(request: RestoreRequest) -> RestoreRequest:
    return request


manage = manage_command(NAME, "ID", "the containerd container (with a running task)")
dump = dump_command(NAME, "ID", "the containerd container")
freeze = state_command(NAME, "freeze", "ID", "the containerd container")
unfreeze = state_command(NAME, "unfreeze", "ID", "the containerd container")
query = query_command(
    NAME, ("id", "image", "status", "pid", "jid"), "List the containers of the namespace with their task and job."
)
