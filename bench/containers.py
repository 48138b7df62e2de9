"""Container dump/restore: our runc and containerd plugins against runc and ctr by hand.

The workload is the tests' busybox counter container. In the same run, each way is
repeated ``--repeat`` times:

* ``runc raw``: ``runc checkpoint --image-path`` then ``runc restore --detach``;
* ``runc ours none|zstd``: ``Engine.dump`` then ``Engine.restore`` of a ``runc`` job;
* ``ctr raw``: ``ctr c checkpoint --task --rw`` then ``ctr c restore --live --rw``
  (the checkpoint stays in containerd's content store);
* ``ctr ours``: ``Engine.dump``/``restore`` of a ``containerd`` job (zstd; the
  checkpoint is exported into our store and imported back).

Run as root (needs runc, CRIU, and containerd + umoci for the ctr rows)::

    .venv/bin/python bench/containers.py [--repeat N] [--json]

Everything lives in one temporary directory; containerd is started there and stopped
by PID; every container is deleted at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' image builders
from cedana_ray.plugins.containerd.client import Ctr
from cedana_ray.plugins.containerd.plugin import ContainerdRunRequest
from cedana_ray.plugins.runc.plugin import RuncRunRequest
from cedana_ray.plugins.runc.runtime import CRIU_CONFIG_ANNOTATION, Runc, derive_bundle, write_criu_config
from containers import bundle, busybox_rootfs, oci_image, start_containerd

from cedana_ray.config import Paths
from cedana_ray.engine import Engine
from cedana_ray.models import Compression
from cedana_ray.requests import DumpRequest, RestoreRequest

SCRIPT = "i=0; while true; do echo $i > /count; i=$((i+1)); sleep 0.05; done"
IMAGE = "localhost/bench-counter:latest"
Timing = tuple[float, float]  # (dump s, restore s)


@contextmanager
def timer() -> Iterator[list[float]]:
    out = [0.0]
    start = time.perf_counter()
    yield out
    out[0] = time.perf_counter() - start


def runc_raw(base: Path, bundle_dir: Path, run: int) -> Timing:
    """runc by hand, with the same CRIU config file (nftables lock) our containers get."""
    runc, cid = Runc(base / "raw-root"), f"raw{run}"
    own = derive_bundle(
        bundle_dir, base / f"raw-bundle{run}", write_criu_config(base / f"raw{run}.conf"), f"/bench/{cid}"
    )
    quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    subprocess.run(runc.argv("run", "--detach", "--bundle", str(own), cid), check=True, **quiet)  # type: ignore[call-overload]
    time.sleep(0.3)
    images = base / f"raw-images{run}"
    with timer() as dump:
        runc.call("checkpoint", "--image-path", str(images), "--work-path", str(base / f"raw-w{run}"), cid)
    runc.delete(cid)
    argv = runc.argv("restore", "--detach", "--image-path", str(images), "--bundle", str(own), cid)
    with timer() as restore:
        subprocess.run([*argv, "--work-path", str(base / f"raw-r{run}")], check=True, **quiet)  # type: ignore[call-overload]
    runc.delete(cid)
    return dump[0], restore[0]


def ours(engine: Engine, jtype: str, request: object, compression: Compression) -> Timing:
    job = engine.run(jtype, request)  # type: ignore[arg-type]
    time.sleep(0.3)
    dumped = engine.dump(job.jid, DumpRequest(compression=compression))
    restored = engine.restore(RestoreRequest(), jid=job.jid)
    engine.kill(job.jid)
    time.sleep(0.2)
    engine.delete(job.jid)
    return dumped.duration_s, restored.duration_s


def ctr_raw(ctr: Ctr, base: Path, run: int) -> Timing:
    """ctr by hand, with the same CRIU config file (nftables lock) our containers get."""
    cid, ref = f"craw{run}", f"localhost/bench-ckpt:{run}"
    conf = write_criu_config(base / f"craw{run}.conf")
    ctr.call("run", "--detach", "--null-io", "--annotation", f"{CRIU_CONFIG_ANNOTATION}={conf}", IMAGE, cid)
    time.sleep(0.3)
    with timer() as dump:
        ctr.call("containers", "checkpoint", "--task", "--rw", cid, ref)
    ctr.remove(cid)
    with timer() as restore:
        ctr.call("containers", "restore", "--live", "--rw", cid, ref)
    ctr.remove(cid)
    ctr.call("images", "rm", ref)
    return dump[0], restore[0]


def measure(repeat: int, one: Callable[[int], Timing]) -> dict[str, float]:
    runs = [one(i) for i in range(repeat)]
    return {
        "dump_s": statistics.median(d for d, _ in runs),
        "restore_s": statistics.median(r for _, r in runs),
    }


def bench_runc(base: Path, engine: Engine, repeat: int) -> dict[str, dict[str, float]]:
    counter = bundle(base / "bundle", busybox_rootfs(base / "rootfs"))  # counts to stdout
    rows = {"runc raw": measure(repeat, lambda i: runc_raw(base, counter, i))}
    for comp in (Compression.none, Compression.zstd):
        req = lambda i, c=comp: RuncRunRequest(cmd=["runc"], bundle=str(counter), container=f"o{c.value}{i}")  # noqa: E731
        rows[f"runc ours {comp.value}"] = measure(repeat, lambda i, r=req, c=comp: ours(engine, "runc", r(i), c))
    return rows


def bench_ctr(base: Path, engine: Engine, repeat: int) -> dict[str, dict[str, float]]:
    (base / "containerd").mkdir()
    daemon = start_containerd(base / "containerd")
    try:
        ctr = Ctr(str(base / "containerd" / "containerd.sock"), f"bench-{base.name}")  # runc state is per namespace
        os.environ.update(CONTAINERD_ADDRESS=ctr.address, CONTAINERD_NAMESPACE=ctr.namespace)
        (base / "oci").mkdir()
        archive = oci_image(base / "rootfs", base / "oci" / "image", SCRIPT)
        ctr.call("images", "import", "--base-name", IMAGE.rsplit(":", 1)[0], str(archive))
        rows = {"ctr raw": measure(repeat, lambda i: ctr_raw(ctr, base, i))}
        req = lambda i: ContainerdRunRequest(cmd=["ctr"], image=IMAGE, container=f"co{i}")  # noqa: E731
        rows["ctr ours zstd"] = measure(repeat, lambda i: ours(engine, "containerd", req(i), Compression.zstd))
        for cid in ctr.containers():
            ctr.remove(cid)
        return rows
    finally:
        daemon.terminate()
        daemon.wait(10)
        with contextlib.suppress(OSError):  # containerd's runc state dir of our namespace, empty by now
            os.rmdir(f"/run/containerd/runc/bench-{base.name}")


def report(rows: dict[str, dict[str, float]]) -> None:
    print(f"{'mode':<16} {'dump s':>8} {'restore s':>10} {'dump/raw':>9} {'restore/raw':>12}")
    for mode, row in rows.items():
        raw = rows[f"{mode.split()[0]} raw"]
        ratios = row["dump_s"] / raw["dump_s"], row["restore_s"] / raw["restore_s"]
        print(f"{mode:<16} {row['dump_s']:8.3f} {row['restore_s']:10.3f} {ratios[0]:9.2f} {ratios[1]:12.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="cedana-bench-containers-"))
    os.environ["CEDANA_RAY_HOME"] = str(base / "home")
    engine = Engine(Paths(base / "home"))
    try:
        rows = bench_runc(base, engine, args.repeat)
        if all(shutil.which(b) for b in ("containerd", "ctr", "umoci")):
            rows |= bench_ctr(base, engine, args.repeat)
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
