"""Putting right what a dump left when its process died (SIGKILL, OOM, a lost node).

A dump marks its job (``details["dump"]``: the checkpoint and store it writes) once it
holds the job's lock, and clears the mark when it is done, whichever way. CRIU inherits
the lock, so it stays held while a dump or its orphaned CRIU runs. A mark whose lock is
free is a dead dump's: its checkpoint is catalogued if its manifest made it (the job then
has a complete checkpoint) or removed if not, and the job runs again, or is stopped if
the dump had already recorded it checkpointed. Staging directories whose process is
gone are removed. The engine does this when it starts: at the next command, or when a
node's agent restarts.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from .errors import CheckpointError, CheckpointNotFound, StateError
from .listing import DUMP_MARK as MARK
from .models import CheckpointInfo, Job, JobState, Manifest
from .staging import staging_bases

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("cedana_ray.recovery")


def mark(checkpoint: str, store: str) -> dict[str, Any]:
    """The ``details`` that say a dump of ``checkpoint`` into ``store`` is under way."""
    return {MARK: {"checkpoint": checkpoint, "store": store}}


CLEARED: dict[str, Any] = {MARK: None}


def repair(engine: Engine) -> None:
    """Finish what dead dumps left (see the module's docstring)."""
    for job in engine.registry.jobs_with(MARK):  # every command starts here: read only those
        try:
            with engine.lock(job.jid):
                _finish_dead_dump(engine, engine.registry.job(job.jid))
        except StateError:
            continue  # its dump (or that dump's CRIU) is still running
    for base in staging_bases(engine.paths.staging):
        _remove_orphans(base)


def _finish_dead_dump(engine: Engine, job: Job) -> None:
    pending = job.details.get(MARK)
    if not pending:  # finished meanwhile
        return
    manifest = _stored(engine, pending["checkpoint"], pending["store"])
    if manifest is not None:
        engine.records.dumped(CheckpointInfo.of(manifest, f"{pending['store']}/{manifest.checkpoint}"))
    if job.state is JobState.checkpointed and manifest is not None:
        engine.stop(job)  # recorded as checkpointed, then the dump died before stopping it
    elif job.state is JobState.running:
        engine.resume_stopped(job)  # stopped for a commit that never came
    engine.registry.update_job(job.jid, details=CLEARED)
    log.warning(
        "job %s: finished a dump that died (checkpoint %s %s)",
        job.jid,
        pending["checkpoint"],
        "kept" if manifest else "removed",
    )


def _stored(engine: Engine, ckpt: str, url: str) -> Manifest | None:
    """The manifest of the dead dump's checkpoint if it was committed; else None, its remains removed."""
    store = engine.store(url)
    try:
        return store.manifest(ckpt)
    except CheckpointNotFound:
        store.discard(ckpt)
    except CheckpointError:  # not ours after all: leave it to whoever made it
        pass
    return None


def _remove_orphans(base: Path) -> None:
    """Remove the staging directories (named ``PID-...``) of processes that are gone."""
    for entry in base.iterdir():
        owner = entry.name.split("-", 1)[0]
        if owner.isdigit() and not psutil.pid_exists(int(owner)):
            shutil.rmtree(entry, ignore_errors=True)
