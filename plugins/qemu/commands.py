"""``cedana-ray <verb> qemu ...``: the qemu plugin's commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from cedana_ray.cli.options import common
from cedana_ray.cli.workload import policy_options, start
from cedana_ray.runtime import Commands

NAME = "qemu"


def _file(value: str | None, what: str) -> str | None:
    """An absolute path to a readable file; a one-line UsageError before anything starts."""
    from .guest import require_file

    return str(require_file(Path(value), what)) if value else None


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
    from .guest import DEFAULT_APPEND, QEMU, Vm, require_disk
    from .plugin import QemuRunRequest

    kernel_file, initrd_file = _file(kernel, "--kernel"), _file(initrd, "--initrd")
    vm = Vm(memory=memory, cpus=cpus, accel="tcg" if tcg else "kvm", append=" ".join(append) or DEFAULT_APPEND)
    disk_file, fmt = require_disk(Path(disk)) if disk else (None, None)
    vm = vm.model_copy(update={"initrd": initrd_file is not None, "disk": fmt})
    cmd = [QEMU, "-kernel", str(kernel_file), *(["-initrd", initrd_file] if initrd_file else [])]
    cmd += ["-drive", str(disk_file)] if disk_file else []
    request = QemuRunRequest(
        cmd=[*cmd, "-m", vm.memory, "-append", vm.append],
        jid=jid,
        kernel=kernel_file,
        initrd=initrd_file,
        disk=disk_file,
        vm=vm,
        checkpoint_every=every,
        keep=keep,
        **encryption,
    )
    start(NAME, request, storage, as_json)


COMMANDS = Commands(
    target="JID",
    what="the VM",
    columns=("jid", "state", "pid", "status", "memory", "cpus", "accel", "machine"),
    query_help="List the VM jobs of this node, with their QEMU run state (QMP query-status).",
    restore_help="Restore a VM checkpoint from its URL, as a new QEMU.",
    own={"run": run},
)
