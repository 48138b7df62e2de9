"""`make demo` must keep working: its script, run for real in a private state dir."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from cedana_ray import health

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.criu
@pytest.mark.slow
def test_demo_goes_on_where_it_stopped(home: Path) -> None:
    res = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py")], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "demo OK" in res.stdout


def test_check_passes_without_a_gpu(home: Path) -> None:
    """Optional hardware never fails `check`; a missing GPU shows as a warning."""
    res = subprocess.run([sys.executable, "-m", "cedana_ray.cli", "check", "--json"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


def test_check_says_what_criu_needs_of_the_machine(home: Path) -> None:
    """The architecture the installer covers and the kernel's checkpoint/restore support, read
    from the running kernel's config (CRIU runs here, so it must say the option is set)."""
    res = subprocess.run([sys.executable, "-m", "cedana_ray.cli", "check", "--json"], capture_output=True, text=True)
    found = {c["name"]: c for c in json.loads(res.stdout)["checks"] if c["component"] == "platform"}
    assert found["architecture"]["detail"].startswith(platform.machine())
    assert found["architecture"]["ok"] is (platform.machine() in ("x86_64", "aarch64"))
    kernel = found["kernel"]
    assert kernel["ok"] and kernel["detail"].startswith(f"Linux {platform.release()}, CONFIG_CHECKPOINT_RESTORE=")
    if kernel["detail"].endswith("=y"):  # a kernel config is readable here: an option it lacks reads as unset
        assert health._kernel_setting("CONFIG_CEDANA_RAY_NO_SUCH_OPTION") == "n"
