"""A coordinator with many jobs: N small jobs (``sleep``) spread over R raylets, each with a
checkpoint policy, on a throwaway Ray cluster on this machine (``ray.cluster_utils``, stopped
by this script) in a throwaway ``CEDANA_RAY_HOME``.

Reports, over a watch window after the jobs started:
* the coordinator's CPU share (of one core) and memory (RSS), sampled every second;
* ``jobs()`` from a client, and ``cedana-ray ps`` as typed (through the gateway), with what
  ``ps`` is made of: the gateway's ``jobs()`` and ``query("gpu")`` from this process, and
  the CLI's own start (``cedana-ray --help``) and its own ``ps`` with no cluster and no jobs;
* the policies: checkpoints due in the window against those taken, and the late ones (a
  gap between two checkpoints of a job longer than 1.5 periods).

Run as root::

    .venv/bin/python bench/scale.py [--jobs 500] [--raylets 4] [--period 120] [--window 300] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import ray
from cedana_ray.actors import launcher
from ray.cluster_utils import Cluster as RayCluster

from cedana_ray.backend import Backend
from cedana_ray.cluster import Cluster, through_gateway
from cedana_ray.errors import CedanaError
from cedana_ray.models import EventKind
from cedana_ray.requests import RunRequest

MiB = 1 << 20
CLI = str(Path(sys.executable).with_name("cedana-ray"))


def coordinator() -> psutil.Process:
    found = [p for p in psutil.process_iter(["cmdline"]) if "ray::Coordinator" in " ".join(p.info["cmdline"] or [])]
    if not found:
        raise RuntimeError("no coordinator process (ray::Coordinator) found")
    return found[0]


def timed(fn: object, repeat: int = 5) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()  # type: ignore[operator]
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def gpus(backend: Backend) -> None:
    """``query gpu`` as ``ps`` asks it: refused where no node has a GPU, which ps ignores."""
    with contextlib.suppress(CedanaError):
        backend.query("gpu")


def ps() -> None:
    subprocess.run([CLI, "ps", "--json"], capture_output=True, check=True, timeout=120)


def ps_alone() -> None:
    """``ps --local --json`` in an empty home: the CLI's imports and its own work, no cluster."""
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "CEDANA_RAY_HOME": home}
        subprocess.run([CLI, "ps", "--local", "--json"], capture_output=True, check=True, timeout=120, env=env)


def watch(proc: psutil.Process, window: float) -> dict[str, float]:
    """The coordinator's CPU share and RSS, each second over ``window`` seconds."""
    cpu, rss = [], []
    proc.cpu_percent()
    end = time.monotonic() + window
    while time.monotonic() < end:
        time.sleep(1)
        cpu.append(proc.cpu_percent())
        rss.append(proc.memory_info().rss)
    return {
        "coordinator cpu % (median)": statistics.median(cpu),
        "coordinator cpu % (max)": max(cpu),
        "coordinator rss MiB (max)": max(rss) / MiB,
    }


def policies(client: Cluster, jids: list[str], period: float, start: float, end: float) -> dict[str, int]:
    """Checkpoints due in [start, end] (one per period since each job's own start) against those
    taken, and the late ones."""
    due = taken = late = 0
    for jid in jids:
        events = client.events(jid)
        began = events[0].at.timestamp()
        times = [e.at.timestamp() for e in events if e.kind is EventKind.checkpointed]
        due += int((end - max(began, start)) // period)
        taken += sum(1 for t in times if start <= t <= end)
        late += sum(1 for a, b in zip([began, *times], times, strict=False) if b - a > 1.5 * period)
    return {"checkpoints due": due, "checkpoints taken": taken, "late": late}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--raylets", type=int, default=4)
    parser.add_argument("--period", type=float, default=120, help="each job's checkpoint period, seconds")
    parser.add_argument("--window", type=float, default=300, help="seconds to watch after the jobs started")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="cr-scale-"))
    os.environ.update(CEDANA_RAY_HOME=str(home), RAY_AUTH_MODE="disabled")
    os.environ.pop("RAY_ADDRESS", None)
    node = {"num_cpus": 1, "object_store_memory": 100 * MiB}
    cluster = RayCluster(initialize_head=True, head_node_args=node)
    for _ in range(args.raylets - 1):
        cluster.add_node(**node)
    try:
        launcher.up(address=cluster.address)
        client = Cluster(cluster.address)
        started = time.perf_counter()
        jids = [
            client.run(
                "process", RunRequest(cmd=["sleep", "1e6"], jid=f"s-{i}", checkpoint_every=args.period, keep=1)
            ).jid
            for i in range(args.jobs)
        ]
        report: dict[str, float | int] = {"jobs": args.jobs, "raylets": args.raylets, "period s": args.period}
        report["run per job s"] = (time.perf_counter() - started) / args.jobs
        report["nodes used"] = len({j.node for j in client.jobs()})
        window_start = time.time()
        report |= watch(coordinator(), args.window)
        report["jobs() s"] = timed(client.jobs)
        report["ps (CLI, gateway) s"] = timed(ps)
        gateway = through_gateway(cluster.address)
        assert gateway is not None, "up recorded no gateway"
        report["  jobs() via the gateway s"] = timed(gateway.jobs)
        report["  query gpu via the gateway s"] = timed(lambda: gpus(gateway))
        report["  CLI start (--help) s"] = timed(lambda: subprocess.run([CLI, "--help"], capture_output=True))
        report["  ps --local, no jobs (the CLI's own ps) s"] = timed(ps_alone)
        report |= policies(client, jids, args.period, window_start, time.time())
        for jid in jids:
            client.kill(jid)
    finally:
        ray.shutdown()
        cluster.shutdown()
    if args.json:
        print(json.dumps(report, indent=1))
        return
    for key, value in report.items():
        print(f"{key:32} {value:.3f}" if isinstance(value, float) else f"{key:32} {value}")


if __name__ == "__main__":
    main()
