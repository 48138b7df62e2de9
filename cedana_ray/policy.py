"""Checkpoint policies in local mode: a leave-running dump every N seconds, keep the last K.

``run ... --checkpoint-every DUR [--keep K]`` starts a detached policy runner for the job
(``python -m cedana_ray.policy HOME JID EVERY KEEP``). It outlives the CLI, pauses while
the job is checkpointed (waiting for a restore), and exits once the job is gone for good
(killed, exited, lost or deleted). Failed dumps are logged to ``policy.log`` in the job's
directory and retried at the next period.

A cluster's coordinator runs the same :func:`tick` for the jobs it runs with a policy.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
import time
from pathlib import Path

from .backend import Backend
from .config import Paths
from .errors import CedanaError, JobNotFound, UsageError
from .models import LIVE_STATES, JobState
from .requests import DumpRequest

log = logging.getLogger("cedana_ray.policy")

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}


def parse_duration(text: str) -> float:
    """``30s``, ``5m``, ``1h``, ``250ms`` or plain seconds, as seconds."""
    match = _DURATION.match(text.strip())
    if not match or float(match.group(1)) <= 0:
        raise UsageError(f"invalid duration {text!r}", hint="e.g. 30s, 5m, 1h")
    return float(match.group(1)) * _UNIT[match.group(2)]


def start(home: Path, jid: str, every_s: float, keep: int | None) -> int:
    """Start the runner for job ``jid``; its PID."""
    args = [sys.executable, "-m", "cedana_ray.policy", str(home), jid, str(every_s), str(keep or 0)]
    log = (Paths(home).job_dir(jid) / "policy.log").open("ab")
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    return proc.pid


def prune(backend: Backend, jid: str, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints of job ``jid``."""
    for info in backend.checkpoints(jid)[:-keep]:
        backend.delete_checkpoint(info.checkpoint)


def tick(backend: Backend, jid: str, keep: int | None) -> bool:
    """One period: checkpoint a live job and prune. False once the job is gone for good."""
    try:
        job = backend.job(jid)
    except JobNotFound:
        return False
    if job.state is JobState.checkpointed:
        return True
    if job.state not in LIVE_STATES:
        return False
    try:
        result = backend.dump(jid, DumpRequest(leave_running=True))
        if keep:
            prune(backend, jid, keep)
        log.info("policy checkpoint %s of job %s in %.2f s", result.checkpoint, jid, result.duration_s)
    except CedanaError as exc:
        log.error("policy checkpoint of job %s failed: %s", jid, exc)
    return True


def main() -> None:
    from .engine import Engine

    home, jid, every, keep = sys.argv[1:5]
    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(asctime)s %(message)s")
    engine = Engine(Paths(Path(home)))
    period = float(every)
    while True:
        time.sleep(period)
        if not tick(engine, jid, int(keep)):
            return


if __name__ == "__main__":
    main()
