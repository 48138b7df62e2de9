"""Under sudo, cedana-ray adopts (and so dumps or freezes) only the caller's own processes."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cli import assert_one_error, cedana

from cedana_ray.errors import PermissionDenied

NOBODY = 65534


@pytest.fixture
def nobodys() -> Iterator[int]:
    """A process of another user (nobody's)."""
    proc = subprocess.Popen(["sleep", "60"], user=NOBODY, group=NOBODY, cwd="/")
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("verb", ["manage", "dump", "freeze"])
def test_another_users_process_is_refused_under_sudo(
    home: Path, nobodys: int, monkeypatch: pytest.MonkeyPatch, verb: str
) -> None:
    monkeypatch.setenv("SUDO_UID", "1000")
    error = assert_one_error(cedana(verb, "process", str(nobodys), "--local"), PermissionDenied)
    assert f"PID {nobodys} belongs to uid {NOBODY}, not to you (uid 1000" in error
    assert json.loads(cedana("ps", "--local", "--json").stdout) == [], "nothing was adopted"


@pytest.mark.parametrize(("sudo_uid", "allowed"), [(str(NOBODY), ""), ("1000", "1")], ids=["own", "allowed"])
def test_own_or_explicitly_allowed_processes_are_adopted(
    home: Path, nobodys: int, monkeypatch: pytest.MonkeyPatch, sudo_uid: str, allowed: str
) -> None:
    monkeypatch.setenv("SUDO_UID", sudo_uid)
    monkeypatch.setenv("CEDANA_RAY_ANY_OWNER", allowed)
    adopted = cedana("manage", "process", str(nobodys), "--local", "--json")
    assert adopted.returncode == 0, adopted.stderr
    assert json.loads(adopted.stdout)["pid"] == nobodys
