"""Remote checkpoints: cedana-ray streaming to S3, GCS and cedana:// against plain uploads.

For each size and backend (SeaweedFS for S3, fake-gcs-server for GCS, both real
servers on 127.0.0.1, as in the tests; a one-node Ray cluster for cedana://), a workload holding that much memory (half
incompressible, half zeros; see ``dump_restore.py``) is checkpointed three ways:

* ``stream none`` / ``stream zstd``: ``Engine.dump`` straight to the bucket, chunks
  compressed and uploaded in parallel; ``Engine.restore`` from it;
* ``local+put``: ``Engine.dump`` to a local store (uncompressed), then a plain
  sequential ``put_file`` of each image file with the backend's own fsspec client;
  restore is the matching ``get_file`` of each, then a local restore;
* the ``put`` and ``get`` of that second way alone give the raw transfer of the
  same bytes (``raw put s`` / ``raw get s``).

The goal: a streaming dump takes at most 1.2x the longer of the raw local dump
and the raw upload (``dump / max``, at most 1.2). Run as root::

    .venv/bin/python bench/storage.py [--sizes 256M,1G] [--backends s3,gs,cedana] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the servers the tests use

from cedana_ray.plugins._gcsfs import gcsfs
from dump_restore import (
    WORKLOAD,
    MiB,
    bench_home,
    err,
    gone,
    human,
    kill_jobs,
    listed,
    parse_size,
    room_for,
    timed,
    wait_ready,
)
from servers import ACCESS_KEY, SECRET_KEY, FakeGCS, SeaweedS3, Server

from cedana_ray import criu
from cedana_ray.config import Paths
from cedana_ray.engine import Engine
from cedana_ray.models import Compression
from cedana_ray.requests import DumpRequest, RestoreRequest, RunRequest
from cedana_ray.store import split_url

BUCKET = "bench"


@dataclass
class Row:
    backend: str
    size: int
    mode: str
    image_bytes: int
    stored_bytes: int
    dump_s: float  # the whole dump: for local+put, local dump + put
    restore_s: float  # the whole restore: for local+put, get + local restore
    put_s: float = 0.0
    get_s: float = 0.0
    local_dump_s: float = 0.0


class ClusterStore:
    """``cedana://``: a one-node Ray cluster with the control plane, whose head serves the store."""

    endpoint = "cedana://"

    def __init__(self, root: Path) -> None:
        self.root = root

    def start(self) -> None:
        from cedana_ray.actors import launcher
        from ray.cluster_utils import Cluster as RayCluster

        os.environ["RAY_AUTH_MODE"] = "disabled"
        self.cluster = RayCluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 1 << 30})
        launcher.up(address=self.cluster.address)  # connects this process: cedana:// works here

    def stop(self) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()


def start_server(backend: str, root: Path) -> Server | ClusterStore:
    server: Server | ClusterStore = {"s3": SeaweedS3, "gs": FakeGCS, "cedana": ClusterStore}[backend](root)
    server.start()
    if backend == "s3":
        os.environ.update(AWS_ENDPOINT_URL_S3=server.endpoint, AWS_ACCESS_KEY_ID=ACCESS_KEY)
        os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET_KEY
    elif backend == "gs":
        os.environ["STORAGE_EMULATOR_HOST"] = server.endpoint
    plain_client(backend, server).mkdir(BUCKET)
    return server


def plain_client(backend: str, server: Server | ClusterStore) -> object:
    """The backend's own fsspec client with its defaults: what a user would upload with
    (for cedana://, whole files through the store actor)."""
    if backend == "cedana":
        from cedana_ray.plugins.storage_cedana import CedanaFileSystem

        return CedanaFileSystem(skip_instance_cache=True)
    if backend == "s3":
        from s3fs import S3FileSystem

        return S3FileSystem(key=ACCESS_KEY, secret=SECRET_KEY, endpoint_url=server.endpoint, skip_instance_cache=True)
    return gcsfs.GCSFileSystem(token="anon", endpoint_url=server.endpoint, skip_instance_cache=True)


def run_workload(engine: Engine, size: int, base: Path) -> str:
    job = engine.run("process", RunRequest(cmd=[sys.executable, "-c", WORKLOAD, str(size)], cwd=str(base)))
    wait_ready(engine, job, size)
    return job.jid


def bench_stream(engine: Engine, backend: str, size: int, compression: Compression, base: Path) -> Row:
    jid = run_workload(engine, size, base)
    try:
        with timed() as dump_s:
            result = engine.dump(jid, DumpRequest(storage=f"{backend}://{BUCKET}/stream", compression=compression))
        gone(engine.job(jid))
        with timed() as restore_s:
            restored = engine.restore(RestoreRequest(), jid=jid)
        engine.kill(jid)
        gone(restored.job)
        engine.delete_checkpoint(result.checkpoint)
    finally:
        kill_jobs(engine)
    mode = f"stream {compression.value}"
    return Row(backend, size, mode, result.image_bytes, result.size_bytes, dump_s[0], restore_s[0])


