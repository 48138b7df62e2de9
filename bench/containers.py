"""Container dump/restore: our runc and containerd plugins against runc and ctr by hand.

Two workloads: the tests' busybox counter container (rows ``runc ...``, ``ctr ...``) and
their Python container holding 256 MiB of random bytes (rows ``py runc ...``, ``py ctr
...``; its Debian rootfs and OCI image come from the tests' cache, built on first use,
see tests/containers.py). Each is dumped once it holds its memory. In the same run, each
way is repeated ``--repeat`` times:

* ``runc raw``: ``runc checkpoint --image-path`` then ``runc restore --detach``;
* ``runc ours none|zstd``: ``Engine.dump`` then ``Engine.restore`` of a ``runc`` job;
* ``ctr raw``: ``ctr c checkpoint --task --rw`` then ``ctr c restore --live --rw``
  (the checkpoint stays in containerd's content store);
* ``ctr ours none|zstd``: ``Engine.dump``/``restore`` of a ``containerd`` job (the
  checkpoint is exported into our store and imported back).

Run as root (needs runc, CRIU, containerd + umoci for the ctr rows, debootstrap for the py rows)::

    .venv/bin/python bench/containers.py [--repeat N] [--json]

Everything lives in one temporary directory; containerd is started there and stopped
by PID; every container is deleted at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' image builders
from cedana_ray.plugins.containerd.client import Ctr
from cedana_ray.plugins.containerd.plugin import ContainerdRunRequest
from cedana_ray.plugins.runc.plugin import RuncRunRequest
from cedana_ray.plugins.runc.runtime import Runc, derive_bundle
from containerd_daemon import start_containerd
from containers import (
    bundle,
    busybox_rootfs,
    checksummed_cmd,
    oci_image,
    python_image,
    python_rootfs,
)

from cedana_ray import criu
from cedana_ray.config import Paths
from cedana_ray.engine import Engine
from cedana_ray.models import Compression
from cedana_ray.requests import DumpRequest, RestoreRequest

SCRIPT = "i=0; while true; do echo $i > /count; i=$((i+1)); sleep 0.05; done"
IMAGE = "localhost/bench-counter:latest"
PY_IMAGE = "localhost/bench-python:latest"
PY_RSS = 256 << 20  # the Python container is dumped once it holds this much
Timing = tuple[float, float, dict[str, Any]]  # (dump s, restore s, our pipelines' stage times)
Rows = dict[str, dict[str, Any]]


def settle(pid: int, min_rss: int) -> None:
    """Let the container start; one that must hold ``min_rss`` bytes first, until it does."""
    time.sleep(0.3)
    deadline = time.monotonic() + 120
    while min_rss and psutil.Process(pid).memory_info().rss < min_rss:
        if time.monotonic() > deadline:
            raise RuntimeError(f"container {pid} never held {min_rss >> 20} MiB")
        time.sleep(0.1)
    if min_rss:
        time.sleep(1.0)  # and hashed it: the dump then finds it counting, as the tests do


@contextmanager
def timer() -> Iterator[list[float]]:
    out = [0.0]
    start = time.perf_counter()
    yield out
    out[0] = time.perf_counter() - start


def runc_raw(base: Path, bundle_dir: Path, cid: str, min_rss: int) -> Timing:
    """runc by hand, with the same CRIU config file (nftables lock) our containers get."""
    runc = Runc(base / "raw-root")
    own = derive_bundle(bundle_dir, base / f"{cid}-bundle", criu.write_config(base / f"{cid}.conf"), f"/bench/{cid}")
    quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    subprocess.run(runc.argv("run", "--detach", "--bundle", str(own), cid), check=True, **quiet)  # type: ignore[call-overload]
    settle(runc.state(cid)["pid"], min_rss)
    images = base / f"{cid}-images"
    with timer() as dump:
        runc.call("checkpoint", "--image-path", str(images), "--work-path", str(base / f"{cid}-w"), cid)
    runc.delete(cid)
    argv = runc.argv("restore", "--detach", "--image-path", str(images), "--bundle", str(own), cid)
    with timer() as restore:
        subprocess.run([*argv, "--work-path", str(base / f"{cid}-r")], check=True, **quiet)  # type: ignore[call-overload]
    runc.delete(cid)
    return dump[0], restore[0], {}


def ours(engine: Engine, jtype: str, request: object, compression: Compression, min_rss: int) -> Timing:
    job = engine.run(jtype, request)  # type: ignore[arg-type]
    settle(job.pid, min_rss)
    dumped = engine.dump(job.jid, DumpRequest(compression=compression))
    restored = engine.restore(RestoreRequest(), jid=job.jid)
    engine.kill(job.jid)
    time.sleep(0.2)
    engine.delete(job.jid)
    return dumped.duration_s, restored.duration_s, {"dump": dumped.timings, "restore": restored.timings}


def ctr_raw(ctr: Ctr, base: Path, image: str, cid: str, min_rss: int) -> Timing:
    """ctr by hand, with the same CRIU config file (nftables lock) our containers get."""
    ref = f"localhost/bench-ckpt:{cid}"
    conf = criu.write_config(base / f"{cid}.conf")
    ctr.call("run", "--detach", "--null-io", "--annotation", f"{criu.CONFIG_ANNOTATION}={conf}", image, cid)
    settle(ctr.tasks()[cid][0], min_rss)
    with timer() as dump:
        ctr.call("containers", "checkpoint", "--task", "--rw", cid, ref)
    ctr.remove(cid)
    with timer() as restore:
        ctr.call("containers", "restore", "--live", "--rw", cid, ref)
    ctr.remove(cid)
    ctr.call("images", "rm", ref)
    return dump[0], restore[0], {}


def measure(repeat: int, one: Callable[[int], Timing]) -> dict[str, Any]:
    runs = [one(i) for i in range(repeat)]
    return {
        "dump_s": statistics.median(d for d, _, _ in runs),
        "restore_s": statistics.median(r for _, r, _ in runs),
        "stages": runs[-1][2],  # of the last run (--json only)
    }


def bench_runc(base: Path, engine: Engine, repeat: int, name: str, bundle_dir: Path, min_rss: int) -> Rows:
    tag = name.replace(" ", "")
    rows = {f"{name} raw": measure(repeat, lambda i: runc_raw(base, bundle_dir, f"{tag}raw{i}", min_rss))}
    for comp in (Compression.none, Compression.zstd):
        req = lambda i, c=comp: RuncRunRequest(cmd=["runc"], bundle=str(bundle_dir), container=f"{tag}o{c.value}{i}")  # noqa: E731
        one = lambda i, r=req, c=comp: ours(engine, "runc", r(i), c, min_rss)  # noqa: E731
        rows[f"{name} ours {comp.value}"] = measure(repeat, one)
    return rows


def bench_ctr_image(ctr: Ctr, base: Path, engine: Engine, repeat: int, name: str, image: str, min_rss: int) -> Rows:
    tag = name.replace(" ", "")
    rows = {f"{name} raw": measure(repeat, lambda i: ctr_raw(ctr, base, image, f"{tag}raw{i}", min_rss))}
    for comp in (Compression.none, Compression.zstd):
        req = lambda i, c=comp: ContainerdRunRequest(cmd=["ctr"], image=image, container=f"{tag}o{c.value}{i}")  # noqa: E731
        one = lambda i, r=req, c=comp: ours(engine, "containerd", r(i), c, min_rss)  # noqa: E731
        rows[f"{name} ours {comp.value}"] = measure(repeat, one)
    return rows


def bench_ctr(base: Path, engine: Engine, repeat: int, python: bool) -> Rows:
    (base / "containerd").mkdir()
    daemon = start_containerd(base / "containerd")
    try:
        # a fresh namespace: containerd keeps runc state per namespace, outside its root
        ctr = Ctr(str(base / "containerd" / "containerd.sock"), f"bench-{secrets.token_hex(4)}")
        os.environ.update(CONTAINERD_ADDRESS=ctr.address, CONTAINERD_NAMESPACE=ctr.namespace)
        (base / "oci").mkdir()
        archive = oci_image(base / "rootfs", base / "oci" / "image", SCRIPT)
        ctr.call("images", "import", "--base-name", IMAGE.rsplit(":", 1)[0], str(archive))
        rows = bench_ctr_image(ctr, base, engine, repeat, "ctr", IMAGE, 0)
        if python:
            ctr.call("images", "import", "--base-name", PY_IMAGE.rsplit(":", 1)[0], str(python_image()))
            rows |= bench_ctr_image(ctr, base, engine, repeat, "py ctr", PY_IMAGE, PY_RSS)
        for cid in ctr.containers():
            ctr.remove(cid)
        return rows
    finally:
        daemon.terminate()
        daemon.wait(10)
        with contextlib.suppress(OSError):  # containerd's runc state dir of our namespace, empty by now
            os.rmdir(f"/run/containerd/runc/bench-{base.name}")


def report(rows: Rows) -> None:
    print(f"{'mode':<18} {'dump s':>8} {'restore s':>10} {'dump/raw':>9} {'restore/raw':>12}")
    for mode, row in rows.items():
        raw = rows[f"{mode.split(' ours')[0].removesuffix(' raw')} raw"]
        ratios = row["dump_s"] / raw["dump_s"], row["restore_s"] / raw["restore_s"]
        print(f"{mode:<18} {row['dump_s']:8.3f} {row['restore_s']:10.3f} {ratios[0]:9.2f} {ratios[1]:12.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="cedana-bench-containers-"))
    os.environ["CEDANA_RAY_HOME"] = str(base / "home")
    engine = Engine(Paths(base / "home"))
    try:
        python = shutil.which("debootstrap") is not None
        counter = bundle(base / "bundle", busybox_rootfs(base / "rootfs"))  # counts to stdout
        rows = bench_runc(base, engine, args.repeat, "runc", counter, 0)
        if python:
            py_bundle = bundle(base / "py-bundle", python_rootfs(), cmd=checksummed_cmd())
            rows |= bench_runc(base, engine, args.repeat, "py runc", py_bundle, PY_RSS)
        if all(shutil.which(b) for b in ("containerd", "ctr", "umoci")):
            rows |= bench_ctr(base, engine, args.repeat, python)
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            report(rows)
    finally:
        for root in (base / "raw-root", base / "home" / "runc"):
            for c in Runc(root).containers():
                Runc(root).delete(c["id"])
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
