"""The CRIU driver: finding the binary, its version and features, dump, restore args.

CRIU's failures are reported with CRIU's own first ``Error (...)`` line from its
log, never as a bare exit status.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path

from . import failpoint
from .errors import DumpError, PrerequisiteError
from .models import CriuOptions

MIN_VERSION = (4, 2)
INSTALL_HINT = "run `make setup` or scripts/install-criu.sh to install CRIU >= 4.2"
# CRIU prints this when it runs without CAP_SYS_RESOURCE over its own limit; harmless.
_NOISE = ("rlimit: Can't setup RLIMIT_NOFILE",)
# The OCI annotation container runtimes (runc, and containerd through it) read a CRIU
# configuration file from, at checkpoint and restore: CRIU options their command lines lack.
CONFIG_ANNOTATION = "org.criu.config"


def binary() -> str:
    path = os.environ.get("CEDANA_RAY_CRIU") or shutil.which("criu")
    if not path:
        raise PrerequisiteError("criu not found on PATH", hint=INSTALL_HINT)
    return path


@functools.cache
def version() -> str:
    """CRIU's version string; raises when CRIU is missing or older than 4.2."""
    try:
        out = subprocess.run([binary(), "--version"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise PrerequisiteError(f"criu --version failed: {exc}", hint=INSTALL_HINT) from exc
    match = re.search(r"Version:\s*([\d.]+)", out.stdout)
    if not match:
        raise PrerequisiteError(f"cannot parse criu version from {out.stdout!r}")
    found = match.group(1)
    if tuple(int(p) for p in found.split(".")[:2]) < MIN_VERSION:
        raise PrerequisiteError(f"criu {found} is too old (need >= 4.2)", hint=INSTALL_HINT)
    return found


@functools.cache
def has_feature(name: str) -> bool:
    """Whether this kernel and CRIU support ``criu check --feature NAME``."""
    res = subprocess.run([binary(), "check", "--feature", name], capture_output=True)
    return res.returncode == 0


def check() -> tuple[bool, str]:
    """``criu check``: (ok, last line of its verdict)."""
    res = subprocess.run([binary(), "check"], capture_output=True, text=True)
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()]
    return res.returncode == 0, (lines[-1] if lines else f"exit status {res.returncode}")


def first_error(log: Path) -> str | None:
    """CRIU's first meaningful ``Error (file:line): ...`` line in ``log``."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if "Error (" in line and not any(n in line for n in _NOISE):
            return line[line.index("Error (") :].strip()
    return None


def option_args(opts: CriuOptions) -> list[str]:
    """Arguments that dump and restore must both be given."""
    args = ["--tcp-established"] if opts.tcp_established else []
    if opts.tcp_established and not shutil.which("iptables-restore"):
        args += ["--network-lock", "nftables"]
    args += ["--file-locks"] if opts.file_locks else []
    args += ["--shell-job"] if opts.shell_job else []
    for ext in opts.external:
        args += ["--external", ext]
    return args


def dump(
    pid: int,
    images: Path,
    work: Path,
    opts: CriuOptions,
    *,
    leave_running: bool,
    enter: int | None = None,
    hold: int | None = None,
) -> None:
    """Dump the tree rooted at ``pid`` into ``images``.

    Without ``leave_running`` the tree is left stopped, not killed, so that the
    caller can resume it if storing the checkpoint fails. With ``enter``, CRIU runs
    in the PID and mount namespaces of that process, where ``pid`` is the tree's PID.
    CRIU inherits the descriptor ``hold`` (the job's lock), so that it holds it even if we die.
    """
    prefix = ["nsenter", "-t", str(enter), "-p", "-m", "--"] if enter else []
    args = [*prefix, binary(), "dump", "-t", str(pid), "-D", str(images), "-W", str(work)]
    args += ["-o", "dump.log", "--leave-running" if leave_running else "--leave-stopped"]
    args += option_args(opts)
    keep = () if hold is None else (hold,)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, pass_fds=keep)
    failpoint.reached("dump:criu")
    _, stderr = proc.communicate()
    if proc.returncode != 0:
        detail = first_error(work / "dump.log") or stderr.strip() or f"exit {proc.returncode}"
        raise DumpError(f"criu dump of PID {pid} failed: {detail}")


def restore_args(images: Path, work: Path, opts: CriuOptions, *, leave_stopped: bool = False) -> list[str]:
    """The restore command line, run by the workload's supervisor."""
    args = [binary(), "restore", "-D", str(images), "-W", str(work), "-o", "restore.log", "--restore-detached"]
    return [*args, *(["--leave-stopped"] if leave_stopped else []), *option_args(opts)]


def write_config(path: Path, *options: str) -> Path:
    """A CRIU configuration file (see :data:`CONFIG_ANNOTATION`) with ``options``, one a line;
    without iptables-restore CRIU locks the container's network namespace with nftables."""
    lines = [*options, *([] if shutil.which("iptables-restore") else ["network-lock nftables"])]
    path.write_text("".join(f"{line}\n" for line in lines))
    return path