def bench_local_put(engine: Engine, backend: str, size: int, server: Server | ClusterStore, base: Path) -> Row:
    fs = plain_client(backend, server)
    jid = run_workload(engine, size, base)
    try:
        with timed() as dump_s:
            result = engine.dump(jid, DumpRequest(compression=Compression.none))
        gone(engine.job(jid))
        local = Path(split_url(result.path)[0].removeprefix("file://")) / result.checkpoint
        files = sorted(p for p in local.rglob("*") if p.is_file())
        remote = f"{BUCKET}/copy/{result.checkpoint}"
        with timed() as put_s:
            for path in files:  # sequential, as a script after a local dump would
                fs.put_file(str(path), f"{remote}/{path.relative_to(local)}")
        shutil.rmtree(local)
        with timed() as get_s:
            for path in files:
                path.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{remote}/{path.relative_to(local)}", str(path))
        with timed() as restore_s:
            restored = engine.restore(RestoreRequest(), jid=jid)
        engine.kill(jid)
        gone(restored.job)
        engine.delete_checkpoint(result.checkpoint)
        fs.rm(remote, recursive=True)
    finally:
        kill_jobs(engine)
    image = result.image_bytes
    dump, restore = dump_s[0] + put_s[0], get_s[0] + restore_s[0]
    return Row(backend, size, "local+put", image, result.size_bytes, dump, restore, put_s[0], get_s[0], dump_s[0])


def bench_backend(engine: Engine, backend: str, sizes: list[int], base: Path) -> list[Row]:
    server = start_server(backend, base / f"{backend}-server")
    rows = []
    try:
        for size in sizes:
            for mode in ("local+put", "stream none", "stream zstd"):
                err.print(f"[dim]{backend} {human(size)} {mode} ...[/]")
                if mode == "local+put":
                    rows.append(bench_local_put(engine, backend, size, server, base))
                else:
                    rows.append(bench_stream(engine, backend, size, Compression(mode.split()[1]), base))
                err.print(f"[dim]  dump {rows[-1].dump_s:.2f}s restore {rows[-1].restore_s:.2f}s[/]")
    finally:
        server.stop()
    return rows


# -- output


def mbps(nbytes: int, seconds: float) -> str:
    return f"{nbytes / MiB / seconds:.0f}" if seconds else "-"


def table(rows: list[Row]) -> Table:
    t = Table(title=f"remote checkpoints, criu {criu.version()}")
    cols = ["backend", "size", "mode", "stored", "dump s", "restore s", "dump MB/s", "restore MB/s"]
    cols += ["local dump s", "raw put s", "raw get s", "dump / max", "restore / raw get"]
    for col in cols:
        t.add_column(col, justify="left" if col in ("backend", "size", "mode") else "right")
    for r in rows:
        base = next(b for b in rows if b.mode == "local+put" and (b.backend, b.size) == (r.backend, r.size))
        longer = max(base.local_dump_s, base.put_s)  # the goal: dump / longer <= 1.2
        cells = [r.backend, human(r.size), r.mode, human(r.stored_bytes), f"{r.dump_s:.2f}", f"{r.restore_s:.2f}"]
        cells += [mbps(r.image_bytes, r.dump_s), mbps(r.image_bytes, r.restore_s)]
        cells += [f"{base.local_dump_s:.2f}", f"{base.put_s:.2f}", f"{base.get_s:.2f}"]
        cells += [f"{r.dump_s / longer:.2f}", f"{r.restore_s / base.get_s:.2f}"]
        t.add_row(*cells)
    return t


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256M,1G", help="comma-separated workload sizes (default 256M,1G)")
    parser.add_argument("--backends", default="s3,gs,cedana", help="comma-separated: s3, gs, cedana (default all)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    backends = listed(parser, args.backends, {"s3", "gs", "cedana"}, "backend(s)")
    base = bench_home(parser, "cedana-bench-storage-")
    rows: list[Row] = []
    try:
        engine = Engine(Paths(base / "home"))
        for size in sizes:
            if reason := room_for(2 * size, base):  # the server holds a copy too
                parser.error(f"{human(size)} does not fit here: {reason}")
        for backend in backends:
            rows += bench_backend(engine, backend, sizes, base)
    except KeyboardInterrupt:
        err.print("[red]interrupted: cleaning up[/]")
        return 130
    finally:
        shutil.rmtree(base, ignore_errors=True)

    if args.json:
        print(json.dumps([asdict(r) for r in rows], indent=1))
        return 0
    Console(width=None if sys.stdout.isatty() else 200).print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
