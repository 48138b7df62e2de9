"""Live migration, a node's side: a VM moved to another node by its hypervisor's own
pre-copy migration, while it runs, with no checkpoint in between.

The coordinator (:mod:`cedana_ray.actors.live_migration`) drives it through the agents of
both nodes, each of which calls the functions here with its engine:

1. :func:`outgoing`, on the source: the files the target needs besides the stream (a VM's
   kernel and initrd).
2. :func:`receive`, on the target: the hypervisor starts with the job's machine, waiting for
   the stream on a TCP port it picked, TLS-authenticated (:mod:`cedana_ray.tls`); the
   guest's console is held back, not yet written to the job log.
3. :func:`send`, on the source: the hypervisor migrates the guest while it runs; once done
   the source's guest is paused for good, and the target's runs. A failed send leaves the
   guest running on the source (the hypervisor resumes it).
4. :func:`adopt`, on the target: the job's log so far goes first in the job log, the console
   is let through, and the job is this node's. Or, where anything failed, :func:`abort` there
   and :func:`resume` on the source.

What the hypervisor does is its type's :class:`LiveMigrator` (the ``cedana_live_migration``
hook), so that any VM type can fill it.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel

from .backend import Progress
from .engine import Engine
from .errors import StateError
from .models import LIVE_STATES, Job
from .proctree import signal_tree
from .staging import remove_tree
from .tls import TlsFiles

HOOK = "cedana_live_migration"


class Incoming(BaseModel):
    """Where the target waits for the stream, and the job as it will run there."""

    host: str
    port: int
    job: Job


class Sent(BaseModel):
    """A completed live migration, as the source's hypervisor measured it."""

    downtime_s: float  # the guest paused for the last copy: the hypervisor's own figure
    total_s: float  # from the migration's start to its end
    transferred_bytes: int


class LiveMigrator(Protocol):
    """A VM type's live migration: what the ``cedana_live_migration`` hook returns."""

    def outgoing(self, job: Job) -> dict[str, bytes]:
        """On the source: the files (name -> content) the target needs in its job dir."""
        ...

    def receive(self, job: Job, files: dict[str, bytes], job_dir: Path, tls: TlsFiles, host: str) -> Incoming:
        """On the target: with ``files`` placed in ``job_dir``, start the hypervisor of
        ``job``'s machine waiting for the stream on ``host`` (a port of its choice, ``tls``
        the server's credentials), its console held back until :meth:`received`. Raises
        :class:`~cedana_ray.errors.PrerequisiteError` where the hypervisor has no TLS:
        never a stream in the clear."""
        ...

    def send(self, job: Job, host: str, port: int, tls: TlsFiles, progress: Progress | None = None) -> Sent:
        """On the source: migrate the running guest there; returns once it completed, the
        guest here paused, telling ``progress`` the bytes sent as it goes. On failure the
        guest runs here as before, and the error is raised."""
        ...

    def received(self, job: Job) -> None:
        """On the target: wait until the stream loaded and the guest runs (paused, for a
        frozen job), then let its console through to the job log."""
        ...

    def resume(self, job: Job) -> None:
        """On the source, after a completed send whose target failed: the guest runs here again."""
        ...


def migrator(engine: Engine, jtype: str) -> LiveMigrator:
    found: LiveMigrator = engine.pm.require(jtype, HOOK, "live migration")
    return found


def outgoing(engine: Engine, jid: str) -> dict[str, bytes]:
    job = engine._live(jid)
    return migrator(engine, job.type).outgoing(job)


def receive(engine: Engine, job: Job, files: dict[str, bytes], tls: TlsFiles, host: str) -> Incoming:
    """Wait for ``job`` on this node (see :meth:`LiveMigrator.receive`); nothing left here if it fails."""
    live = migrator(engine, job.type)
    with engine.lock(job.jid):
        here = engine._existing(job.jid)
        if here and here.state in LIVE_STATES:
            raise StateError(f"job {job.jid} already runs on node {engine.node[:12]}")
        job_dir = engine.paths.job_dir(job.jid)
        remove_tree(job_dir)  # what a job of that id that ended here left
        job_dir.mkdir(parents=True)
        try:
            incoming = live.receive(job, files, job_dir, tls, host)
        except BaseException:
            remove_tree(job_dir)
            raise
    return incoming.model_copy(update={"job": incoming.job.model_copy(update={"node": engine.node})})


def send(engine: Engine, jid: str, incoming: Incoming, tls: TlsFiles, progress: Progress | None = None) -> Sent:
    job = engine._live(jid)
    with engine.lock(jid):  # no dump of it meanwhile
        return migrator(engine, job.type).send(job, incoming.host, incoming.port, tls, progress)


def adopt(engine: Engine, job: Job, history: bytes) -> Job:
    """Make the job that came in this node's: its log so far first, then its console."""
    log = Path(job.log or engine.paths.job_dir(job.jid) / "log")
    _prepend(log, history)
    migrator(engine, job.type).received(job)
    engine.registry.save_job(job)
    return job


def _prepend(log: Path, history: bytes) -> None:
    """``history`` before what the log holds (the hypervisor's own messages, if any): the
    console, held back, writes nothing meanwhile."""
    if history:
        log.write_bytes(history + log.read_bytes())


def abort(engine: Engine, job: Job) -> None:
    """Stop the hypervisor that waited for ``job`` here and remove its files."""
    if job.pid:
        signal_tree(job.pid, signal.SIGKILL)
    engine.pm.call_for(job.type, "cedana_cleanup", job=job)
    with engine.lock(job.jid):
        if (here := engine._existing(job.jid)) and here.pid == job.pid:
            engine.registry.delete_job(job.jid)


def resume(engine: Engine, jid: str) -> None:
    job = engine.registry.job(jid)
    migrator(engine, job.type).resume(job)
