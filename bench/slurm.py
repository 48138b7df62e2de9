"""SLURM warning to durable checkpoint, and requeued start to running workload.

For each size, the counter of the tests holding that many MiB of random bytes
(``tests/workloads/heavy_counter.py``) runs as the workload of a batch script rendered
by ``cedana-ray slurm sbatch``, on a real SLURM cluster (munged, slurmctld, a slurmd per
node; ``tests/slurm_cluster.py``) of one node, or two with ``--nodes 2`` (the second in a
network namespace of its own; the workload runs on one of them, Ray on both). The bench
then sends the preemption notice as SLURM does (``scancel --batch --signal=USR1``) and
measures:

* ``warning→durable``: from the signal to the checkpoint's manifest in the store (the
  manifest is written last: before it, the checkpoint does not exist);
* ``start→running``: from the requeued job's start (its state turns RUNNING) to the
  restored counter's first new line in the job's output;
* the parts: the dump and the restore as cedana-ray reports them.

Run as root (``make setup`` installs SLURM)::

    .venv/bin/python bench/slurm.py [--sizes 256,1024] [--nodes 1|2] [--json]

Everything lives under one temporary directory, removed at the end; the SLURM daemons
and jobs are stopped by PID (the cluster helper) even on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from slurm_cluster import SlurmCluster  # noqa: E402

WORKLOAD = [sys.executable, str(ROOT / "tests" / "workloads" / "heavy_counter.py")]
COUNT = re.compile(r"^count=(\d+)$", re.M)
POLL_S = 0.05


@dataclass
class Result:
    size_mib: int
    warning_to_durable_s: float
    dump_s: float
    start_to_running_s: float
    restore_s: float
    checkpoint_mib: float


def wait(check: Callable[[], object], timeout: float, what: str) -> float:
    """Poll ``check`` until it is true; the time it became so."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(POLL_S)
    return time.monotonic()


def text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def manifests(state: Path) -> list[Path]:
    return list(state.glob("*/cluster/checkpoints/*/manifest.json"))


def submit(cluster: SlurmCluster, where: Path, size_mib: int) -> tuple[str, Path]:
    script, out = where / "job.sbatch", where / "slurm.out"
    render = [sys.executable, "-m", "cedana_ray.cli", "slurm", "sbatch", "--output", str(script)]
    render += ["--nodes", str(len(cluster.nodes))]
    render += ["--state-dir", str(where / "state"), "--warning", "120", "--", *WORKLOAD, str(size_mib)]
    subprocess.run(render, check=True, capture_output=True)
    job = cluster.run("sbatch", "--parsable", "-D", str(where), "-o", str(out), str(script)).stdout.strip()
    return job, out


def seconds_in(out: str, jid: str, column: int) -> float:
    """A ``seconds`` column of the dump or restore table the batch script printed for ``jid``."""
    for line in out.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] == jid and len(cells) > column:
            return float(cells[column])
    return float("nan")


def measure(cluster: SlurmCluster, where: Path, size_mib: int) -> Result:
    where.mkdir()
    job, out = submit(cluster, where, size_mib)
    wait(lambda: len(COUNT.findall(text(out))) >= 20, 180, "the workload to run")
    signalled = time.monotonic()
    cluster.run("scancel", "--batch", "--signal=USR1", job)
    durable = wait(lambda: manifests(where / "state"), 120, "the checkpoint")
    wait(lambda: "RUNNING" not in state_of(cluster, job), 60, "the requeue")
    started = wait(lambda: "RUNNING" in state_of(cluster, job), 120, "the requeued start")
    running = wait(lambda: COUNT.search(text(out).partition("restored the workloads")[2]), 120, "the restore")
    dump_out, _, restore_out = text(out).partition("requeueing")
    ckpt = manifests(where / "state")[0].parent
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / (1 << 20)
    cluster.cancel_all()
    return Result(
        size_mib=size_mib,
        warning_to_durable_s=round(durable - signalled, 2),
        dump_s=seconds_in(dump_out, f"slurm-{job}", 3),
        start_to_running_s=round(running - started, 2),
        restore_s=seconds_in(restore_out, f"slurm-{job}", 3),
        checkpoint_mib=round(size, 1),
    )


def state_of(cluster: SlurmCluster, job: str) -> str:
    return cluster.run("squeue", "-h", "-j", job, "-o", "%T", check=False).stdout


def show(results: list[Result]) -> None:
    table = Table("workload MiB", "warning→durable s", "dump s", "start→running s", "restore s", "checkpoint MiB")
    for r in results:
        table.add_row(*(str(v) for v in asdict(r).values()))
    Console().print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="256,1024", help="workload sizes in MiB, comma-separated")
    parser.add_argument("--nodes", type=int, choices=(1, 2), default=1, help="nodes of the cluster and the job")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-slurm-"))
    cluster = SlurmCluster(nodes=args.nodes).start()
    try:
        results = [measure(cluster, root / f"{size}M", int(size)) for size in args.sizes.split(",")]
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        show(results)


if __name__ == "__main__":
    main()
