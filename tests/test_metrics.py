"""Metrics (cedana_ray/metrics.py) as Prometheus scrapes them from Ray's metrics agents, on a
real two-node Ray cluster (the nodes and their cleanup as in tests/test_cluster.py), after a
real dump, a failed one and a migration."""

from __future__ import annotations

import math
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from ray.cluster_utils import Cluster as RayCluster
from servers import free_ports
from test_cluster import NODE_ARGS, cedana_cluster, other, run_counter
from test_process_criu import wait_for

from cedana_ray.cluster import Cluster
from cedana_ray.errors import CedanaError
from cedana_ray.metrics import DURATION_BUCKETS, STALL_BUCKETS
from cedana_ray.models import EventKind
from cedana_ray.requests import DumpRequest, MigrateRequest

pytestmark = [pytest.mark.criu, pytest.mark.ray, pytest.mark.timeout(150)]
REPORT_INTERVAL_MS = 1000  # how often Ray's workers report to the metrics agent (Ray's default: 10 s)
TESTS = Path(__file__).parent
RAY_LABELS = {"NodeAddress", "SessionName", "Component", "Version", "WorkerId"}


@dataclass
class Exported:
    """A cluster whose nodes serve their metrics at ``endpoints`` (head first)."""

    cluster: RayCluster
    endpoints: list[str]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exported]:
    ports = free_ports(2)
    nodes = [{**NODE_ARGS, "metrics_export_port": port} for port in ports]
    env = {"RAY_metrics_report_interval_ms": str(REPORT_INTERVAL_MS)}  # every Ray process reads it
    with cedana_cluster(tmp_path_factory.mktemp("metrics-home"), nodes, env) as cluster:
        yield Exported(cluster, [f"http://127.0.0.1:{p}/metrics" for p in ports])


def scrape(endpoints: list[str]) -> list[Sample]:
    """cedana-ray's samples, as Prometheus reads them from each node's endpoint."""
    samples = []
    for url in endpoints:
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            samples += [s for s in family.samples if s.name.startswith("ray_cedana_")]
    return samples


def total(samples: list[Sample], name: str, **labels: str) -> float | None:
    """The sum of the samples of ``name`` with ``labels`` (Ray's own aside); None if there is none."""
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    return sum(found) if found else None


def buckets(samples: list[Sample], histogram: str) -> dict[float, float]:
    """The cumulative counts of ``histogram``, by upper bound (its sum is Ray's estimate from
    its buckets' midpoints, so the buckets are what can be checked exactly)."""
    found = [s for s in samples if s.name == f"{histogram}_bucket"]
    return {float(le): total(found, f"{histogram}_bucket", le=le) or 0 for le in {s.labels["le"] for s in found}}


def counted(values: list[float], bounds: list[float]) -> dict[float, float]:
    """The cumulative counts a histogram with upper bounds ``bounds`` has of ``values``."""
    return {le: sum(v <= le for v in values) for le in [*bounds, math.inf]}


def test_a_dump_a_failure_and_a_migration_are_scraped_with_their_values(exported: Exported) -> None:
    client = Cluster(exported.cluster.address)
    jid = run_counter(client, "m-counter")
    source = client.job(jid).node
    with pytest.raises(CedanaError) as refused:
        client.dump(jid, DumpRequest(leave_running=True, storage="nowhere://x"))
    dumped = client.dump(jid, DumpRequest(leave_running=True))
    target = other(source)
    moved = client.migrate(jid, target, MigrateRequest(through_store=False))  # as between machines
    sizes = {c.checkpoint: c.size_bytes for c in client.checkpoints(jid)}
    assert set(sizes) == {dumped.checkpoint, moved.checkpoint}

    start = time.monotonic()
    samples = wait_for(lambda: _when_reported(exported.endpoints), 30, "the series on the head node")
    print(f"scraped {time.monotonic() - start:.1f} s after the migration")
    assert all(s.labels.keys() >= RAY_LABELS for s in samples)  # Ray's node labels came along
    assert scrape(exported.endpoints[1:]) == []  # the coordinator counts, on the head node, once
    assert total(samples, "ray_cedana_checkpoints_total", plugin="process") == 2  # the dump, and the migration's
    assert total(samples, "ray_cedana_checkpoints_total", node=source) == 1  # the dump
    assert total(samples, "ray_cedana_checkpoints_total", node=target) == 1  # the migration's, kept from there
    assert total(samples, "ray_cedana_checkpoint_bytes_total", plugin="process") == sum(sizes.values())
    durations = [e.detail["duration_s"] for e in client.events(jid) if e.kind is EventKind.checkpointed]
    assert buckets(samples, "ray_cedana_checkpoint_duration_seconds") == counted(durations, DURATION_BUCKETS)
    stalls = buckets(samples, "ray_cedana_checkpoint_stall_seconds")
    # the dump stalled the job; the migration's checkpoint, kept once the job ran again, did not
    assert stalls[math.inf] == 1 and all(stalls[le] >= n for le, n in counted(durations[:1], STALL_BUCKETS).items())
    assert total(samples, "ray_cedana_restores_total", plugin="process", node=target) == 1
    # nothing read back from the store: the images came straight from the source
    assert total(samples, "ray_cedana_restore_bytes_total", node=target) is None
    moves = {"plugin": "process", "kind": "migrated", "source": source, "target": target}
    assert total(samples, "ray_cedana_migrations_total", **moves) == 1
    assert buckets(samples, "ray_cedana_migration_duration_seconds") == counted([moved.duration_s], DURATION_BUCKETS)
    assert buckets(samples, "ray_cedana_migration_downtime_seconds") == counted([moved.downtime_s], DURATION_BUCKETS)
    error = type(refused.value).__name__
    assert total(samples, "ray_cedana_failures_total", stage="dump", error=error) == 1

    made = next(c.created for c in client.checkpoints(jid) if c.checkpoint == moved.checkpoint)
    age = total(samples, "ray_cedana_last_checkpoint_age_seconds", jid=jid, plugin="process")
    assert age is not None and 0 <= age <= time.time() - made.timestamp() + 1

    client.kill(jid)  # no live job, no age: the series goes rather than growing stale
    gone = lambda: total(scrape(exported.endpoints), "ray_cedana_last_checkpoint_age_seconds", jid=jid) is None  # noqa: E731
    wait_for(gone, 20, "the killed job's age series to go")


LOCAL = """
import sys
from cedana_ray.engine import Engine
from cedana_ray.requests import DumpRequest, RestoreRequest, RunRequest
from test_process_criu import COUNTER, wait_for

engine = Engine()  # CEDANA_RAY_HOME: the test's
engine.run("process", RunRequest(cmd=COUNTER, jid="local"))
wait_for(lambda: "count=1" in open(engine.log_path("local")).read(), what="the count")
engine.dump("local", DumpRequest())
engine.restore(RestoreRequest(), jid="local")
engine.kill("local")
print(sorted(m for m in sys.modules if m == "ray" or m.startswith("ray.")))
"""


def test_local_mode_records_without_importing_ray(home: Path) -> None:
    """Without a cluster, the record keeper's metrics are a no-op that never imports Ray."""
    done = subprocess.run([sys.executable, "-c", LOCAL], capture_output=True, text=True, cwd=TESTS, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def _when_reported(endpoints: list[str]) -> list[Sample] | None:
    """The samples, once everything the test did has been reported (Ray reports every interval)."""
    samples = scrape(endpoints)
    done = total(samples, "ray_cedana_migrations_total") and total(samples, "ray_cedana_last_checkpoint_age_seconds")
    return samples if done and total(samples, "ray_cedana_failures_total") else None
