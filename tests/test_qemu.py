"""The qemu plugin with real QEMU under TCG: a small guest (scripts/build-vm-guest.sh) that
counts on its serial console with a running checksum, run, dumped, restored, cloned, frozen,
queried; and its error paths through the CLI."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from cedana_ray.plugins.qemu import guest, pace
from cedana_ray.plugins.qemu.live import BANDWIDTH_ENV, QemuLive
from cedana_ray.plugins.qemu.plugin import QemuRunRequest, vm_request
from ray.cluster_utils import Cluster as RayCluster
from test_cli import STAGE_LINE, assert_one_error, cedana
from test_process_criu import wait_for
from test_store import SIGNER, manifest_fields

from cedana_ray.cli.index import alias_vm
from cedana_ray.cluster import Cluster
from cedana_ray.config import Paths
from cedana_ray.engine import Engine
from cedana_ray.errors import CedanaError, CorruptCheckpoint, DumpError, RestoreError, StorageError, UsageError
from cedana_ray.failpoint import ENV as FAILPOINT
from cedana_ray.features import compute
from cedana_ray.models import Compression, EventKind, Job, JobState
from cedana_ray.plugins_manager import get_plugin_manager
from cedana_ray.remote import call
from cedana_ray.requests import DumpRequest, MigrateRequest, RestoreRequest, RunRequest
from cedana_ray.store import CheckpointStore

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow]
LINE = re.compile(r"count=(\d+) sum=(\d+) boot=(\w+)")
MODULUS = 1_000_000_007  # the guest's checksum: sum = (sum * 31 + count) mod this
MiB = 1 << 20
BOOT_TIMEOUT_S = 90.0  # a kernel boot under TCG, on a busy 2-core machine


@pytest.fixture(scope="session")
def vm_guest() -> Path:
    """The guest's kernel and initramfs, built once and cached by content hash across runs."""
    assert shutil.which(guest.QEMU), f"{guest.QEMU} not installed: `make setup` installs it"
    out = Path(tempfile.gettempdir()) / "cedana-ray-vm-guest"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "build-vm-guest.sh"), str(out)], capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    return out


@pytest.fixture
def engine(home: Path) -> Engine:
    return Engine(Paths(home))


def counter_vm(vm_guest: Path, jid: str) -> QemuRunRequest:
    vm = guest.Vm(memory="128M", initrd=True)  # the Debian kernel does not boot in less than ~96M
    kernel, initrd = str(vm_guest / "vmlinuz"), str(vm_guest / "initrd.cpio.gz")
    return QemuRunRequest(cmd=["qemu"], jid=jid, kernel=kernel, initrd=initrd, vm=vm)


def boot(engine: Engine, vm_guest: Path, jid: str = "vm") -> str:
    engine.run("qemu", counter_vm(vm_guest, jid))
    wait_for(lambda: len(counts(engine, jid)) >= 3, BOOT_TIMEOUT_S, f"{jid} to count")
    return jid


def parse(text: str) -> list[tuple[int, int, str]]:
    """(count, sum, boot id) of every line the guest printed."""
    return [(int(m[1]), int(m[2]), m[3]) for m in LINE.finditer(text)]


def counts(engine: Engine, jid: str) -> list[tuple[int, int, str]]:
    return parse(Path(engine.log_path(jid)).read_text(errors="replace"))


def last(engine: Engine, jid: str) -> int:
    return counts(engine, jid)[-1][0]


def counted_past(engine: Engine, jid: str, past: int) -> int:
    """Wait until the guest counted 3 past ``past``; its count then."""
    return wait_for(lambda: last(engine, jid) >= past + 3 and last(engine, jid), 60, f"{jid} past {past}")  # type: ignore[return-value]


def assert_unbroken(lines: list[tuple[int, int, str]], start: tuple[int, int] = (0, 0)) -> None:
    """One boot, counting on by one from ``start`` (count, sum), each sum what the one
    before it gives: nothing lost, repeated or restarted."""
    count, total = start
    assert len({boot for _, _, boot in lines}) == 1, "the guest rebooted"
    for n, s, _ in lines:
        assert (n, s) == (count + 1, (total * 31 + count + 1) % MODULUS), f"after count={count}: {n} {s}"
        count, total = n, s


def gone(pid: int | None) -> bool:
    return pid is None or not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("compression", [Compression.none, Compression.zstd], ids=["in place", "staged, cas"])
