"""Incremental checkpoints by content: a full checkpoint against the next one, 10% changed.

For each store (``file://`` on local disk, ``s3://`` on SeaweedFS, the server the tests
use), a process holding SIZE of random bytes (incompressible: the worst case) is dumped
with ``--leave-running`` into an empty store (``full``: every chunk is new), rewrites
10% of its memory in place (``--spans`` contiguous spans, 1 by default), and is dumped again
(``second``: only the chunks the store lacks are written). What each dump adds to the
store is measured on the store itself (the bytes of ``.chunks`` before and after). Before
the full dump and after the second, the process is also dumped as before content addressing
(``CEDANA_RAY_DEDUP=0``: one file per image on disk, one object per fixed 8 MiB chunk on S3;
``today dump s`` is the first of these), into a store of its own, so the second dump's
parent is the full one; both latest checkpoints are then restored ``--repeat`` times,
alternately (``restore today``, ``restore cas``: the best of each).

Targets: the second dump stores at most 15% of the bytes of the full one and takes at most
a third of its time; a restore from ``cas`` is no slower than from ``today``. Run as root::

    .venv/bin/python bench/incremental.py [--size 1G] [--stores file,s3] [--spans 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the servers the tests use

from dump_restore import bench_home, err, gone, human, kill_jobs, listed, parse_size, room_for, timed, wait_until
from servers import ACCESS_KEY, SECRET_KEY, SeaweedS3, Server

from cedana_ray import criu
from cedana_ray.chunk_store import CHUNKS, DEDUP_ENV
from cedana_ray.config import Paths
from cedana_ray.engine import Engine
from cedana_ray.models import Compression
from cedana_ray.requests import DumpRequest, RestoreRequest, RunRequest
from cedana_ray.store import CheckpointStore

BUCKET = "bench"
WORKLOAD = """
import os, signal, sys, time
size, spans = int(sys.argv[1]), int(sys.argv[2])
buf = bytearray(size)
with open("/dev/urandom", "rb") as random:
    random.readinto(buf)

def rewrite(signum, frame):
    span = size // 10 // spans
    with open("/dev/urandom", "rb") as random:  # in place: no copy left in the heap
        for i in range(spans):
            at = (2 * i + 1) * size // (2 * spans + 1)
            random.readinto(memoryview(buf)[at : at + span])
    print("CHANGED", flush=True)

signal.signal(signal.SIGUSR1, rewrite)
print("READY", flush=True)
while True:
    time.sleep(1)
