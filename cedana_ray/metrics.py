"""Metrics of checkpoints, restores, migrations and failures, through ``ray.util.metrics``.

Ray's metrics agent on each node serves them to Prometheus beside Ray's own, with Ray's
labels (``NodeAddress``, ``SessionName``...) and its ``ray_`` prefix: the counter
``cedana_checkpoints`` is scraped as ``ray_cedana_checkpoints_total`` (docs/observability.md
lists every series).

Only the record of a cluster counts (the coordinator's :class:`~cedana_ray.records.Records`,
which calls the functions here), so each event is counted once, whichever node it happened
on: a node's own registry (``authoritative=False``) counts nothing. Outside a Ray actor (local
mode) every function is a no-op, and nothing of Ray is imported for metrics.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec

from .errors import CheckpointNotFound
from .models import LIVE_STATES, DumpResult, EventKind, Job

if TYPE_CHECKING:
    from ray.util.metrics import Counter, Gauge, Histogram

    from .records import Records

AGE_PERIOD_S = 2.0  # how often each job's checkpoint age is refreshed
# seconds: a small process dumps in tens of milliseconds, a GPU job with a large memory in minutes
DURATION_BUCKETS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0]
STALL_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]
MOVED = {EventKind.migrated, EventKind.drained}
log = logging.getLogger("cedana_ray.metrics")
P = ParamSpec("P")


@dataclass(frozen=True)
class Series:
    """Every series cedana-ray exports, as ``ray.util.metrics`` objects."""

    checkpoints: Counter
    checkpoint_seconds: Histogram
    stall_seconds: Histogram
    stored_bytes: Counter
    restores: Counter
    restored_bytes: Counter
    migrations: Counter
    migration_seconds: Histogram
    downtime_seconds: Histogram
    failures: Counter
    checkpoint_age: Gauge


def _make() -> Series:
    from ray.util.metrics import Counter, Gauge, Histogram

    where = ("plugin", "node")
    return Series(
        checkpoints=Counter("cedana_checkpoints", "Checkpoints stored", where),
        checkpoint_seconds=Histogram(
            "cedana_checkpoint_duration_seconds", "Time a dump took until stored", DURATION_BUCKETS, where
        ),
        stall_seconds=Histogram(
            "cedana_checkpoint_stall_seconds", "Time a checkpoint held the workload stopped", STALL_BUCKETS, where
        ),
        stored_bytes=Counter("cedana_checkpoint_bytes", "Bytes of checkpoints stored (compressed)", where),
        restores=Counter("cedana_restores", "Jobs restored", where),
        restored_bytes=Counter("cedana_restore_bytes", "Bytes of checkpoints read back by restores", where),
        migrations=Counter("cedana_migrations", "Jobs moved to another node", ("plugin", "kind", "source", "target")),
        migration_seconds=Histogram(
            "cedana_migration_duration_seconds",
            "Time a migration took, from the migrate call to its answer",
            DURATION_BUCKETS,
            ("plugin", "kind"),
        ),
        downtime_seconds=Histogram(
            "cedana_migration_downtime_seconds",
            "Time a migrated job ran nowhere: from its freeze (or stop) to its resume on the target",
            DURATION_BUCKETS,
            ("plugin", "kind"),
        ),
        failures=Counter("cedana_failures", "Dumps, restores, migrations and drains that failed", ("stage", "error")),
        checkpoint_age=Gauge(
            "cedana_last_checkpoint_age_seconds", "Age of a live job's last checkpoint", ("jid", "plugin")
        ),
    )


_series: Series | None = None
_ages_started = False
_lock = threading.Lock()


def _in_ray_actor() -> bool:
    """Whether this process is a Ray actor's worker; Ray is never imported to find out."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def _series_of(records: Records) -> Series | None:
    """The series, made on first use, when ``records`` is the cluster's record; None otherwise."""
    global _series
    if not records.authoritative or not _in_ray_actor():
        return None
    with _lock:
        if _series is None:
            _series = _make()
        return _series


def _quietly(record: Callable[P, None]) -> Callable[P, None]:
    """A metric never fails what it counts: an error recording one is logged, not raised."""

    @functools.wraps(record)
    def recording(*args: P.args, **kwargs: P.kwargs) -> None:
        try:
            record(*args, **kwargs)
        except Exception:
            log.exception("recording metrics (%s) failed", record.__name__)

    return recording


def stall_s(result: DumpResult) -> float | None:
    """How long dump ``result`` held the workload stopped: its handler's own time (CRIU's
    dump, or the runtime's checkpoint), which freezes the tree and lets it go. A stage's time
    is recorded as it returns, so the innermost one, the handler, comes first."""
    return next(iter(result.timings.values()), None)


