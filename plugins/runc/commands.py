"""``cedana-ray <verb> runc ...``: the runc plugin's commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cedana_ray.cli.options import common
from cedana_ray.cli.workload import (
    container_id,
    dump_command,
    gpu_tracing_option,
    manage_command,
    policy_options,
    query_command,
    restore_command,
    start,
    state_command,
)
from cedana_ray.requests import RestoreRequest

NAME = "runc"
BUNDLE = click.Path(exists=True, file_okay=False, path_type=Path)


@click.command(NAME)
@click.option("--bundle", required=True, type=BUNDLE, help="OCI bundle: config.json and its rootfs.")
@click.option("--id", "container", required=True, callback=container_id, help="Container id.")
@click.option("--jid", metavar="ID", help="Job id (default: the container id).")
@gpu_tracing_option
@policy_options
@common
def run(
    bundle: Path,
    container: str,
    jid: str | None,
    gpu_tracing: bool,
    storage: str | None,
    every: float | None,
    keep: int | None,
    encryption: dict[str, Any],
    as_json: bool,
    local: bool,
) -> None:
    """Run the OCI bundle as container ID under our runc root, checkpointable."""
    from .plugin import RuncRunRequest

    request = RuncRunRequest(
        cmd=["runc", "run", "--bundle", str(bundle.resolve()), container],
        bundle=str(bundle.resolve()),
        container=container,
        jid=jid or container,
        gpu_tracing=gpu_tracing,
        checkpoint_every=every,
        keep=keep,
        **encryption,
    )
    start(NAME, request, storage, as_json)


@restore_command(
    NAME,
    "Restore a runc checkpoint as a new container (named by --jid, else as dumped).",
    click.option("--bundle", type=BUNDLE, help="Bundle to restore into (default: the one recorded at the dump)."),
)
def restore(request: RestoreRequest, bundle: Path | None) -> RestoreRequest:
    from .plugin import RuncRestoreRequest

    return RuncRestoreRequest(**request.model_dump(), bundle=str(bundle.resolve()) if bundle else None)


manage = manage_command(NAME, "ID", "the running container (under our runc root)")
dump = dump_command(NAME, "ID", "the runc container")
freeze = state_command(NAME, "freeze", "ID", "the runc container")
unfreeze = state_command(NAME, "unfreeze", "ID", "the runc container")
query = query_command(
    NAME,
    ("id", "status", "pid", "jid", "bundle", "created"),
    "List the containers under our runc root with their state, PID and job.",
)