def test_dump_stops_restore_goes_on(engine: Engine, vm_guest: Path, compression: Compression) -> None:
    """In place (the store's files are QEMU's), or staged: the state cut into chunks, each
    stored and its staged bytes given back while QEMU writes."""
    jid = boot(engine, vm_guest)
    pid = engine.job(jid).pid
    stored = engine.dump(jid, DumpRequest(compression=compression))
    assert (stored.size_bytes < stored.image_bytes) is (compression is Compression.zstd)
    assert engine.job(jid).state is JobState.checkpointed
    assert gone(pid)
    dumped = last(engine, jid)

    restored = engine.restore(RestoreRequest(), jid=jid).job
    assert restored.state is JobState.running and restored.pid != pid
    counted_past(engine, jid, dumped)
    assert_unbroken(counts(engine, jid))  # one log: before the dump, then after the restore


def test_the_staged_state_is_paced_by_the_store(tmp_path: Path) -> None:
    """pace.py, as QEMU's migration writer into a staged image dir: with the store freeing each
    chunk it stored, the file never takes much more than its limit, and the checkpoint is the
    whole stream."""
    store = CheckpointStore(f"file://{tmp_path / 'store'}", SIGNER)
    folder = store.dump_dir("c1", Compression.zstd, tmp_path / "staging")
    data, most, peak = os.urandom(96 * MiB), 32 * MiB, 0
    with store.early_chunks(folder, "c1", Compression.zstd, None, 2, release=True) as early:
        argv = [sys.executable, pace.__file__, str(folder / guest.STATE), str(most)]
        writer = subprocess.Popen(argv, stdin=subprocess.PIPE)
        assert writer.stdin
        feeding = threading.Thread(target=lambda: (writer.stdin.write(data), writer.stdin.close()))  # type: ignore[union-attr]
        feeding.start()
        while writer.poll() is None:
            with contextlib.suppress(FileNotFoundError):
                peak = max(peak, (folder / guest.STATE).stat().st_blocks * 512)
            time.sleep(0.002)
        feeding.join()
    assert writer.returncode == 0
    assert 0 < peak <= most + pace.BLOCK, peak
    store.commit(folder, manifest_fields("c1"), compression=Compression.zstd, prehashed=early)
    assert (store.fetch("c1", tmp_path / "out")[1] / guest.STATE).read_bytes() == data


def test_a_staged_disk_keeps_its_holes(tmp_path: Path) -> None:
    """A disk staged by pace.write: the same bytes, its blocks of zeros holes (a tail of zeros too)."""
    source = tmp_path / "disk"
    source.write_bytes(os.urandom(MiB) + bytes(3 * MiB) + os.urandom(MiB) + bytes(2 * MiB + 5))
    with source.open("rb") as f:
        pace.write(f.fileno(), str(tmp_path / "staged"), None)
    staged = tmp_path / "staged"
    assert staged.read_bytes() == source.read_bytes()
    assert staged.stat().st_blocks * 512 <= 2 * MiB + 4096


def test_a_staged_state_nothing_frees_is_written_all_the_same(tmp_path: Path) -> None:
    """Where nothing frees what was stored (a store that failed, a filesystem without holes),
    pace.py waits STALL_S, then writes on: the dump ends, as the store's error says."""
    data = os.urandom(4 * MiB)
    start = time.monotonic()
    done = subprocess.run([sys.executable, pace.__file__, str(tmp_path / "state"), str(MiB)], input=data)
    assert done.returncode == 0 and (tmp_path / "state").read_bytes() == data
    assert time.monotonic() - start >= pace.STALL_S


