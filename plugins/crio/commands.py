"""``cedana-ray <verb> crio ...``: the crio (CRI) plugin's commands."""

from __future__ import annotations

import os

import click

from cedana_ray.cli.workload import dump_command, manage_command, query_command, restore_command
from cedana_ray.requests import RestoreRequest

from .client import ENDPOINT_ENV

NAME = "crio"
WHAT = "the CRI container"


def _set_endpoint(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    # the plugin reads the endpoint where every hook can: this process's environment
    if value:
        os.environ[ENDPOINT_ENV] = value


def with_endpoint(command: click.Command) -> click.Command:
    """Add ``--cri-endpoint`` (default ``CONTAINER_RUNTIME_ENDPOINT``) to a shared command."""
    command.params.insert(
        0,
        click.Option(
            ["--cri-endpoint"],
            metavar="URL",
            expose_value=False,
            is_eager=True,
            callback=_set_endpoint,
            help=f"The CRI endpoint (default: ${ENDPOINT_ENV}, else containerd's socket). With --local.",
        ),
    )
    return command


@restore_command(NAME, "Restore a CRI checkpoint into the container's pod (as the dumped container, or --jid NEW).")
def _restore(request: RestoreRequest) -> RestoreRequest:
    return request


restore = with_endpoint(_restore)
manage = with_endpoint(manage_command(NAME, "ID", WHAT))
dump = with_endpoint(dump_command(NAME, "ID", WHAT))
query = with_endpoint(
    query_command(NAME, ("id", "name", "pod", "image", "state", "jid"), "List the containers of the CRI endpoint.")
)
