"""What cedana-ray writes is private: jobs' logs, images, manifests, the registry, keys."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from test_cli import cedana
from test_process_criu import COUNTER

pytestmark = pytest.mark.criu


def loose(root: Path) -> list[str]:
    """Everything under ``root`` (``root`` too) that another user could read or enter."""
    found = []
    for path in [root, *root.rglob("*")]:
        mode = path.lstat().st_mode
        if not stat.S_ISLNK(mode) and mode & 0o077:
            found.append(f"{path} {stat.filemode(mode)}")
    return found


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_state_and_checkpoints_are_private(home: Path, compression: str) -> None:
    os.umask(0o022)  # as a user's shell has it: what we write must not depend on it
    run = cedana("run", "process", "--jid", "p1", "--local", "--json", "--", *COUNTER)
    assert run.returncode == 0, run.stderr
    dump = cedana("dump", "job", "p1", "--compression", compression, "--leave-running", "--local", "--json")
    assert dump.returncode == 0, dump.stderr
    assert Path(json.loads(dump.stdout)["path"].removeprefix("file://")).is_relative_to(home)
    assert cedana("job", "kill", "p1", "--local").returncode == 0
    assert (home / "signing.key").exists() and (home / "state.db").exists() and (home / "jobs" / "p1" / "log").exists()
    assert loose(home) == []
