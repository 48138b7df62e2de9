"""Dump and restore of a VM: cedana-ray's ``qemu`` plugin against QEMU's own migration by hand.

The guest of ``scripts/build-vm-guest.sh`` with ``--memory`` of RAM (512M), of which ``--fill``
MiB (384) hold random bytes, counts on its console under TCG. It is checkpointed and restored
``--repeat`` times (3) each way:

* ``raw``: QMP ``stop``, ``migrate`` to ``exec:cat > FILE`` (the throttle lifted, as ours),
  ``quit``; then a new QEMU with ``-S -incoming "exec:cat FILE"``, until the state loaded, and
  ``cont``: what the plugin does, without the store;
* ``ours none`` and ``ours zstd``: :class:`cedana_ray.engine.Engine` ``dump`` then ``restore``
  of a ``qemu`` job in a throwaway ``CEDANA_RAY_HOME`` (chunks, digests, manifest, fsync); with
  the peak of what its dump staged (sampled every 5 ms: the images' allocated bytes in the
  staging areas), which is the whole state for raw and none for ``none`` (QEMU writes into the
  store), and for ``zstd`` what was written but not yet stored (each stored chunk is freed).

Then it is live-migrated ``--repeat`` times back and forth between two QEMUs on this machine:

* ``raw``: by hand, QEMU's own pre-copy migration over TCP, without TLS and with it (the same
  per-migration credentials as ours, made outside the timing): a target QEMU ``-incoming
  defer`` told to listen with ``migrate-incoming``, the source's ``migrate``;
* ``ours``: :mod:`cedana_ray.live`'s steps between two engines, as two nodes' agents run
  them (TLS credentials made and loaded, boot files carried, the log handed over), without
  the coordinator's Ray round trips.

Each reports QEMU's downtime (``query-migrate``) and the total time, from the target's start to
its guest running. After each restore or move the guest must count on from where it stopped.
Prints the median times, the sizes and ours/raw ratios::

    .venv/bin/python bench/vm.py [--memory 512M] [--fill 384] [--repeat 3] [--live-only] [--json]

Everything lives under one temporary directory, removed at the end; every QEMU started here
is killed by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from cedana_ray.plugins.qemu import guest
from cedana_ray.plugins.qemu.plugin import QemuRunRequest
from cedana_ray.plugins.qemu.qmp import Qmp
from rich.console import Console
from rich.table import Table

from cedana_ray import tls
from cedana_ray.config import Paths
from cedana_ray.engine import Engine
from cedana_ray.models import Compression
from cedana_ray.requests import DumpRequest, RestoreRequest
from cedana_ray.staging import staging_bases

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
COUNT = re.compile(rb"count=(\d+) ")
BOOT_TIMEOUT_S = 300.0  # a kernel boot and the fill under TCG on a busy machine
started: list[int] = []  # every QEMU of ours: killed at the end


@dataclass
class Result:
    mode: str
    dump_s: list[float] = field(default_factory=list)
    restore_s: list[float] = field(default_factory=list)
    state_bytes: int = 0  # what QEMU wrote (raw) or the images (ours)
    stored_bytes: int = 0
    staged_peak_bytes: list[int] = field(default_factory=list)  # at most on local disk or in memory during a dump


def wait_for(check: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench/vm.py: timed out waiting for {what}")
        time.sleep(0.05)


def last_count(log: Path) -> int:
    found = COUNT.findall(log.read_bytes())
    return int(found[-1]) if found else 0


def counting_past(log: Path, past: int) -> None:
    wait_for(lambda: last_count(log) >= past + 2, BOOT_TIMEOUT_S, f"the guest to count past {past} ({log})")


def build_guest(base: Path) -> Path:
    out = Path(tempfile.gettempdir()) / "cedana-ray-vm-guest"  # shared with tests/test_qemu.py: cached
    subprocess.run(["bash", str(ROOT / "scripts" / "build-vm-guest.sh"), str(out)], check=True, stdout=sys.stderr)
    return out


def vm_of(args: argparse.Namespace) -> guest.Vm:
    return guest.Vm(memory=args.memory, initrd=True, append=f"{guest.DEFAULT_APPEND} fill={args.fill}")


# -- raw


def raw_start(
    vm: guest.Vm, folder: Path, log: Path, incoming: Path | None = None, defer: bool = False
) -> subprocess.Popen[bytes]:
    (folder / guest.QMP_SOCKET).unlink(missing_ok=True)
    argv = guest.argv(vm, folder, incoming, defer=defer)
    with open(log, "ab") as out, open(os.devnull, "rb") as null:
        proc = subprocess.Popen(argv, cwd=folder, stdin=null, stdout=out, stderr=out)
    started.append(proc.pid)
    wait_for(lambda: (folder / guest.QMP_SOCKET).exists(), 60, "QEMU's QMP socket")
    return proc


def raw(args: argparse.Namespace, files: Path, base: Path) -> Result:
    folder, log, state = base / "raw", base / "raw" / "log", base / "raw-state"
    folder.mkdir()
    for name, source in ((guest.KERNEL, "vmlinuz"), (guest.INITRD, "initrd.cpio.gz")):
        shutil.copyfile(files / source, folder / name)
    vm, result = vm_of(args), Result("raw")
    proc = raw_start(vm, folder, log)
    counting_past(log, 0)
    for _ in range(args.repeat):
        t = time.perf_counter()
        with Qmp(folder / guest.QMP_SOCKET) as qmp:
            qmp.execute("stop")
            qmp.migrate_to_file(state)
            qmp.execute("quit")
        proc.wait()
        result.dump_s.append(time.perf_counter() - t)
        at = last_count(log)
        t = time.perf_counter()
        proc = raw_start(vm, folder, log, incoming=state)
        with Qmp(folder / guest.QMP_SOCKET) as qmp:
            qmp.wait_migration()
            qmp.execute("cont")
        result.restore_s.append(time.perf_counter() - t)
        counting_past(log, at)
    result.state_bytes = result.stored_bytes = state.stat().st_size
    result.staged_peak_bytes = [result.state_bytes]  # QEMU's file is the whole state
    proc.kill()
    return result


# -- ours


def ours(args: argparse.Namespace, files: Path, base: Path, compression: Compression) -> Result:
    home = base / f"home-{compression.value}"
    os.environ["CEDANA_RAY_HOME"] = str(home)
    engine, result = Engine(Paths(home)), Result(f"ours {compression.value}")
    kernel, initrd = str(files / "vmlinuz"), str(files / "initrd.cpio.gz")
    request = QemuRunRequest(cmd=["qemu"], jid="vm", kernel=kernel, initrd=initrd, vm=vm_of(args))
    started.append(engine.run("qemu", request).pid or 0)
    log = Path(engine.log_path("vm"))
    counting_past(log, 0)
    for _ in range(args.repeat):
        with staged_peak(staging_bases(Paths(home).staging)) as peak:
            dumped = engine.dump("vm", DumpRequest(compression=compression))
        result.staged_peak_bytes.append(peak[0])
        result.dump_s.append(dumped.duration_s)
        at = last_count(log)
        restored = engine.restore(RestoreRequest(), jid="vm")
        started.append(restored.job.pid or 0)
        result.restore_s.append(restored.duration_s)
        counting_past(log, at)
        result.state_bytes, result.stored_bytes = dumped.image_bytes, dumped.size_bytes
    engine.kill("vm")
    return result


@contextlib.contextmanager
def staged_peak(bases: list[Path]) -> Iterator[list[int]]:
    """The most bytes allocated at once to this process's staging dirs under ``bases``."""
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            dirs = [d for b in bases for d in b.glob(f"{os.getpid()}-*")]
            files = [f for d in dirs for f in d.rglob("*") if f.is_file()]
            with contextlib.suppress(OSError):  # a file removed meanwhile
                peak[0] = max(peak[0], sum(f.stat().st_blocks * 512 for f in files))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()