"""


@dataclass
class Row:
    store: str
    size: int
    full_s: float
    full_bytes: int  # what the full dump added to the store
    second_s: float
    second_bytes: int  # what the second dump added
    today_dump_s: float
    restore_today_s: float
    restore_cas_s: float


def chunk_bytes(store: CheckpointStore) -> int:
    try:
        entries = store.fs.find(f"{store.root}/{CHUNKS}", detail=True)  # every digest's folder
    except FileNotFoundError:
        return 0
    return sum(int(e.get("size", 0)) for e in entries.values() if e.get("type") != "directory")


def printed(engine: Engine, jid: str, word: str) -> None:
    log = Path(engine.job(jid).log or "")
    wait_until(lambda: log.exists() and word in log.read_text(), 300, f"job {jid} to print {word}", 0.1)


def restore_timed(engine: Engine, jid: str, ckpt: str) -> float:
    """Seconds to restore ``ckpt`` of the (dead) job ``jid``; the job is killed again after."""
    with timed() as restore_s:
        restored = engine.restore(RestoreRequest(checkpoint=ckpt), jid=jid)
    engine.kill(jid)
    gone(restored.job)
    return restore_s[0]


def dump_timed(engine: Engine, jid: str, url: str, leave_running: bool = True) -> tuple[float, str]:
    with timed() as dump_s:
        # zstd: a local store's default (none) is not content-addressed; the same on every store
        request = DumpRequest(storage=url, leave_running=leave_running, compression=Compression.zstd)
        result = engine.dump(jid, request)
    return dump_s[0], result.checkpoint


def bench_store(engine: Engine, name: str, url: str, size: int, spans: int, repeat: int, base: Path) -> Row:
    cmd = [sys.executable, "-c", WORKLOAD, str(size), str(spans)]
    jid = engine.run("process", RunRequest(cmd=cmd, cwd=str(base))).jid
    store = engine.store(f"{url}/cas")
    try:
        printed(engine, jid, "READY")
        os.environ[DEDUP_ENV] = "0"  # as before content addressing
        try:
            today_s, _ = dump_timed(engine, jid, f"{url}/today")
        finally:
            del os.environ[DEDUP_ENV]
        full_s, _ = dump_timed(engine, jid, store.url)
        full_bytes = chunk_bytes(store)
        os.kill(engine.job(jid).pid or 0, signal.SIGUSR1)  # its init forwards it to the workload
        printed(engine, jid, "CHANGED")
        # the full one its parent, as a job's checkpoints into one store have: a dump reuses
        # what its parent (the job's last checkpoint) lists, where that is in the same store
        second_s, second = dump_timed(engine, jid, store.url)  # leaving it running, as the full one
        second_bytes = chunk_bytes(store) - full_bytes
        os.environ[DEDUP_ENV] = "0"
        try:
            _, today = dump_timed(engine, jid, f"{url}/today")  # the same memory as the second
        finally:
            del os.environ[DEDUP_ENV]
        engine.kill(jid)
        gone(engine.job(jid))
        restores: dict[str, list[float]] = {today: [], second: []}
        for _ in range(repeat):  # alternately: neither gets a warmer machine
            for ckpt, times in restores.items():
                times.append(restore_timed(engine, jid, ckpt))
    finally:
        kill_jobs(engine)
    restore_today_s, restore_cas_s = min(restores[today]), min(restores[second])
    return Row(name, size, full_s, full_bytes, second_s, second_bytes, today_s, restore_today_s, restore_cas_s)


def start_s3(root: Path) -> Server:
    server = SeaweedS3(root)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL_S3=server.endpoint, AWS_ACCESS_KEY_ID=ACCESS_KEY)
    os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET_KEY
    from s3fs import S3FileSystem

    S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, endpoint_url=server.endpoint).mkdir(BUCKET)
    return server


def table(rows: list[Row], spans: int) -> Table:
    t = Table(
        title=f"incremental checkpoints, 10% changed in {spans} span(s), criu {criu.version()}, {os.cpu_count()} cores"
    )
    cols = ["store", "size", "full s", "full stored", "second s", "second stored", "stored %", "speedup"]
    cols += ["today dump s", "restore today s", "restore cas s", "restore cas/today"]
    for col in cols:
        t.add_column(col, justify="left" if col == "store" else "right")
    for r in rows:
        cells = [r.store, human(r.size), f"{r.full_s:.2f}", human(r.full_bytes), f"{r.second_s:.2f}"]
        cells += [human(r.second_bytes), f"{100 * r.second_bytes / r.full_bytes:.1f}", f"{r.full_s / r.second_s:.1f}x"]
        cells += [f"{r.today_dump_s:.2f}", f"{r.restore_today_s:.2f}", f"{r.restore_cas_s:.2f}"]
        cells += [f"{r.restore_cas_s / r.restore_today_s:.2f}"]
        t.add_row(*cells)
    return t


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1G", help="memory of the workload (default 1G)")
    parser.add_argument("--stores", default="file,s3", help="comma-separated: file, s3 (default both)")
    parser.add_argument("--spans", type=int, default=1, help="the 10%% changed, in this many spans (default 1)")
    parser.add_argument("--repeat", type=int, default=2, help="restores of each checkpoint; the best counts")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args()
    size, stores = parse_size(args.size), listed(parser, args.stores, {"file", "s3"}, "store(s)")
    base = bench_home(parser, "cedana-bench-incremental-")
    rows: list[Row] = []
    try:
        if reason := room_for(3 * size, base):  # two checkpoints, and the server's copy
            parser.error(f"{human(size)} does not fit here: {reason}")
        engine = Engine(Paths(base / "home"))
        for name in stores:
            err.print(f"[dim]{name} {human(size)} ...[/]")
            server = start_s3(base / "s3-server") if name == "s3" else None
            url = f"s3://{BUCKET}" if server else f"file://{base / 'store'}"
            try:
                rows.append(bench_store(engine, name, url, size, args.spans, args.repeat, base))
            finally:
                if server:
                    server.stop()
    except KeyboardInterrupt:
        err.print("[red]interrupted: cleaning up[/]")
        return 130
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=1))
        return 0
    Console(width=None if sys.stdout.isatty() else 200).print(table(rows, args.spans))
    return 0


if __name__ == "__main__":
    sys.exit(main())
