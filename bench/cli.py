"""What a user waits for at the shell: the real ``cedana-ray`` run as a subprocess, as typed.

* start: ``cedana-ray --help`` and ``cedana-ray ps --local`` (an empty state dir, and ten live
  jobs), against the interpreter's own start (``python -c pass``) and ``criu --version``;
* against a cluster that ``cedana-ray up`` starts here (its own Ray head, in a throwaway
  ``CEDANA_RAY_HOME``, taken ``down`` at the end): ``ps`` through the coordinator's gateway,
  ``ps`` through Ray (the environment names Ray's token, so the CLI connects with
  ``ray.init`` as every command did before the gateway), and Ray's own ``ray status``;
* a shell ``cedana-ray dump job --local --compression none`` of a process holding SIZE
  (which stops it), against a shell ``criu dump`` of an identical one (bench/dump_restore.py's
  raw run), both as CRIU kills the tree by default and with ``--leave-stopped`` (the tree
  killed after, untimed), paired in each run.

Each time is the median of ``--repeat`` runs; ratios are against the raw tool of the same
run. Run as root::

    .venv/bin/python bench/cli.py [--repeat 7] [--sizes 256M,1G] [--no-cluster] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from dump_restore import WORKLOAD, Procs, bench_raw, parse_size, room_for, wait_ready
from rich.console import Console
from rich.table import Table

from cedana_ray import auth, criu
from cedana_ray.config import Paths
from cedana_ray.engine import Engine
from cedana_ray.requests import RunRequest

CLI = str(Path(sys.executable).with_name("cedana-ray"))
RAY = str(Path(sys.executable).with_name("ray"))
err = Console(stderr=True)
LIVE_JOBS = 10
Row = tuple[str, float, str, float, float]  # ours, its seconds, against, its seconds, ours / against


def row(ours: str, ours_s: float, raw: str, raw_s: float) -> Row:
    return ours, ours_s, raw, raw_s, ours_s / raw_s


def seconds(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip()[-500:]}")
    return took


def median(fn: Callable[[], float], repeat: int) -> float:
    fn()  # warm: the page cache, and the command index on a first run
    return statistics.median(fn() for _ in range(repeat))


def start_rows(env: dict[str, str], repeat: int) -> list[Row]:
    def timed(*argv: str) -> float:
        return median(lambda: seconds(list(argv), env), repeat)

    python, criu_version = timed(sys.executable, "-c", "pass"), timed(criu.binary(), "--version")
    help_s = timed(CLI, "--help")
    return [
        row("cedana-ray --help", help_s, "python -c pass", python),
        row("cedana-ray --help", help_s, "criu --version", criu_version),
        row("cedana-ray ps --local", timed(CLI, "ps", "--local"), "python -c pass", python),
        row(f"cedana-ray ps --local, {LIVE_JOBS} live jobs", ps_of_live_jobs(timed, env), "python -c pass", python),
    ]


def ps_of_live_jobs(timed: Callable[..., float], env: dict[str, str]) -> float:
    """``ps --local`` while LIVE_JOBS jobs run: each one's process looked at."""
    engine = Engine(Paths(Path(env["CEDANA_RAY_HOME"])))
    jobs = [engine.run("process", RunRequest(cmd=["sleep", "3600"])) for _ in range(LIVE_JOBS)]
    try:
        return timed(CLI, "ps", "--local")
    finally:
        for job in jobs:
            engine.kill(job.jid)
            engine.delete(job.jid)


def cluster_rows(env: dict[str, str], home: Path, repeat: int) -> list[Row]:
    up = subprocess.run([CLI, "up", "--json", "-q"], env=env, capture_output=True, text=True, timeout=300)
    if up.returncode != 0:
        raise RuntimeError(f"cedana-ray up failed: {up.stderr.strip()[-500:]}")
    try:
        state = json.loads(up.stdout)
        through_ray = {**env, **auth.env(Path(state["auth_token_file"]))}
        ps_gateway = median(lambda: seconds([CLI, "ps"], env), repeat)
        ps_ray = median(lambda: seconds([CLI, "ps"], through_ray), repeat)
        ray_status = median(lambda: seconds([RAY, "status", "--address", state["address"]], through_ray), repeat)
    finally:
        subprocess.run([CLI, "down", "--kill-jobs"], env=env, capture_output=True, timeout=300)
    return [
        row("ps (gateway)", ps_gateway, "ps (ray.init)", ps_ray),
        row("ps (gateway)", ps_gateway, "ray status", ray_status),
    ]


def dump_rows(size: int, repeat: int, base: Path, env: dict[str, str]) -> list[Row]:
    """Paired: per run, raw criu dumps (killing the tree, leaving it stopped) and a shell
    cedana-ray dump of identical processes."""
    engine, procs = Engine(Paths(Path(env["CEDANA_RAY_HOME"]))), Procs()
    ours: list[float] = []
    raws: dict[str, list[float]] = {"criu dump": [], "criu dump --leave-stopped": []}
    try:
        for run in range(repeat):
            for raw, times in raws.items():
                times.append(bench_raw(size, run, base, procs, leave_stopped="stopped" in raw).dump_s)
            job = engine.run("process", RunRequest(cmd=[sys.executable, "-c", WORKLOAD, str(size)], cwd=str(base)))
            wait_ready(engine, job, size)
            argv = [CLI, "dump", "job", job.jid, "--local", "--compression", "none", "-q", "--json"]
            ours.append(seconds(argv, env))
            for ckpt in engine.checkpoints(job.jid):
                engine.delete_checkpoint(ckpt.checkpoint)
            engine.delete(job.jid)
    finally:
        procs.kill_all()
    mib = f"{size >> 20} MiB"
    # x: the median of each run's own ratio (the machine's noise cancels more than in a ratio of medians)
    return [
        (f"shell dump job, {mib}", statistics.median(ours), f"{raw}, {mib}", statistics.median(times),
         statistics.median(o / r for o, r in zip(ours, times, strict=True)))
        for raw, times in raws.items()
    ]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="runs of each command (default 7; dumps: 3)")
    parser.add_argument("--sizes", default="256M,1G", help="sizes of the dumped process (default 256M,1G)")
    parser.add_argument("--no-cluster", action="store_true", help="skip the commands against a cluster")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()
    if os.geteuid() != 0:
        parser.error("CRIU needs root")
    base = Path(tempfile.mkdtemp(prefix="cedana-bench-cli-"))
    home = base / "home"
    # bytecode cached, as an installed package has it (a development shell may forbid writing it)
    drop = ("RAY_ADDRESS", "CEDANA_RAY_ADDRESS", auth.MODE, "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env |= {"CEDANA_RAY_HOME": str(home)}
    rows: list[Row] = []
    try:
        rows += start_rows(env, args.repeat)
        if not args.no_cluster:
            rows += cluster_rows(env, home, args.repeat)
        for size in (parse_size(s) for s in args.sizes.split(",") if s.strip()):
            if reason := room_for(size, base):
                err.print(f"[yellow]skipping {size >> 20} MiB: {reason}[/]")
                continue
            rows += dump_rows(size, max(3, args.repeat // 2), base, env)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        keys = ("ours", "ours_s", "raw", "raw_s", "x_raw")
        print(json.dumps([dict(zip(keys, r, strict=True)) for r in rows], indent=1))
        return 0
    t = Table("command", "s", "against", "s", "x", title=f"the CLI as typed (medians of {args.repeat})")
    for ours, ours_s, raw, raw_s, x in rows:
        t.add_row(ours, f"{ours_s:.3f}", raw, f"{raw_s:.3f}", f"{x:.2f}")
    Console().print(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
