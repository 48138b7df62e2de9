"""``cedana-ray <verb> qemu ...``: the qemu plugin's commands."""

from __future__ import annotations

from typing import Any

import click

from cedana_ray.cli.common import common
from cedana_ray.cli.workload import policy_options, start
from cedana_ray.runtime import Commands

NAME = "qemu"


@click.command(NAME, context_settings={"ignore_unknown_options": True})
@click.option("--kernel", required=True, metavar="FILE", help="The guest's kernel (a bzImage, vmlinuz).")
@click.option("--initrd", metavar="FILE", help="Its initramfs.")
@click.option(
    "--disk",
    metavar="IMG",
    help="A disk image (raw, or qcow2 without a backing file), a virtio disk; the VM writes its own copy.",
)
@click.option("--memory", default="256M", show_default=True, metavar="SIZE", help="Guest RAM: 128M, 2G.")
@click.option("--cpus", type=click.IntRange(1, 64), default=1, show_default=True, help="Virtual CPUs.")
@click.option(
    "--tcg/--kvm",
    "tcg",
    default=True,
    help="Accelerator: TCG, emulated (default), or KVM, refused where KVM is unusable.",
)
@click.option("--jid", metavar="ID", help="Job id (default: generated).")
@policy_options
@click.argument("append", nargs=-1, type=click.UNPROCESSED, metavar="[-- KERNEL ARGS]")
@common
def run(
    kernel: str,
    initrd: str | None,
    disk: str | None,
    memory: str,
    cpus: int,
    tcg: bool,
    jid: str | None,
    storage: str | None,
    every: float | None,
    keep: int | None,
    encryption: dict[str, Any],
    append: tuple[str, ...],
    as_json: bool,
    local: bool,
) -> None:
    """Boot a VM under QEMU as a checkpointable job; its log is the guest's serial console.

    KERNEL ARGS replace the default kernel command line, console=ttyS0 panic=-1 quiet
    (keep console=ttyS0 to see the guest's output).
    """
    from .plugin import vm_request

    options = {"initrd": initrd, "disk": disk, "memory": memory, "cpus": cpus, "kvm": not tcg, "append": append}
    request = vm_request(kernel, **options, jid=jid, checkpoint_every=every, keep=keep, **encryption)
    start(NAME, request, storage, as_json)


COMMANDS = Commands(
    target="JID",
    what="the VM",
    columns=("jid", "state", "pid", "status", "memory", "cpus", "accel", "machine"),
    query_help="List the VM jobs of this node, with their QEMU run state (QMP query-status).",
    restore_help="Restore a VM checkpoint from its URL, as a new QEMU.",
    own={"run": run},
)
