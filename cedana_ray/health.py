"""``cedana-ray check``: CRIU, the state dir, the store and each plugin's checks."""

from __future__ import annotations

import gzip
import os
import platform
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from . import criu
from .engine import Engine
from .errors import CedanaError
from .models import HealthCheck

# CRIU features worth knowing about; cedana-ray never runs what the kernel lacks.
CRIU_FEATURES = ("mem_dirty_track", "pidfd_store", "uffd-noncoop", "network_lock_nftables", "timens")
INSTALLABLE_ARCHES = ("x86_64", "aarch64")  # what scripts/install-criu.sh installs CRIU for


def _criu_checks(full: bool) -> list[HealthCheck]:
    try:
        checks = [HealthCheck(name="version", ok=True, detail=f"{criu.version()} ({criu.binary()})")]
    except CedanaError as exc:
        return [HealthCheck(name="version", ok=False, detail=str(exc))]
    ok, verdict = criu.check()
    checks.append(HealthCheck(name="criu check", ok=ok, detail=verdict))
    for feature in CRIU_FEATURES if full else CRIU_FEATURES[:1]:
        has = criu.has_feature(feature)
        checks.append(
            HealthCheck(
                name=f"feature {feature}", ok=has, fatal=False, detail="supported" if has else "not supported here"
            )
        )
    if full:
        res = subprocess.run([criu.binary(), "check", "--all"], capture_output=True, text=True)
        tail = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.strip()][-1:]
        checks.append(
            HealthCheck(name="criu check --all", ok=res.returncode == 0, fatal=False, detail=tail[0] if tail else "")
        )
    return checks


def _platform_checks() -> list[HealthCheck]:
    """What CRIU needs of this machine, said where ``criu check`` alone would not say why."""
    machine = platform.machine()
    installable = machine in INSTALLABLE_ARCHES
    arch = f"{machine}" + ("" if installable else ": scripts/install-criu.sh installs CRIU for x86_64 and "
                           "aarch64 only; install CRIU >= 4.2 for it yourself (criu.org)")  # fmt: skip
    setting = _kernel_setting("CONFIG_CHECKPOINT_RESTORE")
    kernel = f"Linux {platform.release()}, CONFIG_CHECKPOINT_RESTORE=" + (setting or "? (no kernel config readable)")
    missing = setting == "n"
    if missing:
        kernel += ": CRIU cannot work on this kernel"
    return [
        HealthCheck(name="architecture", ok=installable, fatal=False, detail=arch),
        HealthCheck(name="kernel", ok=not missing, fatal=missing, detail=kernel),
    ]


def _kernel_setting(option: str) -> str | None:
    """``y``, ``n`` (not set) or None (no config to read) for kernel ``option``."""
    for path in (Path(f"/boot/config-{platform.release()}"), Path("/proc/config.gz")):
        try:
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        except OSError:
            continue
        found = re.search(rf"^{option}=(\w+)", raw.decode(errors="replace"), re.M)
        return found[1] if found else "n"
    return None


def _state_checks(engine: Engine) -> list[HealthCheck]:
    home = engine.paths.home
    writable = os.access(home, os.W_OK)
    free = shutil.disk_usage(home).free
    return [
        HealthCheck(name="state dir", ok=writable, detail=f"{home}" + ("" if writable else " is not writable")),
        HealthCheck(name="free space", ok=free > 1 << 30, fatal=False, detail=f"{free / (1 << 30):.1f} GiB free"),
    ]


def _store_checks(engine: Engine) -> list[HealthCheck]:
    url = engine.paths.storage
    try:
        store = engine.store(url)
        if store.local:  # on an object store makedirs would create a missing bucket
            store.fs.makedirs(store.root, exist_ok=True)
        count = len(store.list())
        return [HealthCheck(name="default store", ok=True, detail=f"{url}: {count} checkpoint(s)")]
    except (CedanaError, OSError) as exc:
        return [HealthCheck(name="default store", ok=False, detail=f"{url}: {exc}")]


def run_checks(engine: Engine, full: bool = False) -> dict[str, Any]:
    groups: list[tuple[str, list[HealthCheck]]] = [
        ("platform", _platform_checks()),
        ("criu", _criu_checks(full)),
        ("state", _state_checks(engine)),
        ("store", _store_checks(engine)),
    ]
    for name in engine.pm.plugin_names():
        groups.append((f"plugin {name}", engine.pm.health_checks(name)))
    checks = [{"component": comp, **c.model_dump()} for comp, found in groups for c in found]
    return {"ok": all(c["ok"] or not c["fatal"] for c in checks), "checks": checks}
