"""The SLURM client tools (scontrol, squeue, munge), their failures translated to our errors.

Only what the plugin needs: a job's record, the jobs that run cedana-ray, ping,
version and munge. A missing tool is a :class:`PrerequisiteError`, an unreachable
slurmctld one too (with SLURM's own last line), an unknown job :class:`NotFoundError`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

from pydantic import BaseModel

from cedana_ray.errors import NotFoundError, PrerequisiteError, UsageError

TIMEOUT_S = 20.0
# sbatch --comment marks the jobs our template renders and says where their state lives
COMMENT_PREFIX = "cedana-ray:"


class SlurmJob(BaseModel):
    """What SLURM says about one job."""

    job_id: str
    state: str
    nodes: str = ""
    comment: str = ""
    restarts: int = 0

    @property
    def state_root(self) -> Path | None:
        """The dir our template keeps the allocations' state under, if it rendered this job."""
        if self.comment.startswith(COMMENT_PREFIX):
            return Path(self.comment.removeprefix(COMMENT_PREFIX))
        return None


def run(*args: str) -> str:
    """Run a SLURM client command; its stdout."""
    if shutil.which(args[0]) is None:
        raise PrerequisiteError(f"{args[0]} not found", hint="install slurm-client (`make setup`)")
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise PrerequisiteError(f"`{' '.join(args)}` did not answer within {TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        raise _error(args, done.stderr)
    return done.stdout


def _error(args: tuple[str, ...], stderr: str) -> Exception:
    last = (stderr.strip().splitlines() or ["no output"])[-1].strip()
    if "Invalid job id" in last:
        return NotFoundError(f"no SLURM job {args[-1]}", hint="`squeue` lists the jobs")
    what = " ".join(a for a in args[:4] if not a.startswith("-"))
    if "configuration source" in last:
        hint = "no slurm.conf: set SLURM_CONF or install /etc/slurm/slurm.conf"
    elif args[0] == "munge":
        hint = "is munged running?"
    else:
        hint = "is slurmctld up? `scontrol ping`"
    return PrerequisiteError(f"`{what}` failed: {last}", hint=hint)


def _fields(line: str) -> dict[str, str]:
    """``scontrol show -o`` output: ``Key=Value`` pairs separated by spaces."""
    found = {}
    for token in line.split():
        key, _, value = token.partition("=")
        found[key] = value
    return found


def job(job_id: str) -> SlurmJob:
    """SLURM's record of ``job_id`` (pending, running or recently finished)."""
    if not job_id.isdigit():
        raise UsageError(f"not a SLURM job id: {job_id!r}")
    fields = _fields(run("scontrol", "-o", "show", "job", job_id))
    return SlurmJob(
        job_id=job_id,
        state=fields.get("JobState", "UNKNOWN"),
        nodes=fields.get("NodeList", "") if fields.get("NodeList") != "(null)" else "",
        comment=fields.get("Comment", "") if fields.get("Comment") != "(null)" else "",
        restarts=int(fields.get("Restarts", "0")),
    )


def cedana_jobs() -> list[SlurmJob]:
    """The queued and running jobs our template rendered."""
    found = []
    for line in run("squeue", "-h", "-o", "%i|%k").splitlines():
        job_id, comment = line.split("|", 1)
        if comment.startswith(COMMENT_PREFIX):
            with contextlib.suppress(NotFoundError):  # it ended since squeue listed it
                found.append(job(job_id))  # scontrol has the restart count, squeue has not
    return found


def ping() -> str:
    """slurmctld's answer to ``scontrol ping`` (one line)."""
    out = run("scontrol", "ping").strip()
    if " is UP" not in out:
        raise PrerequisiteError(f"slurmctld is not up: {out or 'no answer'}")
    return out.splitlines()[0]


def version() -> str:
    return run("scontrol", "--version").strip()


def munge_socket() -> str | None:
    """The munged socket slurm.conf names (``AuthInfo=socket=...``), if any."""
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    try:
        text = conf.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.strip().partition("=")
        if key.lower() == "authinfo":
            for option in value.split(","):
                name, _, path = option.partition("=")
                if name.strip() == "socket":
                    return path.strip()
    return None


def munge() -> str:
    """Encode a munge credential, as SLURM's daemons and tools do for every RPC."""
    socket = munge_socket()
    run("munge", "-n", *(["--socket", socket] if socket else []))
    return f"munged answers on {socket or 'its default socket'}"
