"""``cedana-ray check`` for runc: the binary and its version, CRIU, cgroups, privileges."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

from cedana_ray import criu
from cedana_ray.errors import PrerequisiteError
from cedana_ray.models import HealthCheck

from .runtime import binary

MIN_VERSION = (1, 1)  # checkpoint of paused containers and --work-path as we use them


def _runc_version() -> HealthCheck:
    try:
        out = subprocess.run([binary(), "--version"], capture_output=True, text=True, check=True).stdout
    except (PrerequisiteError, OSError, subprocess.CalledProcessError) as exc:
        return HealthCheck(name="runc", ok=False, fatal=False, detail=str(exc))  # an optional runtime
    match = re.search(r"runc version (\d+)\.(\d+)\S*", out)
    if not match:
        return HealthCheck(name="runc", ok=False, detail=f"cannot parse `runc --version`: {out.strip()!r}")
    ok = (int(match.group(1)), int(match.group(2))) >= MIN_VERSION
    return HealthCheck(
        name="runc", ok=ok, fatal=False, detail=f"{match.group(0)} at {binary()}" + ("" if ok else " (need >= 1.1)")
    )


def _criu() -> HealthCheck:
    try:
        return HealthCheck(name="criu", ok=True, detail=f"criu {criu.version()} at {criu.binary()}")
    except PrerequisiteError as exc:
        return HealthCheck(name="criu", ok=False, detail=str(exc))


def cgroup_mode() -> str:
    """unified (v2 only), hybrid (v1 controllers and a v2 tree) or legacy (v1 only)."""
    if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return "unified"
    return "hybrid" if os.path.isdir("/sys/fs/cgroup/unified") else "legacy"


def _network_lock() -> HealthCheck:
    """CRIU locks a container's network namespace during a dump with iptables or nftables;
    containers we start get nftables through their CRIU config file when iptables is missing."""
    detail = "iptables-restore" if shutil.which("iptables-restore") else "nftables (no iptables-restore)"
    if not shutil.which("iptables-restore"):
        detail += ": containers adopted with `manage` need iptables-restore or an org.criu.config annotation"
    return HealthCheck(name="network lock", ok=True, detail=detail)


def checks() -> list[HealthCheck]:
    root = os.geteuid() == 0
    return [
        _runc_version(),
        _criu(),
        HealthCheck(name="cgroups", ok=True, detail=cgroup_mode()),
        _network_lock(),
        HealthCheck(name="privileges", ok=root, detail="root" if root else "runc and CRIU need root"),
    ]
