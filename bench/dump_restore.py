"""Dump and restore throughput: cedana-ray (local mode) against bare CRIU.

For each size, a Python workload holding that much resident memory (half
incompressible, half zeros) is checkpointed and restored three ways:

* ``raw``: ``criu dump`` / ``criu restore --restore-detached`` by hand, on the same
  kind of tree (PID 1 of its own PID namespace, in its own session);
* ``ours none``, ``ours zstd`` (``--compressions``, also ``lz4``):
  :class:`cedana_ray.engine.Engine` ``dump`` then ``restore``, in a throwaway
  ``CEDANA_RAY_HOME``.

Run as root::

    .venv/bin/python bench/dump_restore.py [--sizes 256M,1G,4G] [--repeat N] [--compressions none,lz4,zstd] [--json]

Images (raw and ours) go under ``$TMPDIR`` (default ``/tmp``): ``TMPDIR=/dev/shm`` puts
them in memory, where CRIU writes at memory speed and only our own work is left to show.

Before each round the script prints how fast this machine faults in fresh memory
(:func:`first_touch`): CRIU writes its images into fresh page cache and a restore fills a
fresh process, so that rate bounds raw CRIU and us alike. On a VM whose host backs guest
memory lazily it varies from run to run, and with it every time here.

Everything lives under one temporary directory, removed at the end; every process
started here is killed by PID, even on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType

import psutil
from rich.console import Console
from rich.table import Table

from cedana_ray import criu
from cedana_ray.config import Paths
from cedana_ray.engine import Engine
from cedana_ray.models import Compression, Job
from cedana_ray.proctree import alive, signal_tree
from cedana_ray.requests import DumpRequest, RestoreRequest, RunRequest

GiB = 1 << 30
MiB = 1 << 20
UNITS = {"": 1, "K": 1 << 10, "M": MiB, "G": GiB}
COMPRESSIONS = ("none", "zstd")  # ours, besides raw CRIU

# argv: SIZE [MARKER]. Fills SIZE bytes in 64 MiB pieces, alternating one random
# block (each 4 KiB page stamped with its own index, so no two pages are equal) and
# zeros; every page is written, so all of it is resident. Then READY, and sleep.
WORKLOAD = """
import array, os, sys, time
size, piece, page = int(sys.argv[1]), 64 << 20, 4096
block, zeros = os.urandom(piece), bytes(piece)
buf = bytearray(size)
view = memoryview(buf)
words = view.cast("Q")
for index, off in enumerate(range(0, size, piece)):
    end = min(off + piece, size)
    if index % 2:
        view[off:end] = zeros[: end - off]
        continue
    view[off:end] = block[: end - off]
    words[off // 8 : end // 8 : page // 8] = array.array("Q", range(off // page, -(-end // page)))
del block, zeros  # only the buffer stays resident
print("READY", flush=True)
if len(sys.argv) > 2:
    open(sys.argv[2], "w").close()
while True:
    time.sleep(1)
"""

err = Console(stderr=True)


@dataclass
class Row:
    size: int
    mode: str
    run: int
    image_bytes: int
    stored_bytes: int
    dump_s: float
    restore_s: float
    dump_stages: dict[str, float] = field(default_factory=dict)
    restore_stages: dict[str, float] = field(default_factory=dict)


@dataclass
class Summary:
    """Medians over the runs of one size and mode; ``x_raw``: the median of each run's
    own ratio to raw CRIU in the same iteration (the VM's noise cancels more than in a
    ratio of medians)."""

    size: int
    mode: str
    runs: int
    dump_s: float
    restore_s: float
    dump_x_raw: float | None
    restore_x_raw: float | None


@dataclass
class Skip:
    size: int
    reason: str


# -- helpers


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)([KMG]?)(?:i?B)?", text.strip().upper())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256M, 1G)")
    return int(match.group(1)) * UNITS[match.group(2)]


def human(n: float) -> str:
    for unit, scale in (("G", GiB), ("M", MiB)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n / 1024:.0f}K"


def tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def wait_until(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def ready_timeout(size: int) -> float:
    return 60 + size / (40 * MiB)


@contextlib.contextmanager
def timed() -> Iterator[list[float]]:
    """``with timed() as t:`` leaves the elapsed seconds in ``t[0]``."""
    out = [0.0]
    start = time.perf_counter()
    try:
        yield out
    finally:
        out[0] = time.perf_counter() - start


class Procs:
    """Processes started here, by PID and start time; all killed on the way out."""

    def __init__(self) -> None:
        self.started: dict[int, float] = {}

    def track(self, pid: int) -> None:
        self.started[pid] = psutil.Process(pid).create_time()

    def kill(self, pid: int) -> None:
        """SIGKILL the tree of ``pid`` (if still the process tracked) and wait it gone."""
        started = self.started.pop(pid, None)
        if alive(pid, started):
            signal_tree(pid, signal.SIGKILL)
        wait_until(lambda: not alive(pid, started), 60, f"PID {pid} to exit")

    def kill_all(self) -> None:
        for pid in list(self.started):
            with contextlib.suppress(Exception):
                self.kill(pid)


def room_for(size: int, base: Path) -> str | None:
    """Why ``size`` does not fit on this machine, or None when it does."""
    need_mem = 3 * size + GiB  # workload + its restored copy or staged images + page cache
    avail = psutil.virtual_memory().available
    if avail < need_mem:
        return f"needs ~{human(need_mem)} of memory, {human(avail)} available"
    need_disk = 2 * size + GiB  # staged raw images + the stored checkpoint
    free = shutil.disk_usage(base).free
    if free < need_disk:
        return f"needs ~{human(need_disk)} of disk under {base}, {human(free)} free"
    return None


# -- raw CRIU


def ns_init_of(unshare: subprocess.Popen[bytes], timeout: float) -> int:
    """The child ``unshare --fork`` started: PID 1 of the new PID namespace."""
    found: list[psutil.Process] = []

    def child() -> bool:
        if unshare.poll() is not None:
            raise RuntimeError(f"unshare exited with {unshare.returncode}")
        found[:] = psutil.Process(unshare.pid).children()
        return bool(found)

    wait_until(child, timeout, "the workload to start")
    pid = found[0].pid
    nspid = Path(f"/proc/{pid}/status").read_text().split("NSpid:")[1].split("\n")[0].split()
    if nspid[-1] != "1":
        raise RuntimeError(f"PID {pid} is not PID 1 of its namespace (NSpid {nspid})")
    return pid


def criu_run(args: list[str], log: Path) -> None:
    res = subprocess.run([criu.binary(), *args], capture_output=True, text=True)
    if res.returncode != 0:
        detail = criu.first_error(log) or res.stderr.strip() or f"exit {res.returncode}"
        raise RuntimeError(f"criu {args[0]} failed: {detail}")


def bench_raw(size: int, run: int, base: Path, procs: Procs, leave_stopped: bool = True) -> Row:
    """Raw CRIU's dump and restore of a workload holding ``size``. The dump leaves the tree
    stopped (killed after, untimed), unless not ``leave_stopped``: then CRIU kills it, as
    ``criu dump`` does by default."""
    root = Path(tempfile.mkdtemp(prefix="raw-", dir=base))
    images, work = root / "images", root / "work"
    images.mkdir()
    work.mkdir()
    marker = root / "ready"
    cmd = ["unshare", "--pid", "--fork", "setsid", sys.executable, "-c", WORKLOAD, str(size), str(marker)]
    unshare = subprocess.Popen(
        cmd, cwd=base, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        procs.track(unshare.pid)
        pid = ns_init_of(unshare, 30)
        procs.track(pid)
        wait_until(marker.exists, ready_timeout(size), "the raw workload's READY marker", 0.2)
        with timed() as dump_s:
            criu_run(
                ["dump", "-t", str(pid), "-D", str(images), "-W", str(work), "-o", "dump.log"]
                + ["--leave-stopped"] * leave_stopped,
                work / "dump.log",
            )
        procs.kill(pid)
        unshare.wait(30)
        procs.started.pop(unshare.pid, None)
        image_bytes = tree_bytes(images)
        pidfile = work / "restore.pid"
        restore = ["restore", "-D", str(images), "-W", str(work), "-o", "restore.log", "--restore-detached"]
        with timed() as restore_s:
            criu_run([*restore, "--pidfile", str(pidfile)], work / "restore.log")
        restored = int(pidfile.read_text().strip())
        procs.track(restored)
        procs.kill(restored)
    finally:
        if unshare.poll() is None:
            with contextlib.suppress(Exception):
                procs.kill(unshare.pid)
        unshare.wait(30)
        shutil.rmtree(root, ignore_errors=True)
    return Row(size, "raw", run, image_bytes, image_bytes, dump_s[0], restore_s[0])


# -- cedana-ray


def wait_ready(engine: Engine, job: Job, size: int) -> None:
    log = Path(job.log or "")

    def ready() -> bool:
        if not alive(job.pid, job.details.get("started")):
            raise RuntimeError(f"job {job.jid} exited before READY")
        return log.exists() and b"READY" in log.read_bytes()

    wait_until(ready, ready_timeout(size), f"job {job.jid} to print READY", 0.2)


def gone(job: Job) -> None:
    wait_until(lambda: not alive(job.pid, job.details.get("started")), 60, f"PID {job.pid} of {job.jid} to exit")


def bench_ours(engine: Engine, size: int, compression: Compression, run: int, base: Path) -> Row:
    cmd = [sys.executable, "-c", WORKLOAD, str(size)]
    job = engine.run("process", RunRequest(cmd=cmd, cwd=str(base)))
    try:
        wait_ready(engine, job, size)
        request = DumpRequest(compression=compression)
        with timed() as dump_s:
            result = engine.dump(job.jid, request)
        gone(job)  # stopped by the dump
        with timed() as restore_s:
            restored = engine.restore(RestoreRequest(), jid=job.jid)
        restore_stages = restored.timings
        engine.kill(job.jid)
        gone(restored.job)
        engine.delete_checkpoint(result.checkpoint)
    finally:
        kill_jobs(engine)
    return Row(
        size,
        f"ours {compression.value}",
        run,
        result.image_bytes,
        result.size_bytes,
        dump_s[0],
        restore_s[0],
        dict(result.timings),
        restore_stages,
    )


def kill_jobs(engine: Engine) -> None:
    """SIGKILL every live job of this (private) state dir, by its recorded PID."""
    for job in engine.registry.jobs():
        started = job.details.get("started")
        if job.pid and alive(job.pid, started):
            signal_tree(job.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                gone(job)


# -- output


def ratio(row: Row, rows: list[Row], attr: str) -> str:
    if row.mode == "raw":
        return "1.00"
    raws = [getattr(r, attr) for r in rows if r.mode == "raw" and r.size == row.size]
    if not raws:
        return "-"
    return f"{getattr(row, attr) / statistics.median(raws):.2f}"


def summarize(rows: list[Row]) -> list[Summary]:
    raw = {(r.size, r.run): r for r in rows if r.mode == "raw"}
    out = []
    for size, mode in dict.fromkeys((r.size, r.mode) for r in rows):
        runs = [r for r in rows if (r.size, r.mode) == (size, mode)]

        def paired(attr: str, runs: list[Row] = runs, size: int = size) -> float | None:
            ratios = [getattr(r, attr) / getattr(raw[size, r.run], attr) for r in runs if (size, r.run) in raw]
            return round(statistics.median(ratios), 3) if ratios else None

        dump_s, restore_s = (round(statistics.median(getattr(r, a) for r in runs), 3) for a in ("dump_s", "restore_s"))
        out.append(Summary(size, mode, len(runs), dump_s, restore_s, paired("dump_s"), paired("restore_s")))
    return out


def summary_table(summaries: list[Summary]) -> Table:
    t = Table(title="medians; x raw: the median of each run's ratio to raw CRIU in the same iteration")
    for col in ("size", "mode", "runs", "dump s", "restore s", "dump x raw", "restore x raw"):
        t.add_column(col, justify="left" if col in ("size", "mode") else "right")
    for m in summaries:
        ratios = [f"{x:.2f}" if x is not None else "-" for x in (m.dump_x_raw, m.restore_x_raw)]
        t.add_row(human(m.size), m.mode, str(m.runs), f"{m.dump_s:.3f}", f"{m.restore_s:.3f}", *ratios)
    return t


def table(rows: list[Row], skips: list[Skip], repeat: int) -> Table:
    t = Table(title=f"dump / restore, criu {criu.version()} ({criu.binary()})")
    cols = ["size", "mode", *(["run"] if repeat > 1 else []), "image", "stored", "dump s", "restore s"]
    cols += ["dump GiB/s", "restore GiB/s", "dump x raw", "restore x raw"]
    for col in cols:
        t.add_column(col, justify="left" if col in ("size", "mode") else "right")
    for r in rows:
        cells = [human(r.size), r.mode, *([str(r.run)] if repeat > 1 else []), human(r.image_bytes)]
        cells += [human(r.stored_bytes), f"{r.dump_s:.2f}", f"{r.restore_s:.2f}"]
        cells += [f"{r.image_bytes / GiB / r.dump_s:.2f}", f"{r.image_bytes / GiB / r.restore_s:.2f}"]
        cells += [ratio(r, rows, "dump_s"), ratio(r, rows, "restore_s")]
        t.add_row(*cells)
    for s in skips:
        t.add_row(human(s.size), "[yellow]skipped[/]", *([""] if repeat > 1 else []), s.reason)
    return t


def stages_line(r: Row) -> str:
    def fmt(stages: dict[str, float]) -> str:
        return " ".join(f"{k}={v:.3f}" for k, v in sorted(stages.items(), key=lambda kv: -kv[1]))

    return f"{human(r.size):>5} {r.mode:<9} #{r.run} dump[{fmt(r.dump_stages)}] restore[{fmt(r.restore_stages)}]"


# -- main


def interrupt_on_sigterm() -> None:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def listed(parser: argparse.ArgumentParser, text: str, known: set[str], what: str) -> list[str]:
    """A comma-separated option's items, each one of ``known``."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if unknown := set(items) - known:
        parser.error(f"unknown {what}: {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
    return items


def bench_home(parser: argparse.ArgumentParser, prefix: str) -> Path:
    """A throwaway directory whose ``home`` is CEDANA_RAY_HOME, once root and CRIU are there;
    SIGTERM interrupts the run (its cleanup runs)."""
    if os.geteuid() != 0:
        parser.error("CRIU needs root")
    criu.version()
    interrupt_on_sigterm()
    base = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ["CEDANA_RAY_HOME"] = str(base / "home")
    os.environ.pop("CEDANA_RAY_STORAGE", None)
    return base


def bench_size(size: int, repeat: int, base: Path, engine: Engine, procs: Procs, compressions: list[str]) -> list[Row]:
    rows = []
    modes = ["raw", *(f"ours {c}" for c in compressions)]
    for run in range(1, repeat + 1):
        print_first_touch()
        shift = (run - 1) % len(modes)  # rotate the order: no mode always runs first (cold memory, cache)
        for mode in modes[shift:] + modes[:shift]:
            err.print(f"[dim]{human(size)} {mode} #{run} ...[/]")
            if mode == "raw":
                row = bench_raw(size, run, base, procs)
            else:
                row = bench_ours(engine, size, Compression(mode.split()[1]), run, base)
            err.print(f"[dim]  dump {row.dump_s:.2f}s restore {row.restore_s:.2f}s[/]")
            rows.append(row)
    return rows


def first_touch(nbytes: int = GiB) -> tuple[float, float]:
    """Seconds per GiB to write ``nbytes`` of fresh anonymous memory, and to write it again."""
    piece = b"\1" * (64 * MiB)
    rates = []
    with mmap.mmap(-1, nbytes) as memory:
        for _ in range(2):
            memory.seek(0)
            start = time.perf_counter()
            while memory.tell() < nbytes:
                memory.write(piece[: nbytes - memory.tell()])
            rates.append((time.perf_counter() - start) * GiB / nbytes)
    return rates[0], rates[1]


def print_first_touch() -> None:
    fresh, again = first_touch()
    err.print(f"[dim]fresh memory: {fresh:.2f} s/GiB to fault in and write, {again:.2f} s/GiB to write again[/]")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256M,1G,4G", help="comma-separated workload sizes (default 256M,1G,4G)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each mode per size (default 1)")
    parser.add_argument(
        "--compressions", default=",".join(COMPRESSIONS), help="ours, comma-separated (default none,zstd; also lz4)"
    )
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args()
    compressions = listed(parser, args.compressions, {c.value for c in Compression}, "compression")
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    if os.geteuid() != 0:
        parser.error("CRIU needs root")
    criu.version()
    interrupt_on_sigterm()

    base = Path(tempfile.mkdtemp(prefix="cedana-bench-"))
    home = base / "home"
    os.environ["CEDANA_RAY_HOME"] = str(home)
    os.environ.pop("CEDANA_RAY_STORAGE", None)
    procs = Procs()
    engine: Engine | None = None
    rows: list[Row] = []
    skips: list[Skip] = []
    try:
        engine = Engine(Paths(home))
        for size in sizes:
            if reason := room_for(size, base):
                err.print(f"[yellow]skipping {human(size)}: {reason}[/]")
                skips.append(Skip(size, reason))
                continue
            rows += bench_size(size, args.repeat, base, engine, procs, compressions)
    except KeyboardInterrupt:
        err.print("[red]interrupted: cleaning up[/]")
        return 130
    finally:
        if engine is not None:
            kill_jobs(engine)
        procs.kill_all()
        shutil.rmtree(base, ignore_errors=True)

    summaries = summarize(rows)
    if args.json:
        doc = {"rows": rows, "summary": summaries, "skipped": skips}
        print(json.dumps({key: [asdict(x) for x in items] for key, items in doc.items()}, indent=1))
        return 0
    out = Console(width=None if sys.stdout.isatty() else 160)
    out.print(table(rows, skips, args.repeat))
    out.print(summary_table(summaries))
    out.print("[bold]stages (s, largest first)[/]")
    for r in rows:
        if r.mode != "raw":
            out.print(stages_line(r), markup=False, highlight=False, soft_wrap=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
