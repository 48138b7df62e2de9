"""Migration downtime: cedana-ray's ``migrate`` against raw CRIU's dump plus restore.

On a throwaway two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``,
stopped by this script), in a throwaway ``CEDANA_RAY_HOME`` with a ``file://`` store, for
each size a Python workload holding that much resident memory (bench/dump_restore.py's:
half incompressible, half zeros) is moved back and forth:

* ``raw``: ``criu dump`` then ``criu restore --restore-detached`` of the same workload, by
  hand on this machine (bench/dump_restore.py's ``bench_raw``): the floor, with no transfer;
* ``direct``: ``migrate --direct``, the images sent straight from node to node, kept in the
  store once the job runs again (the default between machines);
* ``through store``: ``migrate --through-store``, dumped into the store and restored from it
  (what ``migrate`` does by default here, both nodes on one machine with a local, uncompressed,
  unencrypted store, where it copies nothing).

Downtime is ``migrate``'s own ``downtime_s``: from the freeze on the source to the resume on
the target. Each ratio is the median of each run's own ratio to the raw run of the same
iteration. Run as root::

    .venv/bin/python bench/migration.py [--sizes 256M,1G] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import ray
from cedana_ray.actors import launcher
from dump_restore import WORKLOAD, Procs, bench_home, bench_raw, human, parse_size, print_first_touch, room_for
from ray.cluster_utils import Cluster as RayCluster
from rich.console import Console
from rich.table import Table

from cedana_ray.cluster import Cluster
from cedana_ray.requests import MigrateRequest, RunRequest

MiB = 1 << 20
NODE = {"num_cpus": 1, "object_store_memory": 100 * MiB}
ROUTES = {"direct": MigrateRequest(through_store=False), "through store": MigrateRequest(through_store=True)}
err = Console(stderr=True)


def ready(client: Cluster, jid: str, size: int) -> None:
    deadline = time.monotonic() + 60 + size / (50 * MiB)
    while b"READY" not in client.read_log(jid):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{jid} did not fill its memory in time")
        time.sleep(0.1)


def bench_size(client: Cluster, size: int, repeat: int, base: Path, procs: Procs) -> list[dict[str, object]]:
    jid = f"mig-{size // MiB}m"
    job = client.run("process", RunRequest(cmd=[sys.executable, "-c", WORKLOAD, str(size)], jid=jid))
    ready(client, jid, size)
    node = job.node
    rows: list[dict[str, object]] = []
    try:
        for run in range(1, repeat + 1):
            print_first_touch()
            raw = bench_raw(size, run, base, procs)
            rows.append({"size": size, "route": "raw", "run": run, "downtime_s": raw.dump_s + raw.restore_s})
            err.print(f"[dim]{human(size)} #{run} raw: dump {raw.dump_s:.2f}s + restore {raw.restore_s:.2f}s[/]")
            for route, request in ROUTES.items():
                target = next(n.node for n in client.nodes() if n.node != node)
                moved = client.migrate(jid, target, request)
                node = moved.target
                row = {"size": size, "route": route, "run": run, "downtime_s": moved.downtime_s}
                rows.append({**row, "duration_s": moved.duration_s, "dump_s": moved.dump_s, "via": moved.route})
                err.print(
                    f"[dim]  {route}: down {moved.downtime_s:.2f}s (dump {moved.dump_s:.2f}s),"
                    f" all {moved.duration_s:.2f}s[/]"
                )
    finally:
        client.kill(jid)
    return rows


def summarize(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    raw = {(r["size"], r["run"]): float(r["downtime_s"]) for r in rows if r["route"] == "raw"}  # type: ignore[arg-type]
    out = []
    for size in sorted({r["size"] for r in rows}):  # type: ignore[type-var]
        for route in ("raw", *ROUTES):
            mine = [r for r in rows if r["size"] == size and r["route"] == route]
            ratios = [float(r["downtime_s"]) / raw[(size, r["run"])] for r in mine]  # type: ignore[arg-type]
            out.append(
                {
                    "size": size,
                    "route": route,
                    "runs": len(mine),
                    "downtime_s": statistics.median(float(r["downtime_s"]) for r in mine),  # type: ignore[arg-type]
                    "duration_s": statistics.median(float(r.get("duration_s", r["downtime_s"])) for r in mine),  # type: ignore[arg-type]
                    "x_raw": statistics.median(ratios),
                }
            )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="256M,1G")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    base = bench_home(parser, "cr-bench-migration-")
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.pop("RAY_ADDRESS", None)
    procs = Procs()
    cluster = RayCluster(initialize_head=True, head_node_args=NODE)
    cluster.add_node(**NODE)
    rows: list[dict[str, object]] = []
    try:
        launcher.up(address=cluster.address)
        client = Cluster(cluster.address)
        for size in sizes:
            if why := room_for(2 * size, base):
                err.print(f"[yellow]{human(size)} skipped: {why}[/]")
                continue
            rows += bench_size(client, size, args.repeat, base, procs)
    finally:
        procs.kill_all()
        ray.shutdown()
        cluster.shutdown()
    summary = summarize(rows)
    if args.json:
        print(json.dumps({"runs": rows, "summary": summary}, indent=2))
        return 0
    table = Table(
        "size", "route", "runs", "downtime s", "whole migrate s", "downtime x raw", title="migration downtime"
    )
    for s in summary:
        table.add_row(
            human(s["size"]),  # type: ignore[arg-type]
            str(s["route"]),
            str(s["runs"]),
            f"{s['downtime_s']:.3f}",
            f"{s['duration_s']:.3f}",
            f"{s['x_raw']:.2f}x",
        )
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
