"""The local job registry and checkpoint catalog, in SQLite under the state dir.

Separate CLI invocations share it. Each thread keeps its own connection open: opening
and closing one per call cost about 5 ms each time, closing the last one checkpointing
the write-ahead log. Jobs are stored as their JSON model so the registry never drifts
from :class:`Job`.

On a network file system (a SLURM allocation's state dir is usually on NFS) SQLite's
write-ahead log is unsafe, since its index lives in shared memory that only one machine
sees: there the registry uses a rollback journal. Whoever only reads (``query slurm`` on a
login node) opens it read-only.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import CheckpointNotFound, JobNotFound, StateError, StorageError
from .models import CheckpointInfo, Event, Job

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (jid TEXT PRIMARY KEY, data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    checkpoint TEXT PRIMARY KEY, jid TEXT NOT NULL, path TEXT NOT NULL,
    size_bytes INTEGER NOT NULL, created TEXT NOT NULL, metadata TEXT NOT NULL DEFAULT '{}');
CREATE INDEX IF NOT EXISTS checkpoints_jid ON checkpoints (jid, created);
CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY AUTOINCREMENT, jid TEXT NOT NULL, data TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_jid ON events (jid, id);
"""
NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "lustre", "gpfs", "beegfs", "ceph", "glusterfs", "9p")


def filesystem(path: Path, mountinfo: str | None = None) -> str:
    """The type of the file system ``path`` is on, from ``mountinfo`` (default: this process's)."""
    text = Path("/proc/self/mountinfo").read_text() if mountinfo is None else mountinfo
    target, best, found = str(path.resolve()), "", ""
    for line in text.splitlines():
        fields = line.split()
        mount, fstype = fields[4].replace("\\040", " "), fields[fields.index("-") + 1]
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, found = mount, fstype
    return found


def journal_mode(path: Path, mountinfo: str | None = None) -> str:
    """SQLite's journal for a database in directory ``path``: a write-ahead log, but where
    several machines may open it (a network file system) a rollback journal."""
    fstype = filesystem(path, mountinfo)
    return "DELETE" if fstype in NETWORK_FS or fstype.startswith("fuse.") else "WAL"


