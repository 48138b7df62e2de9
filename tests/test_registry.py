"""The registry's SQLite journal and read-only readers (a SLURM state dir is usually on NFS)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from cedana_ray.errors import StorageError
from cedana_ray.models import Job, JobState
from cedana_ray.registry import Registry, filesystem, journal_mode

# two lines of a real /proc/self/mountinfo, the second an NFS export (a stand-in: no NFS
# server can run on our machines)
MOUNTINFO = """\
22 1 253:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
95 22 0:52 / /shared/state rw,relatime shared:40 - nfs4 fs1:/export rw,vers=4.2
96 22 0:53 / /shared/my\\040dir rw,relatime shared:41 - nfs fs1:/other rw
"""


@pytest.mark.parametrize(
    ("path", "fstype", "journal"),
    [
        ("/shared/state/cedana/123", "nfs4", "DELETE"),
        ("/shared/state", "nfs4", "DELETE"),
        ("/shared/my dir/x", "nfs", "DELETE"),
        ("/shared/statex", "ext4", "WAL"),
        ("/home/user", "ext4", "WAL"),
    ],
)
def test_a_network_file_system_gets_a_rollback_journal(path: str, fstype: str, journal: str) -> None:
    assert filesystem(Path(path), MOUNTINFO) == fstype
    assert journal_mode(Path(path), MOUNTINFO) == journal


def test_a_local_registry_uses_a_write_ahead_log(tmp_path: Path) -> None:
    Registry(tmp_path / "r.db").add_job(Job(jid="j1", type="process", state=JobState.running))
    with sqlite3.connect(tmp_path / "r.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_read_only_registry_reads_and_never_writes(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    Registry(db).add_job(Job(jid="j1", type="process", state=JobState.running))
    reader = Registry(db, readonly=True)
    assert [j.jid for j in reader.jobs()] == ["j1"]
    with pytest.raises(StorageError, match="readonly"):
        reader.update_job("j1", state=JobState.killed)
    assert Registry(db).job("j1").state is JobState.running


def test_a_registry_from_before_checkpoint_metadata_gains_it(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    with sqlite3.connect(db) as old:  # the checkpoints table as it was
        old.execute(
            "CREATE TABLE checkpoints (checkpoint TEXT PRIMARY KEY, jid TEXT NOT NULL, path TEXT NOT NULL,"
            " size_bytes INTEGER NOT NULL, created TEXT NOT NULL)"
        )
        old.execute("INSERT INTO checkpoints VALUES ('c1', 'j1', 'file:///x/c1', 10, '2026-12-01T00:00:00+00:00')")
    registry = Registry(db)
    [kept] = registry.checkpoints()
    assert (kept.checkpoint, kept.metadata) == ("c1", {})
    registry.add_checkpoint(kept.model_copy(update={"checkpoint": "c2", "metadata": {"step": 7}}))
    assert [c.metadata for c in registry.checkpoints("j1")] == [{}, {"step": 7}]
