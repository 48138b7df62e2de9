"""What ``ps`` lists, read as the JSON it is kept as, without building a model: importing
pydantic alone takes longer than ``ps`` may.

It answers as the engine would wherever the engine would change nothing by looking: from
this machine's registry, or from the coordinator through its gateway. Where the engine would
record something first (a live job whose process is gone ends; a dump's mark is put right,
see :mod:`cedana_ray.recovery`), where GPUs may be in use here (the gpu plugin asks NVML), or
where the cluster is reached through Ray, it answers None and ``ps`` asks the engine.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from .cluster_state import address
from .config import Paths, paths
from .errors import CedanaError
from .proctree import alive

LIVE = ("running", "frozen")  # the states of a job whose workload runs (models.LIVE_STATES)
ROW = ("jid", "type", "state", "pid", "node", "last_checkpoint", "exit_code")  # `ps --json`, with "gpus"
FIELDS = {*ROW, "created", "details"}  # what is read here of a Job's JSON
DUMP_MARK = "dump"  # the detail a dump sets while it runs (recovery.MARK)
NVIDIA_DRIVER = Path("/proc/driver/nvidia")  # there while NVIDIA's kernel driver is loaded, in containers too

Job = dict[str, Any]  # a Job's JSON
GPUs = dict[str, list[int]]  # the NVML indexes of the GPUs each job uses


def listed(local: bool) -> tuple[list[Job], GPUs] | None:
    """The jobs and their GPUs, as the engine of this machine (``local``) or of the cluster
    known here would list them, or None where it must be asked."""
    addr = None if local else address()
    if addr is None:
        return _local(paths())
    return _through_gateway(addr)


def row(job: Job) -> dict[str, Any]:
    """The keys of ``ps --json`` (but "gpus")."""
    return {k: job[k] for k in ROW}


def gpus_of(jobs: list[Job], ask: Callable[[], list[dict[str, Any]]]) -> GPUs:
    """The GPUs each of ``jobs`` uses, from ``ask`` (the gpu query); none where no job is
    live, or no node has a driver or the gpu plugin."""
    if not _any_live(jobs):
        return {}
    try:
        found = ask()
    except CedanaError:
        return {}
    used: GPUs = {}
    for gpu in found:
        for jid in gpu["jobs"]:
            used.setdefault(jid, []).append(gpu["index"])
    return used


def _local(home: Paths) -> tuple[list[Job], GPUs] | None:
    if not home.db.exists():
        return [], {}
    try:
        conn = sqlite3.connect(f"file:{home.db}?mode=ro", uri=True, timeout=30)
        try:
            jobs = [json.loads(data) for (data,) in conn.execute("SELECT data FROM jobs")]
        finally:
            conn.close()
    except (sqlite3.Error, ValueError):  # the engine's way says what is wrong
        return None
    if any(_for_the_engine(j) for j in jobs) or (_any_live(jobs) and NVIDIA_DRIVER.exists()):
        return None
    return sorted(jobs, key=lambda j: datetime.fromisoformat(j["created"])), {}


def _any_live(jobs: list[Job]) -> bool:
    return any(j["state"] in LIVE for j in jobs)


def _for_the_engine(job: Job) -> bool:
    """Whether the engine must list ``job``: a record this version does not write (the
    models read it), or one it would change by looking (a dump's mark, a process gone)."""
    if not job.keys() >= FIELDS or job["details"].get(DUMP_MARK) is not None:
        return True
    return job["state"] in LIVE and not alive(job["pid"], job["details"].get("started"))


def _through_gateway(addr: str) -> tuple[list[Job], GPUs] | None:
    from . import wire  # here: its http.client costs a local `ps` a tenth of its time

    found = wire.endpoint(addr)
    if found is None:
        return None

    def ask(verb: str, **args: Any) -> Any:
        return wire.call(*found, verb, json.dumps({"args": args, "progress": False}).encode())

    try:
        jobs = ask("jobs")
        return jobs, gpus_of(jobs, lambda: ask("query", jtype="gpu"))
    except wire.NoGateway:  # none there (any more): the engine's way, which says what is wrong
        return None