class Registry:
    def __init__(self, db: Path, *, readonly: bool = False) -> None:
        self.db = db
        self.readonly = readonly
        self._journal = "" if readonly else journal_mode(db.parent)
        self._local = threading.local()
        if not readonly:
            with self._conn() as conn:
                conn.executescript(SCHEMA)
                columns = {row[1] for row in conn.execute("PRAGMA table_info(checkpoints)")}
                if "metadata" not in columns:  # a registry from before checkpoints had metadata
                    conn.execute("ALTER TABLE checkpoints ADD COLUMN metadata TEXT NOT NULL DEFAULT '{}'")

    @contextmanager
    def _conn(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection (autocommit: every statement is its own transaction).

        WAL with ``synchronous=NORMAL``: a commit does not wait for the disk (a power
        cut may lose the last ones, never the database): a write takes 0.5 ms, not 6.
        The jobs such a cut loses are gone with the machine anyway. A rollback journal
        (network file systems) commits with ``synchronous=FULL``."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = self._connect()
            except sqlite3.Error as exc:
                raise StorageError(f"cannot open the job registry {self.db}: {exc}") from exc
            self._local.conn = conn
        try:
            yield conn
        except sqlite3.Error as exc:
            raise StorageError(f"job registry {self.db}: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        if self.readonly:
            return sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=30, isolation_level=None)
        conn = sqlite3.connect(self.db, timeout=30, isolation_level=None)
        conn.execute(f"PRAGMA journal_mode={self._journal}")
        conn.execute(f"PRAGMA synchronous={'NORMAL' if self._journal == 'WAL' else 'FULL'}")
        return conn

    # -- jobs
    def add_job(self, job: Job) -> None:
        with self._conn() as conn:
            try:
                conn.execute("INSERT INTO jobs VALUES (?, ?)", (job.jid, job.model_dump_json()))
            except sqlite3.IntegrityError as exc:
                raise StateError(f"a job named {job.jid!r} already exists") from exc

    def update_job(self, jid: str, *, when: Callable[[Job], bool] | None = None, **changes: Any) -> Job:
        """Set ``changes`` on job ``jid`` in one transaction, unless ``when`` (given the job as
        it is now) says no; ``details`` are merged into the job's. What other processes changed
        meanwhile is kept, where writing back a whole job read earlier would undo it.
        Returns the job as it now is."""
        with self._conn() as conn:
            conn.execute("BEGIN IMMEDIATE")  # the read and the write, with no writer between them
            try:
                job = self._job(conn, jid)
                if when is None or when(job):
                    if "details" in changes:
                        changes["details"] = {**job.details, **changes["details"]}
                    job = job.model_copy(update=changes)
                    conn.execute("UPDATE jobs SET data = ? WHERE jid = ?", (job.model_dump_json(), jid))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return job

    def save_job(self, job: Job) -> None:
        with self._conn() as conn:
            conn.execute("INSERT OR REPLACE INTO jobs VALUES (?, ?)", (job.jid, job.model_dump_json()))

    def job(self, jid: str) -> Job:
        with self._conn() as conn:
            return self._job(conn, jid)

    @staticmethod
    def _job(conn: sqlite3.Connection, jid: str) -> Job:
        row = conn.execute("SELECT data FROM jobs WHERE jid = ?", (jid,)).fetchone()
        if row is None:
            raise JobNotFound(f"no job {jid!r}", hint="`cedana-ray ps` lists the jobs")
        return Job.model_validate_json(row[0])

    def jobs(self) -> list[Job]:
        with self._conn() as conn:
            rows = conn.execute("SELECT data FROM jobs").fetchall()
        return sorted((Job.model_validate_json(r[0]) for r in rows), key=lambda j: j.created)

    def jobs_with(self, detail: str) -> list[Job]:
        """The jobs whose ``details[detail]`` is set, found by SQLite without reading the others."""
        query = "SELECT data FROM jobs WHERE json_extract(data, ?) IS NOT NULL"  # a JSON null is SQL NULL
        with self._conn() as conn:
            rows = conn.execute(query, (f"$.details.{detail}",)).fetchall()
        return [Job.model_validate_json(r[0]) for r in rows]

    def delete_job(self, jid: str) -> None:
        with self._conn() as conn:
            conn.execute("DELETE FROM jobs WHERE jid = ?", (jid,))

    # -- checkpoints
    def add_checkpoint(self, info: CheckpointInfo) -> None:
        with self._conn() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?)",
                (
                    info.checkpoint,
                    info.jid,
                    info.path,
                    info.size_bytes,
                    info.created.isoformat(),
                    json.dumps(info.metadata),
                ),
            )

    def checkpoints(self, jid: str | None = None) -> list[CheckpointInfo]:
        query, args = "SELECT checkpoint, jid, path, size_bytes, created, metadata FROM checkpoints", ()
        if jid is not None:
            query, args = query + " WHERE jid = ?", (jid,)
        with self._conn() as conn:
            rows = conn.execute(query + " ORDER BY created", args).fetchall()
        keys = ("checkpoint", "jid", "path", "size_bytes", "created")
        return [CheckpointInfo(**dict(zip(keys, r, strict=False)), metadata=json.loads(r[5])) for r in rows]

    def checkpoint(self, ckpt: str) -> CheckpointInfo:
        found = [c for c in self.checkpoints() if c.checkpoint == ckpt]
        if not found:
            raise CheckpointNotFound(f"no checkpoint {ckpt!r}", hint="`cedana-ray checkpoint list`")
        return found[0]

    def delete_checkpoint(self, ckpt: str) -> None:
        with self._conn() as conn:
            conn.execute("DELETE FROM checkpoints WHERE checkpoint = ?", (ckpt,))

    # -- events
    def add_event(self, event: Event) -> None:
        with self._conn() as conn:
            conn.execute("INSERT INTO events (jid, data) VALUES (?, ?)", (event.jid, event.model_dump_json()))

    def events(self, jid: str | None = None, after: int = 0) -> list[Event]:
        """The events after the ``after``-th, oldest first: of job ``jid``, or of every job."""
        query, args = "SELECT id, data FROM events WHERE id > ?", (after,)
        if jid is not None:
            query, args = query + " AND jid = ?", (after, jid)
        with self._conn() as conn:
            rows = conn.execute(query + " ORDER BY id", args).fetchall()
        return [Event.model_validate_json(data).model_copy(update={"id": n}) for n, data in rows]
