"""What a VM job is (:class:`Vm`), the QEMU command line that runs or restores it, and what
QEMU needs on this node: the binary and an accelerator.

Why TCG by default: where ``/dev/kvm`` is PVM (``kvm_pvm``: KVM for guests without
hardware virtualization, as on this project's machines) ordinary guests crash, and where there
is no ``/dev/kvm`` at all only TCG runs. ``--kvm`` is refused in one line where KVM is unusable.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from cedana_ray.errors import PrerequisiteError, UsageError
from cedana_ray.models import HealthCheck, OneLine

QEMU_ENV = "CEDANA_RAY_QEMU"  # another QEMU binary than qemu-system-x86_64 on PATH
QEMU = "qemu-system-x86_64"
KVM = Path("/dev/kvm")
DEFAULT_APPEND = "console=ttyS0 panic=-1 quiet"  # panic=-1 with -no-reboot: a dead guest ends the job
QMP_SOCKET, STATE, KERNEL, INITRD = "qmp.sock", "vm.state", "vmlinuz", "initrd"  # in the job dir and images
DISK = "disk"  # the VM's own copy of its --disk, in the job dir and images
QCOW2_MAGIC = b"QFI\xfb"
HOLD = "console.hold"  # while it exists, a live migration's target holds its console back (watch.py)
ERRORS = "qemu.err"  # QEMU's own messages, in the job dir: the job log is the guest's console alone
_MEMORY = re.compile(r"^[1-9]\d*[MG]$")
_MACHINE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def _memory(value: str) -> str:
    if not _MEMORY.match(value):
        raise UsageError(f"invalid VM memory {value!r}", hint="e.g. 128M or 2G")
    return value


def _machine(value: str) -> str:
    if not _MACHINE.match(value):
        raise UsageError(f"invalid QEMU machine type {value!r}")
    return value


class Vm(BaseModel):
    """A VM job's machine, as run and as a checkpoint records it (read back with
    ``Manifest.facts``: every field is checked, since a checkpoint is untrusted)."""

    model_config = ConfigDict(frozen=True)

    memory: Annotated[str, AfterValidator(_memory)] = "256M"
    cpus: int = Field(1, ge=1, le=64)
    accel: Literal["tcg", "kvm"] = "tcg"
    append: OneLine = DEFAULT_APPEND
    initrd: bool = False  # whether it boots with an initrd (the file lives beside the kernel)
    disk: Literal["raw", "qcow2"] | None = None  # its disk's format, if it has one (a virtio disk)
    # the versioned machine type (pc-i440fx-7.2) that `pc` was when it started: a restore on a
    # newer QEMU must recreate the same machine for the state to load
    machine: Annotated[str, AfterValidator(_machine)] = "pc"


def binary() -> str:
    """The QEMU binary: ``$CEDANA_RAY_QEMU``, else qemu-system-x86_64 on PATH."""
    name = os.environ.get(QEMU_ENV, QEMU)
    found = shutil.which(name)
    if not found:
        raise PrerequisiteError(f"{name} not found", hint="install qemu-system-x86 (scripts/install-qemu.sh)")
    return found


def version() -> str:
    """QEMU's version, as ``--version`` prints it (``7.2.22``)."""
    try:
        out = subprocess.run([binary(), "--version"], capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise PrerequisiteError(f"{QEMU} --version failed: {exc}") from exc
    found = re.search(r"version (\d+\.\d+(?:\.\d+)?)", out)
    if not found:
        raise PrerequisiteError(f"cannot parse `{QEMU} --version`: {out.strip()[:80]!r}")
    return found.group(1)


def kvm_unusable() -> str | None:
    """Why KVM cannot run ordinary guests here, or None when it can."""
    if not KVM.exists():
        return f"no {KVM}"
    if not os.access(KVM, os.R_OK | os.W_OK):
        return f"{KVM} is not readable and writable by this user"
    if Path("/sys/module/kvm_pvm").exists():
        return f"{KVM} is PVM (kvm_pvm), on which ordinary guests crash"
    with open("/proc/cpuinfo") as f:
        flags = set(re.findall(r"\b(vmx|svm)\b", f.read()))
    return None if flags else "the CPU has no hardware virtualization (vmx/svm)"


def require_accel(accel: str) -> None:
    """Refuse ``--kvm`` where KVM is unusable, in one line."""
    if accel == "kvm" and (why := kvm_unusable()):
        raise UsageError(f"--kvm: KVM is unusable here: {why}", hint="run the VM with --tcg")


def require_file(path: Path, what: str) -> Path:
    """``path`` resolved, if it is a readable file; a UsageError before anything starts otherwise."""
    if not path.is_file() or not os.access(path, os.R_OK):
        raise UsageError(f"{what} {path}: no such readable file")
    return path.resolve()


def require_disk(path: Path) -> tuple[Path, Literal["raw", "qcow2"]]:
    """``--disk``: a readable file, resolved, and its format (qcow2 by its magic, else raw);
    a qcow2 with a backing file is refused (its copy would still read the user's file)."""
    path = require_file(path, "--disk")
    with open(path, "rb") as f:
        header = f.read(16)
    if not header.startswith(QCOW2_MAGIC):
        return path, "raw"
    if int.from_bytes(header[8:16], "big"):  # backing_file_offset
        raise UsageError(f"--disk {path}: a qcow2 with a backing file is not supported", hint="give a standalone image")
    return path, "qcow2"


def argv(vm: Vm, files: Path, incoming: Path | None = None, *, defer: bool = False, paused: bool = False) -> list[str]:
    """QEMU's command line for ``vm``, with its kernel, initrd and disk in ``files`` (the job dir)
    and its QMP socket there, relative (QEMU runs in the job dir: the path's length is then
    no limit); ``incoming``: a state file to restore, the VM left paused once loaded;
    ``defer``: a live migration's target, whose stream's address QMP ``migrate-incoming``
    gives, the guest running once it loaded unless ``paused``."""
    args = [binary(), "-machine", vm.machine, "-accel", vm.accel, "-m", vm.memory, "-smp", str(vm.cpus)]
    args += ["-kernel", str(files / KERNEL), "-append", vm.append]
    if vm.initrd:
        args += ["-initrd", str(files / INITRD)]
    if vm.disk:  # QEMU's option syntax: a comma in the path is written twice
        args += ["-drive", f"file={str(files / DISK).replace(',', ',,')},format={vm.disk},if=virtio"]
    # no default devices (NIC, VGA, floppy): less to migrate; the serial console is the job's output
    args += ["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-monitor", "none"]
    args += ["-no-reboot", "-qmp", f"unix:{QMP_SOCKET},server=on,wait=off"]
    if incoming:
        args += ["-S", "-incoming", f"exec:cat {shlex.quote(str(incoming))}"]
    elif defer:
        args += [*(["-S"] if paused else []), "-incoming", "defer"]
    return args


def health_checks() -> list[HealthCheck]:
    """QEMU and its version (optional: fatal=False), and the accelerator VMs get here."""
    return [
        HealthCheck.probe("qemu", lambda: f"QEMU {version()} at {binary()}", fatal=False),
        _accelerator(),
    ]


def _accelerator() -> HealthCheck:
    """Passes either way: without KVM, VMs run under TCG (slower, the default anyway)."""
    why = kvm_unusable()
    detail = f"tcg (KVM unusable: {why}; --kvm is refused)" if why else "tcg, or kvm with --kvm"
    return HealthCheck(name="accelerator", ok=True, detail=detail, fatal=False)
