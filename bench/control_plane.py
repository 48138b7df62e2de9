"""The Ray control plane's costs: CLI round trips, migration steps, coordinator load.

On a throwaway two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``,
stopped by this script), in a throwaway ``CEDANA_RAY_HOME``:

* CLI round trip: ``cedana-ray ps`` and a small leave-running ``dump job`` through the
  cluster, against the same commands with ``--local`` on a job of the local engine; and
  ``cedana-ray nodes`` against Ray's own ``ray status`` on the same cluster;
* migration of a process holding SIZE of memory, split into dump (freeze + checkpoint
  on the source) and restore (transfer through the store + restore on the target);
* coordinator load: N registered jobs (``sleep``), each with a periodic policy, then
  the time of ``jobs()`` (what ``ps`` costs) and of one monitor pass;
* reservations (``run --cpus``): a run and a migration of a small job holding 0.25 CPU
  against the same without, and Ray's own placement group of that bundle (create, wait,
  remove) that a reservation is.

Run as root::

    .venv/bin/python bench/control_plane.py [--sizes 256M,1G] [--jobs 200] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import ray
from cedana_ray.actors import launcher
from ray.cluster_utils import Cluster as RayCluster
from rich.console import Console
from rich.table import Table

from cedana_ray.cluster import Cluster
from cedana_ray.config import Paths
from cedana_ray.engine import Engine
from cedana_ray.models import Compression
from cedana_ray.requests import DumpRequest, Resources, RunRequest

MiB = 1 << 20
HOLD = "import os, sys, time; b = bytearray(os.urandom(int(sys.argv[1]))); print('ready', flush=True); time.sleep(1e6)"
NODE = {"num_cpus": 1, "object_store_memory": 100 * MiB}


def timed(fn: Callable[[], object], repeat: int = 3) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "cedana_ray.cli", *args], check=True, capture_output=True)


def ray_status(address: str) -> None:
    ray_cli = Path(sys.executable).with_name("ray")
    subprocess.run([ray_cli, "status", "--address", address], check=True, capture_output=True)


def size_of(text: str) -> int:
    return int(float(text[:-1]) * {"M": MiB, "G": 1 << 30}[text[-1]])


def wait_ready(read: Callable[[], bytes]) -> None:
    deadline = time.monotonic() + 120
    while b"ready" not in read():
        if time.monotonic() > deadline:
            raise TimeoutError("workload not ready")
        time.sleep(0.1)


def round_trips(client: Cluster, home: Path, address: str) -> dict[str, float]:
    """The same commands through the cluster and with --local (same home: cluster.json is there)."""
    client.run("process", RunRequest(cmd=["sleep", "1e6"], jid="rt-cluster"))
    local = Engine(Paths(home))
    local.run("process", RunRequest(cmd=["sleep", "1e6"], jid="rt-local"))
    result = {
        "ps cluster": timed(lambda: cli("ps", "--json")),
        "dump cluster": timed(lambda: cli("dump", "job", "rt-cluster", "--leave-running", "--json")),
        "ps --local": timed(lambda: cli("ps", "--local", "--json")),
        "dump --local": timed(lambda: cli("dump", "job", "rt-local", "--leave-running", "--local", "--json")),
        "nodes cluster": timed(lambda: cli("nodes", "--json")),
        "ray status": timed(lambda: ray_status(address)),
    }
    local.kill("rt-local")
    client.kill("rt-cluster")
    return result


def migrations(client: Cluster, sizes: list[str]) -> list[dict[str, object]]:
    rows = []
    for text in sizes:
        jid = f"mig-{text}"
        job = client.run("process", RunRequest(cmd=[sys.executable, "-c", HOLD, str(size_of(text))], jid=jid))
        wait_ready(lambda jid=jid: client.read_log(jid))  # type: ignore[misc]
        target = next(n.node for n in client.nodes() if n.node != job.node)
        for compression in (Compression.none, Compression.lz4):
            moved = client.migrate(jid, target, DumpRequest(compression=compression))
            rows.append(
                {
                    "size": text,
                    "compression": compression.value,
                    "dump_s": moved.dump_s,
                    "restore_s": moved.restore_s,
                    "total_s": moved.duration_s,
                }
            )
            target = moved.source
        client.kill(jid)
    return rows


def coordinator_load(client: Cluster, n: int) -> dict[str, float]:
    start = time.perf_counter()
    for i in range(n):
        client.run("process", RunRequest(cmd=["sleep", "1e6"], jid=f"load-{i}", checkpoint_every=3600, keep=2))
    registered = time.perf_counter() - start
    result = {
        "jobs": n,
        "run per job s": registered / n,
        "jobs() s": timed(client.jobs),
        "ps CLI s": timed(lambda: cli("ps", "--json")),
    }
    for i in range(n):
        client.kill(f"load-{i}")
    return result


def reservations(client: Cluster) -> dict[str, float]:
    """What holding Ray resources adds to a run and to a migration, and Ray's own cost for it."""
    from ray.util import placement_group, remove_placement_group
    from ray.util.placement_group import NODE_ID_LABEL_KEY

    held = Resources(cpus=0.25)  # three runs of it, and one to migrate, fit beside each other
    node = client.nodes()[0].node

    def raw_group() -> None:
        group = placement_group([held.ray()], bundle_label_selector=[{NODE_ID_LABEL_KEY: node}])
        group.wait(30)
        remove_placement_group(group)

    def run(jid: str, resources: Resources) -> None:
        client.run("process", RunRequest(cmd=["sleep", "1e6"], jid=jid, node=node, resources=resources))

    result = {
        "run s": timed(lambda: run(f"plain-{time.monotonic_ns()}", Resources())),
        "run --cpus s": timed(lambda: run(f"held-{time.monotonic_ns()}", held)),
        "ray placement group s": timed(raw_group),
    }
    for resources, name in ((Resources(), "migrate s"), (held, "migrate --cpus s")):
        jid = f"move-{name.split()[1]}"
        run(jid, resources)
        result[name] = timed(lambda jid=jid: client.migrate(jid, other_node(client, client.job(jid).node)))  # type: ignore[misc]
    for job in client.jobs():
        if job.state.value == "running":
            client.kill(job.jid)
    return result


