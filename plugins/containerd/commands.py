"""``cedana-ray <verb> containerd ...``: the containerd plugin's commands."""

from __future__ import annotations

import os
from typing import Any

import click

from cedana_ray.cli.common import common
from cedana_ray.cli.workload import container_id, env_option, gpu_tracing_option, policy_options, start
from cedana_ray.runtime import Commands

from .requests import ContainerdRunRequest

NAME = "containerd"
MOUNT_OPTIONS = {"ro", "rw", "bind", "rbind"}


def bind_mounts(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> list[dict[str, Any]]:
    """A click callback: ``SRC:DST[:OPTIONS]`` options (OPTIONS: ``ro``, ``rw``, ``rbind`` or
    ``bind``, comma-separated, as podman's ``-v``) as bind mounts of existing host paths."""
    mounts = []
    for text in value:
        src, _, rest = text.partition(":")
        dst, _, opts = rest.partition(":")
        options = set(opts.split(",")) - {""}
        clash = options >= {"ro", "rw"} or options >= {"bind", "rbind"}
        if not src or not dst.startswith("/") or not options <= MOUNT_OPTIONS or clash:
            raise click.BadParameter(f"{text!r} is not SRC:DST[:ro|rw][,bind|rbind] with an absolute DST")
        if not os.path.exists(src):
            raise click.BadParameter(f"{src} does not exist")
        bind = {"source": os.path.abspath(src), "destination": dst}
        mounts.append({**bind, "readonly": "ro" in options, "recursive": "bind" not in options})
    return mounts


@click.command(NAME, context_settings={"ignore_unknown_options": True})
@click.option("--image", required=True, metavar="REF", help="An image already in the namespace (`ctr images import`).")
@click.option("--id", "container", required=True, callback=container_id, help="Container id.")
@click.option("--snapshotter", help="containerd snapshotter (default: containerd's).")
@click.option("--jid", metavar="ID", help="Job id (default: the container id).")
@env_option
@click.option("--cwd", metavar="DIR", help="Working directory in the container (default: the image's).")
@click.option(
    "--mount",
    "mounts",
    multiple=True,
    callback=bind_mounts,
    metavar="SRC:DST[:OPTS]",
    help="Bind mount (repeatable); OPTS: ro, bind (without the mounts under SRC).",
)
@click.option(
    "--device",
    "devices",
    multiple=True,
    type=click.Path(exists=True),
    metavar="PATH",
    help="Host device, or a directory of them, to give the container (repeatable).",
)
@click.option("--gpu", is_flag=True, help="Give the container this machine's NVIDIA GPUs (refused without any).")
@gpu_tracing_option
@policy_options
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@common
def run(
    image: str,
    container: str,
    snapshotter: str | None,
    jid: str | None,
    env: dict[str, str],
    cwd: str | None,
    mounts: list[dict[str, Any]],
    devices: tuple[str, ...],
    gpu: bool,
    gpu_tracing: bool,
    storage: str | None,
    every: float | None,
    keep: int | None,
    encryption: dict[str, Any],
    args: tuple[str, ...],
    as_json: bool,
    local: bool,
) -> None:
    """Run IMAGE as container ID in containerd (CONTAINERD_ADDRESS, CONTAINERD_NAMESPACE),
    with ARGS as its command if given (after `--`), else the image's."""
    request = ContainerdRunRequest(
        cmd=["ctr", "run", image, container, *args],
        image=image,
        container=container,
        snapshotter=snapshotter,
        args=list(args),
        env=env,
        cwd=cwd,
        mounts=mounts,
        devices=[os.path.abspath(d) for d in devices],
        gpu=gpu,
        gpu_tracing=gpu_tracing,
        jid=jid or container,
        checkpoint_every=every,
        keep=keep,
        **encryption,
    )
    start(NAME, request, storage, as_json)


COMMANDS = Commands(
    target="ID",
    what="the containerd container",
    adopt="the containerd container (with a running task)",
    columns=("id", "image", "status", "pid", "jid"),
    query_help="List the containers of the namespace with their task and job.",
    restore_help="Restore a containerd checkpoint as a new container and task (named by --jid, else as dumped).",
    own={"run": run},
)
