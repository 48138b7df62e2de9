"""Following a job to its end: its output as it comes, through dumps, restores, migrations,
drains and node loss (the job keeps its id), until it is over for good.

``run --wait``, ``cedana-ray wait JID`` and :meth:`cedana_ray.api.JobHandle.wait` use it,
so that ``ray job submit -- cedana-ray run --wait ...`` shows the workload's output in Ray's
job logs and ends as the workload does.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from .backend import Backend
from .errors import CedanaError
from .models import Job, JobState

POLL_S = 0.2
KILLED_STATUS = 128 + signal.SIGKILL  # as a shell reports a process killed by SIGKILL


def over(job: Job) -> bool:
    """Whether ``job`` is over for good: exited, killed, or lost with nothing to bring it back
    (a checkpointed job waits for its restore; a lost one run with ``--restore-on-loss`` and
    a checkpoint is restored elsewhere)."""
    if job.state is JobState.lost:
        return not (job.details.get("restore_on_loss") and job.last_checkpoint)
    return job.state in (JobState.exited, JobState.killed)


def exit_status(job: Job) -> int:
    """The status a command that waited for ``job`` exits with: the workload's own exit code,
    128+9 for a killed job, 1 for a lost one."""
    if job.state is JobState.exited:
        return 1 if job.exit_code is None else job.exit_code
    return KILLED_STATUS if job.state is JobState.killed else 1


def follow(backend: Backend, jid: str, out: Callable[[bytes], None] | None = None, poll: float = POLL_S) -> Job:
    """Pass job ``jid``'s output to ``out`` as it comes, from the start, until the job is over;
    the job as it ended. Raises JobNotFound if the job is deleted meanwhile."""
    offset = 0
    while True:
        chunk = _read(backend, jid, offset)
        if chunk:
            offset += len(chunk)
            if out:
                out(chunk)
            continue
        job = backend.job(jid)
        if not over(job):
            time.sleep(poll)
            continue
        while chunk := _read(backend, jid, offset):  # its last words, written before its end was seen
            offset += len(chunk)
            if out:
                out(chunk)
        return job


def _read(backend: Backend, jid: str, offset: int) -> bytes:
    """What job ``jid`` printed from ``offset``; nothing while its log cannot be read: between
    two nodes (a migration), or never (an adopted job's output is its own)."""
    try:
        return backend.read_log(jid, offset)
    except CedanaError:
        return b""
