"""``cedana-ray <verb> runc ...``: the runc plugin's commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cedana_ray.cli.common import common
from cedana_ray.cli.workload import container_id, gpu_tracing_option, policy_options, restore_command, start
from cedana_ray.requests import RestoreRequest
from cedana_ray.runtime import Commands

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


COMMANDS = Commands(
    target="ID",
    what="the runc container",
    adopt="the running container (under our runc root)",
    columns=("id", "status", "pid", "jid", "bundle", "created"),
    query_help="List the containers under our runc root with their state, PID and job.",
    own={"run": run, "restore": restore},
)