# -- live migration: two QEMUs on this machine, the guest moved back and forth


@dataclass
class Live:
    mode: str
    downtime_s: list[float] = field(default_factory=list)  # QEMU's own figure (query-migrate)
    total_s: list[float] = field(default_factory=list)  # target's start to the guest running there
    sent_bytes: int = 0


def live_raw(args: argparse.Namespace, files: Path, base: Path, with_tls: bool) -> Live:
    """By hand: a target QEMU ``-incoming defer`` listening on ``tcp:127.0.0.1:0``, the
    source's ``migrate`` there (throttle lifted), until the target's guest runs; ``with_tls``:
    both with credentials of the migration's own (made outside the timing), as ours."""
    vm, result = vm_of(args), Live(f"raw ({'TLS' if with_tls else 'TCP, no TLS'})")
    folders = [base / f"live-raw-{with_tls}-a", base / f"live-raw-{with_tls}-b"]
    for folder in folders:
        folder.mkdir()
        for name, source in ((guest.KERNEL, "vmlinuz"), (guest.INITRD, "initrd.cpio.gz")):
            shutil.copyfile(files / source, folder / name)
    src = raw_start(vm, folders[0], folders[0] / "log")
    counting_past(folders[0] / "log", 0)
    for i in range(args.repeat):
        a, b = folders[i % 2], folders[(i + 1) % 2]
        at = last_count(a / "log")
        creds = tls.credentials() if with_tls else None
        t = time.perf_counter()
        dst = raw_start(vm, b, b / "log", defer=True)
        with Qmp(b / guest.QMP_SOCKET) as target, Qmp(a / guest.QMP_SOCKET) as source:
            if creds:
                raw_tls(target, source, creds, f"creds{i}")
            target.execute("migrate-incoming", uri="tcp:127.0.0.1:0")
            port = target.execute("query-migrate")["socket-address"][0]["port"]
            source.execute("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
            source.execute("migrate", uri=f"tcp:127.0.0.1:{port}")
            info = source.wait_migration()
            target.wait_migration()
            wait_for(lambda: target.status() == "running", 60, "the target's guest to run")
            result.total_s.append(time.perf_counter() - t)
            source.execute("quit")
        src.wait()
        result.downtime_s.append(info["downtime"] / 1000)
        result.sent_bytes = info["ram"]["transferred"]
        counting_past(b / "log", at)
        src = dst
    src.kill()
    return result


def raw_tls(target: Qmp, source: Qmp, creds: tuple[tls.TlsFiles, tls.TlsFiles], name: str) -> None:
    for qmp, side in zip((target, source), creds, strict=True):
        with tls.written(side) as folder:
            spec = {"qom-type": "tls-creds-x509", "id": name, "dir": str(folder), "endpoint": side.endpoint}
            qmp.execute("object-add", **spec, **{"verify-peer": True})
        qmp.execute("migrate-set-parameters", **{"tls-creds": name})
    source.execute("migrate-set-parameters", **{"tls-hostname": tls.SERVER_NAME})


def live_ours(args: argparse.Namespace, files: Path, base: Path) -> Live:
    """:mod:`cedana_ray.live`'s steps between two engines on this machine, as the two nodes'
    agents run them (without the coordinator's Ray round trips): TLS credentials made, the
    boot files carried, the target started and listening, ``send``, ``adopt`` with the log,
    the source's QEMU gone."""
    from cedana_ray import live

    engines = [Engine(Paths(base / f"home-live-{side}")) for side in "ab"]
    kernel, initrd = str(files / "vmlinuz"), str(files / "initrd.cpio.gz")
    request = QemuRunRequest(cmd=["qemu"], jid="vm", kernel=kernel, initrd=initrd, vm=vm_of(args))
    job = engines[0].run("qemu", request)
    started.append(job.pid or 0)
    counting_past(Path(job.log or ""), 0)
    result = Live("ours (TLS, cedana_ray.live)")
    for i in range(args.repeat):
        a, b = engines[i % 2], engines[(i + 1) % 2]
        job = a.job("vm")
        at = last_count(Path(job.log or ""))
        t = time.perf_counter()
        server, client = tls.credentials()
        incoming = live.receive(b, job, live.outgoing(a, "vm"), server, "127.0.0.1")
        started.append(incoming.job.pid or 0)
        sent = live.send(a, "vm", incoming, client)
        moved = live.adopt(b, incoming.job, Path(job.log or "").read_bytes())
        result.total_s.append(time.perf_counter() - t)
        live.abort(a, job)  # the source's QEMU, paused for good
        result.downtime_s.append(sent.downtime_s)
        result.sent_bytes = sent.transferred_bytes
        counting_past(Path(moved.log or ""), at)
    return result


def live_table(results: list[Live], args: argparse.Namespace) -> Table:
    title = (
        f"VM live migration on this machine, {args.memory} guest, {args.fill} MiB random, TCG, median of {args.repeat}"
    )
    out = Table(title=title)
    for column in ("mode", "downtime ms (QEMU's)", "total s", "sent MiB"):
        out.add_column(column, justify="left" if column == "mode" else "right")
    for r in results:
        downtime, total = statistics.median(r.downtime_s), statistics.median(r.total_s)
        out.add_row(r.mode, f"{downtime * 1000:.0f}", f"{total:.2f}", f"{r.sent_bytes / MiB:.0f}")
    return out


# -- output


def table(results: list[Result], args: argparse.Namespace) -> Table:
    raw_dump, raw_restore = (statistics.median(getattr(results[0], f)) for f in ("dump_s", "restore_s"))
    out = Table(title=f"VM dump/restore, {args.memory} guest, {args.fill} MiB random, TCG, median of {args.repeat}")
    columns = ("mode", "dump s", "restore s", "dump / raw", "restore / raw", "state MiB", "stored MiB", "staged MiB")
    for column in columns:
        out.add_column(column, justify="left" if column == "mode" else "right")
    for r in results:
        dump, restore = statistics.median(r.dump_s), statistics.median(r.restore_s)
        out.add_row(
            r.mode,
            f"{dump:.2f}",
            f"{restore:.2f}",
            f"{dump / raw_dump:.2f}",
            f"{restore / raw_restore:.2f}",
            f"{r.state_bytes / MiB:.0f}",
            f"{r.stored_bytes / MiB:.0f}",
            f"{max(r.staged_peak_bytes) / MiB:.0f}",
        )
    return out


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="cedana-ray-bench-vm-"))
    try:
        yield base
    finally:
        for pid in started:
            with contextlib.suppress(ProcessLookupError, ValueError):
                if pid:
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", default="512M")
    parser.add_argument("--fill", type=int, default=384, help="MiB of random bytes the guest holds")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--live-only", action="store_true", help="only the live migrations")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with scratch() as base:
        files = build_guest(base)
        results = []
        if not args.live_only:
            results = [raw(args, files, base)]
            results += [ours(args, files, base, c) for c in (Compression.none, Compression.zstd)]
        moves = [live_raw(args, files, base, False), live_raw(args, files, base, True), live_ours(args, files, base)]
    if args.json:
        print(json.dumps({"dump_restore": [asdict(r) for r in results], "live": [asdict(m) for m in moves]}, indent=2))
        return
    if results:
        Console().print(table(results, args))
    Console().print(live_table(moves, args))


if __name__ == "__main__":
    main()
