"""The process plugin with real CRIU: dump, kill, restore, and what must survive."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from cedana_ray.config import Paths
from cedana_ray.engine import Engine
from cedana_ray.errors import CorruptCheckpoint, DumpError, StateError, StorageError, UntrustedCheckpoint, UsageError
from cedana_ray.models import Compression, CriuOptions, JobState
from cedana_ray.requests import DumpRequest, ManageRequest, RestoreRequest, RunRequest
from cedana_ray.store import CheckpointStore

pytestmark = pytest.mark.criu

ROOT = Path(__file__).resolve().parents[1]
WORKLOADS = Path(__file__).with_name("workloads")
COUNTER = [sys.executable, str(ROOT / "jobs" / "counter.py"), "0.05"]


def wait_for(check: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def log_lines(engine: Engine, jid: str) -> list[str]:
    return Path(engine.log_path(jid)).read_text().splitlines()


def last_count(engine: Engine, jid: str) -> int:
    counts = [int(m.group(1)) for ln in log_lines(engine, jid) if (m := re.match(r"count=(\d+)", ln))]
    return counts[-1] if counts else -1


def counts_of(engine: Engine, jid: str) -> list[int]:
    return [int(m.group(1)) for ln in log_lines(engine, jid) if (m := re.match(r"count=(\d+)", ln))]


def start(engine: Engine, cmd: list[str], jid: str = "j1", ready: str = "") -> str:
    engine.run("process", RunRequest(cmd=cmd, jid=jid))
    wait_for(lambda: any(ready in ln for ln in log_lines(engine, jid)), what=f"{jid} output")
    return jid


def test_counter_survives_dump_kill_restore(engine: Engine) -> None:
    start(engine, COUNTER, ready="count=5")
    result = engine.dump("j1", DumpRequest())
    assert engine.job("j1").state is JobState.checkpointed
    stopped_at = last_count(engine, "j1")
    time.sleep(0.3)
    assert last_count(engine, "j1") == stopped_at, "the job must be stopped after a dump"

    job = engine.restore(RestoreRequest(), jid="j1").job
    assert job.state is JobState.running and job.last_checkpoint == result.checkpoint
    wait_for(lambda: last_count(engine, "j1") > stopped_at + 5, what="counting after restore")
    counts = counts_of(engine, "j1")
    assert counts == list(range(len(counts))), "counting went on without a restart or a gap"
    assert result.timings and "criu_dump" in result.timings
    assert engine.inspect(result.checkpoint).compression is Compression.none, "a local store's default"


@pytest.mark.parametrize("compression", [c for c in Compression if c is not Compression.none])  # none: above
def test_every_compression_restores(engine: Engine, compression: Compression) -> None:
    start(engine, COUNTER, ready="count=2")
    engine.dump("j1", DumpRequest(compression=compression))
    before = last_count(engine, "j1")
    engine.restore(RestoreRequest(), jid="j1")
    wait_for(lambda: last_count(engine, "j1") > before + 2, what="counting after restore")


def test_large_buffer_checksum_after_restore(engine: Engine) -> None:
    start(engine, [sys.executable, str(WORKLOADS / "buffer.py"), "512"], ready="ready")
    digest = log_lines(engine, "j1")[0].split()[1]
    result = engine.dump("j1", DumpRequest())
    assert result.image_bytes > 512 << 20
    engine.restore(RestoreRequest(), jid="j1")
    n = len(log_lines(engine, "j1"))
    wait_for(lambda: len(log_lines(engine, "j1")) > n, what="a check after restore")
    assert log_lines(engine, "j1")[-1] == f"check {digest}"


@pytest.fixture
def echo_server() -> Iterator[int]:
    """A loopback server that answers each line with the line plus 1000."""
    server = socket.create_server(("127.0.0.1", 0))
    conns: list[socket.socket] = []

    def serve() -> None:
        conn, _ = server.accept()
        conns.append(conn)
        with conn, conn.makefile("rb") as lines:
            for line in lines:
                conn.sendall(f"{int(line) + 1000}\n".encode())

    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.close()
    for c in conns:
        c.close()


def test_established_tcp_connection_survives(engine: Engine, echo_server: int) -> None:
    start(engine, [sys.executable, str(WORKLOADS / "tcp_client.py"), str(echo_server)], ready="sent 3")
    engine.dump("j1", DumpRequest(criu=CriuOptions(tcp_established=True)))
    n = len(log_lines(engine, "j1"))
    engine.restore(RestoreRequest(), jid="j1")
    wait_for(lambda: len(log_lines(engine, "j1")) > n + 3, what="ping-pong after restore")
    for line in log_lines(engine, "j1"):
        sent, got = map(int, re.match(r"sent (\d+) got (\d+)", line).groups())
        assert got == sent + 1000


def half_checkpoints(store: Path) -> list[Path]:
    """What a failed dump left in a local store: checkpoint folders, and pending records of
    dumps (the store's own folders may stay, and chunks a cas dump stored until a sweep)."""
    return [p for p in store.iterdir() if not p.name.startswith(".")] + list(store.glob(".pending/*"))


def test_tcp_without_option_fails_and_job_keeps_running(engine: Engine, echo_server: int) -> None:
    start(engine, [sys.executable, str(WORKLOADS / "tcp_client.py"), str(echo_server)], ready="sent 3")
    with pytest.raises(DumpError, match="criu dump"):
        engine.dump("j1", DumpRequest())
    assert engine.job("j1").state is JobState.running
    assert engine.checkpoints("j1") == []
    n = len(log_lines(engine, "j1"))
    wait_for(lambda: len(log_lines(engine, "j1")) > n + 2, what="the job to go on after a failed dump")
    assert half_checkpoints(engine.paths.checkpoints) == [], "no half checkpoint is left behind"


def test_open_file_keeps_its_offset(engine: Engine, tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    start(engine, [sys.executable, str(WORKLOADS / "writer.py"), str(target)], ready="wrote 3")
    engine.dump("j1", DumpRequest())
    engine.restore(RestoreRequest(), jid="j1")
    n = len(log_lines(engine, "j1"))
    wait_for(lambda: len(log_lines(engine, "j1")) > n + 3, what="writing after restore")
    lines = target.read_text().splitlines()
    assert lines == [f"line {i}" for i in range(len(lines))], "no line lost or overwritten"


def test_clone_while_original_runs(engine: Engine) -> None:
    start(engine, COUNTER, ready="count=3")
    result = engine.dump("j1", DumpRequest(leave_running=True))
    assert engine.job("j1").state is JobState.running
    clone = engine.restore(RestoreRequest(checkpoint=result.checkpoint, jid="j2")).job
    assert clone.jid == "j2" and clone.pid != engine.job("j1").pid
    wait_for(lambda: last_count(engine, "j2") > 5, what="the clone counting")
    assert engine.job("j1").state is JobState.running
    with pytest.raises(StateError, match="running"):
        engine.restore(RestoreRequest(), jid="j1")


def test_restore_many_times_from_one_checkpoint(engine: Engine) -> None:
    start(engine, COUNTER, ready="count=3")
    result = engine.dump("j1", DumpRequest())
    for i in range(3):
        job = engine.restore(RestoreRequest(checkpoint=result.checkpoint, jid=f"copy{i}")).job
        assert job.state is JobState.running
    for i in range(3):
        wait_for(lambda i=i: last_count(engine, f"copy{i}") > 2, what=f"copy{i} counting")


def test_freeze_stops_progress_and_unfreeze_resumes(engine: Engine) -> None:
    start(engine, COUNTER, ready="count=3")
    assert engine.freeze("j1").state is JobState.frozen
    time.sleep(0.2)
    frozen_at = last_count(engine, "j1")
    time.sleep(0.5)
    assert last_count(engine, "j1") == frozen_at
    with pytest.raises(StateError):
        engine.freeze("j1")
    assert engine.unfreeze("j1").state is JobState.running
    wait_for(lambda: last_count(engine, "j1") > frozen_at + 3, what="counting after unfreeze")


def test_frozen_job_dumps_and_restores_frozen(engine: Engine) -> None:
    start(engine, COUNTER, ready="count=3")
    engine.freeze("j1")
    engine.dump("j1", DumpRequest())
    job = engine.restore(RestoreRequest(), jid="j1").job
    assert job.state is JobState.frozen
    at = last_count(engine, "j1")
    engine.unfreeze("j1")
    wait_for(lambda: last_count(engine, "j1") > at + 3, what="counting after unfreeze")


def test_manage_dump_restore_in_fresh_pid_namespace(engine: Engine, tmp_path: Path) -> None:
    out = tmp_path / "managed.log"
    proc = psutil.Popen(COUNTER, stdout=out.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: "count=3" in out.read_text(), what="the managed process")
        job = engine.manage("process", ManageRequest(target=str(proc.pid), jid="m1"))
        assert job.managed and job.pid == proc.pid
        engine.dump("m1", DumpRequest(leave_running=False))
        proc.wait(timeout=10)  # our child: reaped here, so the PID may be reused
        size = out.stat().st_size
        restored = engine.restore(RestoreRequest(), jid="m1").job
        assert restored.pid != proc.pid
        wait_for(lambda: out.stat().st_size > size + 50, what="the restored process writing")
        # the restored tree runs under a fresh init: it can be dumped and restored again
        engine.dump("m1", DumpRequest())
        again = engine.restore(RestoreRequest(), jid="m1").job
        assert again.state is JobState.running
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()


def test_corrupted_image_is_refused(engine: Engine) -> None:
    start(engine, COUNTER, ready="count=2")
    result = engine.dump("j1", DumpRequest(compression=Compression.none))
    data = sorted((engine.paths.checkpoints / result.checkpoint / "data").glob("pages-*.img"))[0]
    raw = bytearray(data.read_bytes())
    raw[100] ^= 0xFF
    data.write_bytes(bytes(raw))
    lines = len(log_lines(engine, "j1"))
    with pytest.raises(CorruptCheckpoint, match="pages-"):
        engine.restore(RestoreRequest(), jid="j1")
    assert engine.job("j1").state is JobState.checkpointed
    time.sleep(0.3)
    assert len(log_lines(engine, "j1")) == lines, "the corrupted image never ran"


def test_concurrent_dumps_are_refused(engine: Engine) -> None:
    start(engine, [sys.executable, str(WORKLOADS / "buffer.py"), "256"], ready="ready")
    errors: list[Exception] = []

    def dump() -> None:
        try:
            Engine(engine.paths).dump("j1", DumpRequest(leave_running=True))
        except StateError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=dump) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 1 and "in progress" in str(errors[0])
    assert len(engine.checkpoints("j1")) == 1


def test_exit_code_is_reaped(engine: Engine) -> None:
    engine.run("process", RunRequest(cmd=["sh", "-c", "echo bye; exit 7"], jid="e1"))
    job = wait_for(lambda: (j := engine.job("e1")).state is JobState.exited and j, what="the exit")
    assert job.exit_code == 7
    assert log_lines(engine, "e1") == ["bye"]


def test_workload_outlives_the_cli(home: Path) -> None:
    cli = [sys.executable, "-m", "cedana_ray.cli"]
    subprocess.run([*cli, "run", "process", "--jid", "w1", "--", *COUNTER], check=True, capture_output=True)
    engine = Engine()
    wait_for(lambda: last_count(engine, "w1") > 3, what="counting after the CLI exited")
    assert engine.job("w1").state is JobState.running
    assert psutil.Process(engine.job("w1").pid).ppid() != 0


def test_an_engine_keeps_checkpoints_in_its_own_home(home: Path, tmp_path: Path) -> None:
    other = Engine(Paths(tmp_path / "other"))
    start(other, COUNTER, ready="count=1")
    result = other.dump("j1", DumpRequest())
    assert result.path == f"file://{tmp_path / 'other' / 'checkpoints' / result.checkpoint}"


@pytest.mark.parametrize("compression", [Compression.none, Compression.zstd])
def test_full_disk_fails_cleanly_and_the_job_runs_on(
    engine: Engine, small_disk: Path, compression: Compression
) -> None:
    start(engine, [sys.executable, str(WORKLOADS / "buffer.py"), "64"], ready="ready")
    request = DumpRequest(storage=f"file://{small_disk}", compression=compression)
    with pytest.raises((DumpError, StorageError), match=r"No space left|ENOSPC"):
        engine.dump("j1", request)
    assert engine.job("j1").state is JobState.running
    assert engine.checkpoints("j1") == []
    assert half_checkpoints(small_disk) == [], "no half checkpoint is left behind"
    n = len(log_lines(engine, "j1"))
    wait_for(lambda: len(log_lines(engine, "j1")) > n, what="the job to go on")


def test_query_lists_jobs_with_what_their_trees_use(engine: Engine) -> None:
    start(engine, COUNTER, ready="count=1")
    (row,) = engine.query("process")
    assert row["jid"] == "j1" and row["state"] == "running"
    assert row["processes"] == 2, "the namespace init and the workload"
    assert row["rss_bytes"] > 1 << 20


def test_a_job_runs_where_and_with_what_it_was_given(engine: Engine, tmp_path: Path) -> None:
    """Its directory and environment reach the workload, under our small native init."""
    show = "import os, time; print('at', os.getcwd(), os.environ['GREETING'], flush=True); time.sleep(60)"
    request = RunRequest(cmd=[sys.executable, "-c", show], jid="j1", cwd=str(tmp_path), env={"GREETING": "a b"})
    engine.run("process", request)
    wait_for(lambda: log_lines(engine, "j1"), what="the workload's line")
    assert log_lines(engine, "j1") == [f"at {tmp_path} a b"]
    init = psutil.Process(engine.job("j1").pid)
    assert Path(init.exe()).name == "nsinit" and init.memory_info().rss < 4 << 20, "no interpreter as PID 1"


@pytest.mark.parametrize(
    ("cmd", "cwd", "message"),
    [
        (["/nonexistent/binary"], None, "cannot run '/nonexistent/binary': No such file or directory"),
        (COUNTER, "/nonexistent/dir", "working directory /nonexistent/dir does not exist on node"),
    ],
)
def test_a_workload_that_cannot_start_says_why_and_leaves_nothing(
    engine: Engine, cmd: list[str], cwd: str | None, message: str
) -> None:
    with pytest.raises(UsageError, match=re.escape(message)):
        engine.run("process", RunRequest(cmd=cmd, jid="j1", cwd=cwd))
    assert engine.jobs() == []
    job_dir = str(engine.paths.job_dir("j1"))

    def left() -> list[psutil.Process]:
        procs = psutil.process_iter(["cmdline", "status"])
        return [p for p in procs if job_dir in " ".join(p.info["cmdline"] or []) and p.info["status"] != "zombie"]

    wait_for(lambda: not left(), what="no process of the job left")


def test_the_supervisor_is_our_child_unless_a_ray_worker_would_kill_it(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our child, reaped once it exits; a second fork away from a Ray worker, which kills its
    children when it exits (our agents tell Ray not to)."""

    def supervisor(jid: str) -> psutil.Process:
        start(engine, COUNTER, jid)
        return psutil.Process(engine.job(jid).pid).parent()  # the namespace init's parent

    ours = supervisor("a")
    assert ours.ppid() == os.getpid()
    monkeypatch.setenv("RAY_RAYLET_PID", "1")
    assert supervisor("b").ppid() != os.getpid()
    monkeypatch.setenv("RAY_kill_child_processes_on_worker_exit", "0")
    assert supervisor("c").ppid() == os.getpid()
    engine.kill("a")
    wait_for(lambda: not psutil.pid_exists(ours.pid), what="the supervisor reaped, not a zombie")


@pytest.mark.parametrize("compression", [Compression.zstd, Compression.none])
def test_a_restore_reads_the_manifest_once(
    engine: Engine, monkeypatch: pytest.MonkeyPatch, compression: Compression
) -> None:
    start(engine, COUNTER, ready="count=2")
    engine.dump("j1", DumpRequest(compression=compression))
    reads: list[str] = []
    read = CheckpointStore.manifest
    monkeypatch.setattr(
        CheckpointStore, "manifest", lambda store, ckpt, **kw: reads.append(ckpt) or read(store, ckpt, **kw)
    )
    assert engine.restore(RestoreRequest(), jid="j1").job.state is JobState.running
    assert len(reads) == 1


def test_a_manifest_handed_down_is_verified_not_read_again(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """As an agent is given the manifest its coordinator read: no read, but its signature checked."""
    start(engine, COUNTER, ready="count=2")
    dumped = engine.dump("j1", DumpRequest())
    manifest = engine.store(dumped.path.rsplit("/", 1)[0]).manifest(dumped.checkpoint)
    forged = manifest.model_copy(update={"details": {**manifest.details, "command": ["sh", "-c", "evil"]}})
    with pytest.raises(UntrustedCheckpoint, match="altered"):
        engine.restore(RestoreRequest(path=dumped.path, manifest=forged), jid="j1")
    monkeypatch.setattr(CheckpointStore, "manifest", lambda *a, **kw: pytest.fail("the manifest was read again"))
    assert engine.restore(RestoreRequest(path=dumped.path, manifest=manifest), jid="j1").job.state is JobState.running