def other_node(client: Cluster, node: str) -> str:
    return next(n.node for n in client.nodes() if n.node != node)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="256M,1G")
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="cr-bench-"))
    os.environ.update(CEDANA_RAY_HOME=str(home), RAY_AUTH_MODE="disabled")
    os.environ.pop("RAY_ADDRESS", None)
    cluster = RayCluster(initialize_head=True, head_node_args=NODE)
    cluster.add_node(**NODE)
    try:
        launcher.up(address=cluster.address)
        client = Cluster(cluster.address)
        report = {
            "round_trips": round_trips(client, home, cluster.address),
            "migrations": migrations(client, args.sizes.split(",")),
            "coordinator": coordinator_load(client, args.jobs),
            "reservations": reservations(client),
        }
    finally:
        ray.shutdown()
        cluster.shutdown()
    show(report, args.json)


def show(report: dict, as_json: bool) -> None:  # type: ignore[type-arg]
    if as_json:
        print(json.dumps(report, indent=2))
        return
    console = Console()
    rt = report["round_trips"]
    t = Table("command", "cluster s", "--local s", "ratio", title="CLI round trip (median of 3)")
    for cmd in ("ps", "dump"):
        c, lo = rt[f"{cmd} cluster"], rt[f"{cmd} --local"]
        t.add_row(cmd, f"{c:.3f}", f"{lo:.3f}", f"{c / lo:.2f}x")
    console.print(t)
    nodes, status = rt["nodes cluster"], rt["ray status"]
    console.print(f"nodes {nodes:.3f} s, ray status {status:.3f} s: {nodes / status:.2f}x")
    t = Table("size", "compression", "dump s", "restore s", "total s", title="migration")
    for r in report["migrations"]:
        t.add_row(r["size"], r["compression"], f"{r['dump_s']:.2f}", f"{r['restore_s']:.2f}", f"{r['total_s']:.2f}")
    console.print(t)
    console.print({k: round(v, 4) for k, v in report["coordinator"].items()})
    res = report["reservations"]
    extra = res["run --cpus s"] - res["run s"]
    console.print(
        f"run --cpus {res['run --cpus s']:.3f} s vs run {res['run s']:.3f} s (+{extra:.3f} s; "
        f"Ray's placement group alone {res['ray placement group s']:.3f} s); migrate --cpus "
        f"{res['migrate --cpus s']:.3f} s vs migrate {res['migrate s']:.3f} s: "
        f"{res['migrate --cpus s'] / res['migrate s']:.2f}x"
    )


if __name__ == "__main__":
    main()