def test_the_python_api_runs_a_vm(home: Path, vm_guest: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``submit`` with the plugin's ``vm_request``, then the handle's verbs."""
    import cedana_ray

    monkeypatch.setattr("cedana_ray.api._backend", None)  # put back afterwards: init() sets it
    cedana_ray.init(local=True)
    request = vm_request(vm_guest / "vmlinuz", initrd=vm_guest / "initrd.cpio.gz", memory="128M", jid="vm-api")
    job = cedana_ray.submit("qemu", request, storage=f"file://{home}/elsewhere")
    log = lambda: parse(job.logs())  # noqa: E731
    wait_for(lambda: len(log()) >= 3, BOOT_TIMEOUT_S, "the VM to count")
    assert job.dump().path.startswith(f"file://{home}/elsewhere/") and job.status is JobState.checkpointed
    assert job.restore().job.state is JobState.running
    counts_on(log, "the VM counting after its restore")
    assert job.kill().state is JobState.killed
    with pytest.raises(UsageError, match=r"--kernel .*no such readable file"):
        vm_request(vm_guest / "nonexistent")


def test_leave_running_goes_on_and_its_clone_from_the_dump(engine: Engine, vm_guest: Path) -> None:
    jid = boot(engine, vm_guest)
    before = last(engine, jid)
    ckpt = engine.dump(jid, DumpRequest(leave_running=True)).checkpoint
    assert engine.job(jid).state is JobState.running
    after = last(engine, jid)
    counted_past(engine, jid, after)

    engine.restore(RestoreRequest(checkpoint=ckpt, jid="clone"))
    clone = counts(engine, "clone") or wait_for(lambda: counts(engine, "clone"), 60, "the clone to count")
    first = clone[0][0]  # type: ignore[index]
    assert before < first <= after + 1  # from where the original was when dumped
    original = {n: (s, boot) for n, s, boot in counts(engine, jid)}
    assert_unbroken(counts(engine, "clone"), (first - 1, original[first - 1][0]))
    assert counts(engine, "clone")[0][2] == original[first][1]  # the same boot, not a new one
    assert_unbroken(counts(engine, jid))


def test_freeze_unfreeze_and_a_frozen_dump(engine: Engine, vm_guest: Path) -> None:
    jid = boot(engine, vm_guest)
    engine.freeze(jid)
    assert engine.query("qemu")[0]["status"] == "paused"
    frozen_at = last(engine, jid)
    time.sleep(1.0)  # five counts, were it counting
    assert last(engine, jid) == frozen_at
    engine.unfreeze(jid)
    assert engine.query("qemu")[0]["status"] == "running"
    counted_past(engine, jid, frozen_at)

    # frozen when dumped, frozen when restored; from an uncompressed checkpoint, which the
    # core verifies while the restore reads it
    engine.freeze(jid)
    engine.dump(jid, DumpRequest(compression=Compression.none))
    dumped = last(engine, jid)
    assert engine.restore(RestoreRequest(), jid=jid).job.state is JobState.frozen
    time.sleep(1.0)
    assert last(engine, jid) == dumped
    engine.unfreeze(jid)
    counted_past(engine, jid, dumped)
    assert_unbroken(counts(engine, jid))


@pytest.mark.parametrize("compression", [Compression.none, Compression.zstd], ids=["in place", "staged, paced"])
def test_a_failed_dump_resumes_the_vm(
    engine: Engine, vm_guest: Path, small_disk: Path, compression: Compression
) -> None:
    """The store fails (a real 16 MiB filesystem fills up): in place, as QEMU writes into it;
    staged, while the paced writer waits for the store; the dump's rollback resumes the
    guest, which QEMU had paused."""
    jid = boot(engine, vm_guest)
    with pytest.raises((DumpError, StorageError), match=r"No space left|ENOSPC"):
        engine.dump(jid, DumpRequest(storage=f"file://{small_disk}", compression=compression))
    assert engine.job(jid).state is JobState.running
    assert engine.query("qemu")[0]["status"] == "running"
    counted_past(engine, jid, last(engine, jid))
    assert_unbroken(counts(engine, jid))


def test_a_dump_killed_after_it_paused_the_vm_resumes_it(
    engine: Engine, vm_guest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dumping process dies (SIGKILL) once the checkpoint is stored, before it stops the
    VM: the next command keeps the checkpoint and lets the paused guest go on."""
    jid = boot(engine, vm_guest)
    monkeypatch.setenv(FAILPOINT, "dump:committed")
    killed = cedana("dump", "job", jid, "--local")
    monkeypatch.delenv(FAILPOINT)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    ps = json.loads(cedana("ps", "--local", "--json").stdout)
    assert [j["state"] for j in ps if j["jid"] == jid] == ["running"]
    assert engine.query("qemu")[0]["status"] == "running"
    counted_past(engine, jid, last(engine, jid))
    assert_unbroken(counts(engine, jid))
    assert len(engine.checkpoints(jid)) == 1


def no_vm_running(engine: Engine, jid: str) -> bool:
    """The job is still its checkpoint, and no QEMU answers for it."""
    return engine.job(jid).state is JobState.checkpointed and [r["status"] for r in engine.query("qemu")] == [None]


def test_a_failed_restore_leaves_the_checkpoint_intact(
    engine: Engine, vm_guest: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A state file with one byte flipped in the store is refused before QEMU reads it; a QEMU
    that fails to start fails the restore. Neither leaves a VM running or harms the checkpoint,
    from which the VM then restores and counts on."""
    jid = boot(engine, vm_guest)
    ckpt = engine.dump(jid, DumpRequest(compression=Compression.none))  # read in place on restore
    dumped = last(engine, jid)
    state = Path(ckpt.path.removeprefix("file://")) / "data" / guest.STATE
    good = state.read_bytes()
    state.write_bytes(good[:4096] + bytes([good[4096] ^ 1]) + good[4097:])
    with pytest.raises(CorruptCheckpoint):
        engine.restore(RestoreRequest(), jid=jid)
    assert no_vm_running(engine, jid)
    state.write_bytes(good)

    failing = tmp_path / "qemu"
    failing.write_text("#!/bin/sh\necho 'qemu: cannot start' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv(guest.QEMU_ENV, str(failing))
    with pytest.raises(RestoreError, match="qemu: cannot start"):  # QEMU's own word, from qemu.err
        engine.restore(RestoreRequest(), jid=jid)
    monkeypatch.delenv(guest.QEMU_ENV)
    assert no_vm_running(engine, jid)

    assert engine.restore(RestoreRequest(), jid=jid).job.state is JobState.running
    counted_past(engine, jid, dumped)
    assert_unbroken(counts(engine, jid))


def test_checkpoint_policy_of_a_vm(engine: Engine, vm_guest: Path) -> None:
    """``--checkpoint-every 2s --keep 2``: checkpoints leave the guest counting."""
    request = counter_vm(vm_guest, "vm").model_copy(update={"checkpoint_every": 2.0, "keep": 2})
    engine.run("qemu", request)
    seen: set[str] = set()

    def three_made() -> bool:
        seen.update(c.checkpoint for c in engine.checkpoints("vm"))
        return len(seen) >= 3

    wait_for(lambda: len(counts(engine, "vm")) >= 3, BOOT_TIMEOUT_S, "vm to count")  # booted, between dumps
    wait_for(three_made, BOOT_TIMEOUT_S, "three policy checkpoints")
    assert engine.job("vm").state is JobState.running
    counted_past(engine, "vm", last(engine, "vm"))
    assert_unbroken(counts(engine, "vm"))
    # a new checkpoint is stored before the oldest goes: K+1 for a moment, K once it stops
    engine.kill("vm")  # no more periodic dumps; one in flight finishes with its pruning
    wait_for(lambda: len(engine.checkpoints("vm")) == 2, BOOT_TIMEOUT_S, "--keep 2 pruning the rest")


def disk_image(path: Path) -> Path:
    """A 4 MiB raw disk whose first sector holds a marker line, the rest zeros."""
    with open(path, "wb") as f:
        f.write(b"marker=cedana\n")
        f.truncate(4 << 20)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def disk_lines(image: Path, upto: int) -> list[tuple[int, int, str]]:
    """The count lines the guest wrote to sectors 1..upto of its disk (count N in sector N)."""
    data = image.read_bytes()
    return parse(b"".join(data[n * 512 : (n + 1) * 512] for n in range(1, upto + 1)).decode(errors="replace"))


def as_format(image: Path, fmt: str) -> Path:
    """``image`` (raw) converted to ``fmt`` by qemu-img; itself for raw."""
    if fmt == "raw":
        return image
    converted = image.with_suffix(f".{fmt}")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, str(image), str(converted)], check=True)
    return converted


@pytest.mark.parametrize(
    ("fmt", "compression"),
    [("raw", Compression.none), ("qcow2", Compression.zstd)],
    ids=["raw, copied into the store", "qcow2, staged"],
)
def test_a_vm_with_a_disk_restores_with_it(
    engine: Engine, vm_guest: Path, tmp_path: Path, fmt: str, compression: Compression
) -> None:
    """The guest writes each count's line to its disk before printing it. A leave-running
    dump, then a dump that stops it, then a restore: every line printed before the dump is on
    the restored disk, the guest goes on writing, and the user's image was never written."""
    image = as_format(disk_image(tmp_path / "disk.img"), fmt)
    digest = sha256(image)
    jid = f"vm-disk-{fmt}"
    engine.run("qemu", counter_vm(vm_guest, jid).model_copy(update={"disk": str(image)}))
    wait_for(lambda: len(counts(engine, jid)) >= 3, BOOT_TIMEOUT_S, f"{jid} to count")
    assert "disk: marker=cedana" in Path(engine.log_path(jid)).read_text(errors="replace")

    engine.dump(jid, DumpRequest(leave_running=True))  # the guest's disk writable again after it
    counted_past(engine, jid, last(engine, jid))
    result = engine.dump(jid, DumpRequest(compression=compression))
    dumped = last(engine, jid)
    assert engine.inspect(result.checkpoint).details["vm"]["disk"] == fmt

    restored = engine.restore(RestoreRequest(), jid=jid).job
    now = counted_past(engine, jid, dumped)
    lines = counts(engine, jid)
    assert_unbroken(lines)
    disk = Path(engine.log_path(jid)).parent / guest.DISK
    as_raw = tmp_path / "restored.raw"  # read while the guest runs: QEMU wrote each line through
    subprocess.run(["qemu-img", "convert", "-U", "-f", fmt, "-O", "raw", str(disk), str(as_raw)], check=True)
    assert disk_lines(as_raw, now) == lines[:now]  # on the disk: before the dump, and since
    assert restored.details["vm"]["disk"] == fmt
    assert sha256(image) == digest


def test_a_vm_with_a_disk_does_not_migrate_live() -> None:
    vm = guest.Vm(memory="128M", initrd=True, disk="raw")
    details = {"vm": vm.model_dump()}
    job = Job(jid="vm-disk", type="qemu", state=JobState.running, log="/nonexistent/log", details=details)
    with pytest.raises(UsageError, match="VM vm-disk has a disk: it does not migrate live"):
        QemuLive().outgoing(job)


def test_health_and_features() -> None:
    pm = get_plugin_manager()
    checks = {c.name: c for c in pm.call_for("qemu", "cedana_health_checks")}
    assert checks["qemu"].ok and checks["qemu"].detail.startswith("QEMU ")
    assert checks["accelerator"].ok  # TCG at least, whatever KVM is
    matrix = compute(pm)
    rows = ("Run handler (serverless)", "Dump VM handler", "Restore VM handler", "Freeze handler", "Query handler")
    rows += ("Live migration",)
    for row in rows:
        assert matrix.features[row]["qemu"] == "implemented", row


# -- errors, one line each, before anything starts


def test_missing_kernel(home: Path) -> None:
    line = assert_one_error(cedana("run", "qemu", "--kernel", str(home / "nope")), UsageError)
    assert "--kernel" in line and "no such readable file" in line


def test_vm_names_the_one_vm_type_installed(home: Path) -> None:
    """``run vm``, ``dump vm``...: qemu's commands, the one VM type here; with two, neither is ``vm``."""
    line = assert_one_error(cedana("run", "vm", "--kernel", str(home / "nope")), UsageError)
    assert "--kernel" in line and "no such readable file" in line
    for group in ("run", "dump", "restore", "freeze", "unfreeze", "query"):
        assert re.search(r"^  vm +\S", cedana(group, "--help").stdout, re.M), group
    two = {"run": {name: {"help": name, "plugin": name, "target": f"{name}:plugin"} for name in ("qemu", "other")}}
    alias_vm(two, ["qemu", "other"])
    assert set(two["run"]) == {"qemu", "other"}


def test_a_kernel_qemu_refuses(home: Path, tmp_path: Path) -> None:
    (tmp_path / "vmlinuz").write_text("not a kernel\n")
    line = assert_one_error(cedana("run", "qemu", "--kernel", str(tmp_path / "vmlinuz")), UsageError)
    assert "QEMU could not start the VM: qemu: invalid kernel header" in line
    assert "qemu" not in cedana("ps").stdout  # no job was made


@pytest.mark.skipif(guest.kvm_unusable() is None, reason="KVM is usable here")
def test_kvm_refused_where_unusable(home: Path, vm_guest: Path) -> None:
    line = assert_one_error(cedana("run", "qemu", "--kernel", str(vm_guest / "vmlinuz"), "--kvm"), UsageError)
    assert "--kvm: KVM is unusable here" in line


def test_a_disk_that_is_not_a_readable_file(home: Path, vm_guest: Path, tmp_path: Path) -> None:
    kernel = str(vm_guest / "vmlinuz")
    for bad in (tmp_path / "nope.img", tmp_path):  # missing, a directory
        line = assert_one_error(cedana("run", "qemu", "--kernel", kernel, "--disk", str(bad)), UsageError)
        assert f"--disk {bad}: no such readable file" in line
    backed = tmp_path / "backed.qcow2"  # a qcow2 header whose backing_file_offset is set
    backed.write_bytes(guest.QCOW2_MAGIC + (3).to_bytes(4, "big") + (512).to_bytes(8, "big") + bytes(496))
    line = assert_one_error(cedana("run", "qemu", "--kernel", kernel, "--disk", str(backed)), UsageError)
    assert "a qcow2 with a backing file is not supported" in line
    assert "qemu" not in cedana("ps").stdout  # no job was made
    standalone = tmp_path / "plain.qcow2"
    standalone.write_bytes(guest.QCOW2_MAGIC + (3).to_bytes(4, "big") + bytes(504))
    assert guest.require_disk(standalone)[1] == "qcow2"
    assert guest.require_disk(disk_image(tmp_path / "raw.img"))[1] == "raw"


def test_vm_and_process_checkpoints_do_not_mix(engine: Engine, vm_guest: Path) -> None:
    jid = boot(engine, vm_guest)
    dumped = cedana("dump", "qemu", jid, "--json")  # the kit's command: a VM is named by its job id
    assert dumped.returncode == 0, dumped.stderr
    path = json.loads(dumped.stdout)["path"]
    line = assert_one_error(cedana("restore", "process", "--path", path, "--jid", "p"), UsageError)
    assert "is of a qemu job, not process" in line

    engine.run("process", RunRequest(cmd=["sleep", "600"], jid="sleeper"))
    path = engine.dump("sleeper", DumpRequest()).path
    line = assert_one_error(cedana("restore", "qemu", "--path", path, "--jid", "v"), UsageError)
    assert "is of a process job, not qemu" in line


# -- a cluster


@pytest.fixture(scope="module")
def vm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    """Two raylets on this machine with cedana-ray up (test_cluster's)."""
    from test_cluster import NODE_ARGS, cedana_cluster

    # a live migration's stream throttled to 16 MiB/s (the guest's ~70 MB take ~4 s): long
    # enough to kill its target midway
    env = {BANDWIDTH_ENV: str(16 << 20)}
    with cedana_cluster(tmp_path_factory.mktemp("vm-cluster"), [NODE_ARGS, NODE_ARGS], env) as cluster:
        yield cluster


@pytest.mark.ray
@pytest.mark.timeout(300)
@pytest.mark.parametrize("through_store", [True, False], ids=["through-the-store", "direct"])
def test_a_vm_migrates_between_raylets_and_goes_on(vm_cluster: RayCluster, vm_guest: Path, through_store: bool) -> None:
    """Frozen (QMP stop) on its node, dumped (through the store, or its images sent straight to
    the other node), restored frozen on the other, resumed there; the checkpoint kept."""
    client = Cluster(vm_cluster.address)
    jid = f"vm-mig-{through_store}".lower()  # a killed job keeps its name
    _, log, target = start_counting(client, vm_guest, jid)
    moved = client.migrate(jid, target, MigrateRequest(through_store=through_store))
    assert moved.route == ("store" if through_store else "direct") and moved.checkpoint
    assert moved.job.node == target and client.job(jid).state is JobState.running
    assert client.job(jid).last_checkpoint == moved.checkpoint
    counts_on(log, "the VM counting on its new node")
    client.kill(jid)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_draining_node_moves_its_vm(vm_cluster: RayCluster, vm_guest: Path) -> None:
    client = Cluster(vm_cluster.address)
    job, log, target = start_counting(client, vm_guest, "vm-drain")
    try:
        [moved] = [m for m in client.drain(job.node) if m.jid == "vm-drain"]
        assert moved.target == target and client.job("vm-drain").node == target
        counts_on(log, "the VM counting on its new node")
    finally:
        client.undrain(job.node)
        client.kill("vm-drain")


def start_counting(
    client: Cluster, vm_guest: Path, jid: str
) -> tuple[Job, Callable[[], list[tuple[int, int, str]]], str]:
    """A counter VM running on a node of the cluster; its job, its log's lines, another node for VMs."""
    job = client.run("qemu", counter_vm(vm_guest, jid))
    log = lambda: parse(client.read_log(jid, 0, 1 << 24).decode(errors="replace"))  # noqa: E731
    wait_for(lambda: len(log()) >= 3, BOOT_TIMEOUT_S, "the VM to count")
    ready = lambda: [n.node for n in client.nodes() if n.node != job.node and "qemu" in n.types and not n.error]  # noqa: E731
    return job, log, wait_for(ready, 60, "another node for VMs")[0]  # type: ignore[index]


def counts_on(log: Callable[[], list[tuple[int, int, str]]], what: str) -> None:
    """Wait until the guest counted 3 more in ``log``; all of it one unbroken count."""
    at = log()[-1][0]
    wait_for(lambda: log()[-1][0] >= at + 3, 60, what)
    assert_unbroken(log())


def qemus_under(folder: Path) -> list[psutil.Process]:
    """The QEMUs running in a job dir under ``folder`` (a node's home)."""
    found = []
    for p in psutil.process_iter(["name"]):
        with contextlib.suppress(psutil.Error):
            if p.info["name"] == "qemu-system-x86_64" and Path(p.cwd()).is_relative_to(folder):
                found.append(p)
    return found


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_vm_migrates_live_between_raylets(vm_cluster: RayCluster, vm_guest: Path) -> None:
    """`migrate --live --json`: QEMU's pre-copy migration over TLS; the guest counts on
    there, nothing lost; QEMU's downtime reported; the source's QEMU gone."""
    client = Cluster(vm_cluster.address)
    job, log, target = start_counting(client, vm_guest, "vm-live")
    moved = cedana("migrate", "vm-live", "--to", target, "--live", "--json", timeout=120)
    assert moved.returncode == 0, moved.stderr
    result = json.loads(moved.stdout)
    assert result["route"] == "live" and result["checkpoint"] is None
    assert result["target"] == target and result["job"]["node"] == target
    assert 0 <= result["downtime_s"] < 2.0  # QEMU's, in ms: it aims at 300 ms for the last copy
    assert result["downtime_s"] < result["duration_s"]
    assert gone(job.pid)  # the source's QEMU, paused for good, quit
    assert client.job("vm-live").state is JobState.running and client.job("vm-live").pid != job.pid
    counts_on(log, "the VM counting on its new node")  # its log carried over, the console's lines in order
    migrated = [e for e in client.events("vm-live") if e.kind is EventKind.migrated][-1]
    assert migrated.detail["route"] == "live" and migrated.detail["downtime_s"] == result["downtime_s"]
    assert not any(client.checkpoints("vm-live"))  # no checkpoint in between

    back = cedana("migrate", "vm-live", "--to", job.node, "--live", timeout=120)  # a target, now a source
    assert back.returncode == 0, back.stderr
    assert "moved live" in back.stdout and client.job("vm-live").node == job.node
    sent = [line for line in back.stderr.splitlines() if line.startswith("live: ")]  # its progress, as it went
    assert len(sent) == 1 and STAGE_LINE.match(sent[0]) and " MiB at " in sent[0], back.stderr
    counts_on(log, "the VM counting back on its first node")
    client.kill("vm-live")


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_failed_live_migration_leaves_the_vm_running_on_its_source(vm_cluster: RayCluster, vm_guest: Path) -> None:
    """The target's QEMU killed midway: the migration fails, the guest runs on where it was,
    nothing of it is left on the target."""
    client = Cluster(vm_cluster.address)
    job, log, target = start_counting(client, vm_guest, "vm-live-fail")
    target_home = Path(call(client.coordinator.info.remote())["base"]) / "nodes" / target
    errors: list[BaseException] = []

    def migrate() -> None:
        try:
            client.migrate("vm-live-fail", target, live=True)
        except BaseException as exc:
            errors.append(exc)

    migrating = threading.Thread(target=migrate)
    migrating.start()
    waiting = wait_for(lambda: qemus_under(target_home), 60, "the target's QEMU")[0]  # type: ignore[index]
    time.sleep(1.5)  # into the stream, which takes ~4 s
    waiting.kill()
    migrating.join(120)
    assert errors and isinstance(errors[0], CedanaError), errors
    now = client.job("vm-live-fail")
    assert now.node == job.node and now.pid == job.pid and now.state is JobState.running
    counts_on(log, "the VM counting on where it was")
    assert b"qemu-system" not in client.read_log("vm-live-fail", 0, 1 << 24)  # QEMU's own are in qemu.err
    assert not (target_home / "jobs" / "vm-live-fail").exists()
    assert not qemus_under(target_home)
    client.kill("vm-live-fail")


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_live_migration_is_for_vm_jobs(vm_cluster: RayCluster) -> None:
    client = Cluster(vm_cluster.address)
    job = client.run("process", RunRequest(cmd=["sleep", "600"], jid="not-a-vm"))
    other = next(n.node for n in client.nodes() if n.node != job.node)
    line = assert_one_error(cedana("migrate", "not-a-vm", "--to", other, "--live"), UsageError)
    assert "job not-a-vm is a process job: only VM jobs (qemu) migrate live" in line
    assert client.job("not-a-vm").node == job.node
    line = assert_one_error(cedana("migrate", "not-a-vm", "--to", other, "--live", "--through-store"), UsageError)
    assert "--live sends no images" in line
    client.kill("not-a-vm")


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_vm_policy_on_a_cluster(vm_cluster: RayCluster, vm_guest: Path) -> None:
    """``checkpoint_every`` through the coordinator: checkpoints every 2 s, two kept, the guest
    counting on unbroken through them."""
    client = Cluster(vm_cluster.address)
    request = counter_vm(vm_guest, "vm-policy").model_copy(update={"checkpoint_every": 2.0, "keep": 2})
    client.run("qemu", request)
    log = lambda: parse(client.read_log("vm-policy", 0, 1 << 24).decode(errors="replace"))  # noqa: E731
    wait_for(lambda: len(log()) >= 3, BOOT_TIMEOUT_S, "the VM to count")  # booted, between checkpoints
    before = {c.checkpoint for c in client.checkpoints("vm-policy")}
    seen: set[str] = set()

    def three_made_two_kept() -> bool:
        now = {c.checkpoint for c in client.checkpoints("vm-policy")}
        seen.update(now - before)
        return len(seen) >= 3 and len(now) == 2

    wait_for(three_made_two_kept, BOOT_TIMEOUT_S, "three policy checkpoints while it counts, two kept")
    assert client.job("vm-policy").state is JobState.running
    counts_on(log, "the VM counting on")
    client.kill("vm-policy")


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_vm_on_a_lost_node_is_restored_elsewhere(vm_cluster: RayCluster, vm_guest: Path) -> None:
    """``restore_on_loss``: its node gone, QEMU with it, the VM comes back on another node from
    its last checkpoint and counts on from where that left it, in the same boot."""
    from test_cluster import NODE_ARGS

    client = Cluster(vm_cluster.address)
    victim = vm_cluster.add_node(**NODE_ARGS).node_id
    ready = lambda: any(n.node == victim and "qemu" in n.types and not n.error for n in client.nodes())  # noqa: E731
    wait_for(ready, 60, "the new node's agent")
    request = counter_vm(vm_guest, "vm-lost").model_copy(update={"node": victim, "restore_on_loss": True})
    job = client.run("qemu", request)
    log = lambda: parse(client.read_log("vm-lost", 0, 1 << 24).decode(errors="replace"))  # noqa: E731
    wait_for(lambda: len(log()) >= 3, BOOT_TIMEOUT_S, "the VM to count")
    before = log()[-1][0]
    client.dump("vm-lost", DumpRequest(leave_running=True))
    wait_for(lambda: log()[-1][0] >= before + 3, 60, "the VM counting after its checkpoint")
    original = {n: (total, boot) for n, total, boot in log()}
    psutil.Process(job.pid).kill()  # the machine goes down with its node
    vm_cluster.remove_node(next(n for n in vm_cluster.worker_nodes if n.node_id == victim))

    def restored() -> bool:
        now = client.job("vm-lost")
        return now.state is JobState.running and now.node != victim

    wait_for(restored, 120, "the VM restored on another node")
    wait_for(lambda: len(log()) >= 3, 60, "the VM counting there, in a log of its own")
    lines = log()
    first = lines[0][0]
    assert before < first <= max(original), "it resumed from its checkpoint, taken after `before`"
    assert_unbroken(lines, (first - 1, original[first - 1][0]))
    assert lines[0][2] == original[first][1], "the same boot, not a new one"
    lost, back = client.events("vm-lost")[-2:]
    assert (lost.kind, lost.detail["node"]) == (EventKind.lost, victim)
    assert back.kind is EventKind.restored and back.detail["node"] != victim
    client.kill("vm-lost")
