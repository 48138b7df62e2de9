"""`make demo` must keep working: its script, run for real in a private state dir."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
