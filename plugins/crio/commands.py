"""``cedana-ray <verb> crio ...``: the crio (CRI) plugin's commands."""

from __future__ import annotations

import os

import click

from cedana_ray.runtime import Commands

from .client import ENDPOINT_ENV

NAME = "crio"


def _set_endpoint(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    # the plugin reads the endpoint where every hook can: this process's environment
    if value:
        os.environ[ENDPOINT_ENV] = value


endpoint_option = click.option(
    "--cri-endpoint",
    metavar="URL",
    expose_value=False,
    is_eager=True,
    callback=_set_endpoint,
    help=f"The node's CRI endpoint (default: ${ENDPOINT_ENV}, else containerd's socket). With --local.",
)


def with_endpoint(command: click.Command) -> click.Command:
    """Add ``--cri-endpoint`` (default ``CONTAINER_RUNTIME_ENDPOINT``) to a shared command."""
    return endpoint_option(command)


COMMANDS = Commands(
    target="ID",
    what="the CRI container",
    columns=("id", "name", "pod", "image", "state", "jid"),
    query_help="List the containers of the CRI endpoint.",
    restore_help="Restore a CRI checkpoint into the container's pod (as the dumped container, or --jid NEW).",
    wrap=with_endpoint,
)