def _plugin(records: Records, jid: str) -> str:
    job = records.existing(jid)
    return job.type if job else ""


def _stored_size(records: Records, checkpoint: str) -> int:
    """The stored size of a catalogued checkpoint; 0 for one the catalog lacks (a bare path)."""
    try:
        return records.registry.checkpoint(checkpoint).size_bytes
    except CheckpointNotFound:
        return 0


@_quietly
def checkpointed(records: Records, result: DumpResult, node: str) -> None:
    """Count dump ``result`` of a job on ``node``: its duration, stall and size."""
    if (series := _series_of(records)) is None:
        return
    tags = {"plugin": _plugin(records, result.jid), "node": node}
    series.checkpoints.inc(1, tags)
    series.checkpoint_seconds.observe(result.duration_s, tags)
    if (stall := stall_s(result)) is not None:
        series.stall_seconds.observe(stall, tags)
    if result.size_bytes > 0:
        series.stored_bytes.inc(result.size_bytes, tags)


@_quietly
def restored(records: Records, job: Job, checkpoint: str, node: str) -> None:
    """Count ``job``, restored from ``checkpoint`` on ``node``, and the bytes it read back."""
    if (series := _series_of(records)) is None:
        return
    tags = {"plugin": job.type, "node": node}
    series.restores.inc(1, tags)
    if size := _stored_size(records, checkpoint):
        series.restored_bytes.inc(size, tags)


@_quietly
def failed(records: Records, what: str, exc: BaseException) -> None:
    """Count a ``what`` (dump, restore, migration, drain) that failed with ``exc``."""
    if (series := _series_of(records)) is not None:
        series.failures.inc(1, {"stage": what, "error": type(exc).__name__})


@_quietly
def noted(records: Records, jid: str, kind: EventKind, detail: dict[str, Any]) -> None:
    """Count what only an event of job ``jid`` tells: a migration or a drain, and its duration."""
    if kind not in MOVED or (series := _series_of(records)) is None:
        return
    plugin = _plugin(records, jid)
    moved = {"plugin": plugin, "kind": kind.value, "source": detail["source"], "target": detail["target"]}
    series.migrations.inc(1, moved)
    series.migration_seconds.observe(detail["duration_s"], {"plugin": plugin, "kind": kind.value})
    if "downtime_s" in detail:  # not in events from before it was measured
        series.downtime_seconds.observe(detail["downtime_s"], {"plugin": plugin, "kind": kind.value})


@_quietly
def watch(records: Records) -> None:
    """Keep each live job's checkpoint age current, from ``records``, while this process lives
    (once per process, and only for the cluster's record)."""
    global _ages_started
    if (series := _series_of(records)) is None:
        return
    with _lock:
        if _ages_started:
            return
        _ages_started = True
    ages = _Ages(records, series.checkpoint_age)
    threading.Thread(target=ages.run, name="checkpoint-ages", daemon=True).start()


class _Ages:
    """The age of each live job's last checkpoint, refreshed every AGE_PERIOD_S: an age only
    grows between checkpoints, so it is set again and again rather than when something happens."""

    def __init__(self, records: Records, gauge: Gauge) -> None:
        self.records = records
        self.gauge = gauge
        self.created: dict[str, float] = {}  # checkpoint -> its creation (unix time): the catalog is read once
        self.shown: dict[str, dict[str, str]] = {}  # jid -> the tags of its series

    def run(self) -> None:
        while True:
            try:
                self.refresh()
            except Exception:  # a bad refresh must not end the refreshing
                log.exception("refreshing checkpoint ages failed")
            time.sleep(AGE_PERIOD_S)

    def refresh(self) -> None:
        now = time.time()
        last = [(j, c) for j in self.records.registry.jobs() if j.state in LIVE_STATES and (c := j.last_checkpoint)]
        kept = {ckpt for _, ckpt in last}
        self.created = {c: t for c, t in self.created.items() if c in kept}  # those of live jobs only
        ages = {}
        for job, ckpt in last:
            if (made := self._created(ckpt)) is not None:
                ages[job.jid] = ({"jid": job.jid, "plugin": job.type}, max(0.0, now - made))
        for jid, tags in self.shown.items():
            if jid not in ages:  # over, or checkpointed and stopped: NaN, which Ray's exporter drops
                self.gauge.set(math.nan, tags)
        for tags, age in ages.values():
            self.gauge.set(age, tags)
        self.shown = {jid: tags for jid, (tags, _) in ages.items()}

    def _created(self, checkpoint: str) -> float | None:
        if checkpoint not in self.created:
            try:
                self.created[checkpoint] = self.records.registry.checkpoint(checkpoint).created.timestamp()
            except CheckpointNotFound:
                return None
        return self.created[checkpoint]
