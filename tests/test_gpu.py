"""The gpu plugin without a GPU: clear errors, the trace format, and the ordering of
the CUDA checkpoint sequence against a fake driver (the real one needs a GPU and is
exercised by scripts/gpu-check.sh)."""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cedana_ray.plugins.gpu import cuda, intercept, tracing
from cedana_ray.plugins.gpu.cuda import GpuError, ProcessState
from test_process_criu import COUNTER, last_count, start, wait_for

from cedana_ray import nvml
from cedana_ray.engine import Engine
from cedana_ray.errors import PrerequisiteError, StateError, UsageError
from cedana_ray.models import Job, JobState, Manifest
from cedana_ray.pipeline import Context, DumpState, RestoreState
from cedana_ray.requests import DumpRequest, RestoreRequest

no_gpu = pytest.mark.skipif(nvml.unavailable() is None, reason="an NVIDIA driver is present")


@no_gpu
def test_missing_driver_is_one_clear_reason() -> None:
    assert nvml.unavailable().startswith("no NVIDIA driver: NVML Shared Library Not Found")


@no_gpu
@pytest.mark.parametrize(
    "args",
    [
        ["query", "gpu"],
        ["run", "process", "--gpu-tracing", "--", "true"],
        ["run", "process", "--gpu", "--", "true"],
        ["run", "containerd", "--image", "i", "--id", "c", "--gpu-tracing"],
        ["run", "runc", "--bundle", "/", "--id", "c", "--gpu-tracing"],
    ],
)
def test_gpu_commands_fail_in_one_line_without_driver(home: Path, args: list[str]) -> None:
    res = subprocess.run([sys.executable, "-m", "cedana_ray.cli", *args], capture_output=True, text=True)
    assert res.returncode == 6
    assert res.stderr.count("\n") == 1 and "no NVIDIA driver" in res.stderr
    ps = subprocess.run([sys.executable, "-m", "cedana_ray.cli", "ps", "--json"], capture_output=True, text=True)
    assert json.loads(ps.stdout) == []


@no_gpu
@pytest.mark.criu
def test_ps_without_driver_lists_no_gpus(home: Path) -> None:
    cli = [sys.executable, "-m", "cedana_ray.cli"]
    run = subprocess.run([*cli, "run", "process", "--json", "--", "sleep", "30"], capture_output=True, text=True)
    jid = json.loads(run.stdout)["jid"]
    try:
        ps = subprocess.run([*cli, "ps", "--json"], capture_output=True, text=True)
        assert [(r["jid"], r["gpus"]) for r in json.loads(ps.stdout)] == [(jid, [])]
        table = subprocess.run([*cli, "ps"], capture_output=True, text=True).stdout
        assert jid in table and "gpus" not in table
    finally:
        subprocess.run([*cli, "job", "kill", jid], capture_output=True)


def test_driver_structs_match_the_c_abi() -> None:
    assert ctypes.sizeof(cuda._LockArgs) == 64
    assert ctypes.sizeof(cuda._RestoreArgs) == 64
    assert ctypes.sizeof(cuda._GpuPair) == 32
    assert cuda.uuid_bytes("GPU-0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0") == bytes.fromhex(
        "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
    )


def test_trace_is_valid_chrome_json_open_or_closed(tmp_path: Path) -> None:
    path = tmp_path / tracing.TRACE
    values = {"job_memory_mib": 512.0, "utilization_pct": 40, "memory_bw_pct": 10, "sm_clock_mhz": 1980, "power_w": 300}
    tracing.append(path, [tracing.counter("GPU 0", 100.0, values), tracing.counter("GPU 0", 100.5, values)])
    tracing.append(path, [tracing.gap(100.5, 110.0, "checkpointed (restored here)")])
    tracing.append(path, [tracing.counter("GPU 0", 110.0, {**values, "job_memory_mib": 1024.0})])
    events = tracing.read(path)
    closed = json.loads(path.read_text().rstrip().rstrip(",") + "]")
    assert events == closed and len(events) == 4
    for e in events:
        assert {"name", "ph", "ts", "pid"} <= e.keys() and isinstance(e["ts"], int)
    s = tracing.summary(path)
    assert s["samples"] == 3 and s["seconds"] == pytest.approx(10.0)
    assert s["peak_job_memory_mib"] == 1024.0
    assert s["gaps"] == [{"reason": "checkpointed (restored here)", "seconds": pytest.approx(9.5)}]


class FakeCudaDriver:
    """A fake of the CUDA checkpoint API: records calls, follows the state machine,
    fails where told. Only for the ordering and error handling of the sequence."""

    def __init__(self, pids: list[int], fail: tuple[str, int] | None = None) -> None:
        self.states = dict.fromkeys(pids, ProcessState.running)
        self.calls: list[tuple[str, int]] = []
        self.fail = fail

    def _step(self, name: str, pid: int, before: ProcessState, after: ProcessState) -> None:
        self.calls.append((name, pid))
        if self.fail == (name, pid):
            raise GpuError(f"{name}({pid}) failed: CUDA_ERROR_TIMEOUT")
        assert self.states[pid] is before, f"{name} on a {self.states[pid].name} process"
        self.states[pid] = after

    def state(self, pid: int) -> ProcessState | None:
        return self.states.get(pid)

    def lock(self, pid: int, timeout_ms: int) -> None:
        self._step("lock", pid, ProcessState.running, ProcessState.locked)

    def checkpoint(self, pid: int) -> None:
        self._step("checkpoint", pid, ProcessState.locked, ProcessState.checkpointed)

    def restore(self, pid: int, remap: dict[str, str] | None = None) -> None:
        self._step("restore", pid, ProcessState.checkpointed, ProcessState.locked)

    def unlock(self, pid: int) -> None:
        self._step("unlock", pid, ProcessState.locked, ProcessState.running)


def dump_ctx(leave_running: bool) -> Context:
    return Context(SimpleNamespace(leave_running=leave_running), DumpState("g", tree_root=1))


def restore_state(manifest: Any) -> RestoreState:
    return RestoreState("g", Path(), manifest=manifest, store=None)  # type: ignore[arg-type]  # not read


def interceptor(fake: FakeCudaDriver) -> intercept.Interceptor:
    return intercept.Interceptor(load=lambda: fake, find=lambda root: sorted(fake.states))


def test_dump_locks_all_then_checkpoints_all_then_resumes_when_leaving_running() -> None:
    fake = FakeCudaDriver([10, 11])
    seen = []
    result = interceptor(fake).gpu_interception(dump_ctx(True), lambda c: seen.append(dict(fake.states)) or "dumped")
    assert result == "dumped"
    assert seen == [{10: ProcessState.checkpointed, 11: ProcessState.checkpointed}], "CRIU ran on released GPUs"
    assert fake.calls[:4] == [("lock", 10), ("lock", 11), ("checkpoint", 10), ("checkpoint", 11)]
    assert set(fake.states.values()) == {ProcessState.running}


def test_dump_without_leave_running_leaves_a_rollback() -> None:
    fake = FakeCudaDriver([10])
    ctx = dump_ctx(False)
    interceptor(fake).gpu_interception(ctx, lambda c: None)
    assert fake.states[10] is ProcessState.checkpointed
    assert ctx.state.details["gpu"]["processes"] == 1
    (rollback,) = ctx.state.rollback
    rollback()
    assert fake.states[10] is ProcessState.running


@pytest.mark.parametrize("fail", [("lock", 11), ("checkpoint", 11), ("checkpoint", 10)])
def test_a_failing_step_restores_and_unlocks_everything(fail: tuple[str, int]) -> None:
    fake = FakeCudaDriver([10, 11], fail=fail)
    with pytest.raises(GpuError, match="CUDA_ERROR_TIMEOUT"):
        interceptor(fake).gpu_interception(dump_ctx(False), lambda c: pytest.fail("CRIU must not run"))
    assert set(fake.states.values()) == {ProcessState.running}


def test_a_failing_criu_dump_gives_the_gpu_back() -> None:
    fake = FakeCudaDriver([10])

    def criu_fails(ctx: Context) -> None:
        raise RuntimeError("criu dump failed")

    with pytest.raises(RuntimeError):
        interceptor(fake).gpu_interception(dump_ctx(False), criu_fails)
    assert fake.states[10] is ProcessState.running


def test_restore_restores_then_unlocks_and_kills_on_failure() -> None:
    fake = FakeCudaDriver([10, 11])
    fake.states = dict.fromkeys(fake.states, ProcessState.checkpointed)
    manifest = SimpleNamespace(details={"gpu": {"gpus": [], "processes": 2}})
    job = Job(jid="g", type="process", state=JobState.running, pid=None)
    ctx = Context(RestoreRequest(), restore_state(manifest))
    assert interceptor(fake).gpu_interception_restore(ctx, lambda c: job) is job
    assert fake.calls == [("restore", 10), ("restore", 11), ("unlock", 10), ("unlock", 11)]

    sleeper = subprocess.Popen(["sleep", "30"])
    failing = FakeCudaDriver([sleeper.pid], fail=("restore", sleeper.pid))
    failing.states[sleeper.pid] = ProcessState.checkpointed
    job = job.model_copy(update={"pid": sleeper.pid})
    with pytest.raises(GpuError):
        interceptor(failing).gpu_interception_restore(Context(RestoreRequest(), restore_state(manifest)), lambda c: job)
    assert sleeper.wait(timeout=5) == -9, "a job that lost its GPU state is not left running"


H200 = [nvml.GpuInfo(index=i, uuid=f"GPU-{i}", name="NVIDIA H200", memory_total=1, memory_used=0) for i in range(3)]
A100 = nvml.GpuInfo(index=3, uuid="GPU-3", name="NVIDIA A100", memory_total=1, memory_used=0)


def used(*indexes: int) -> list[dict[str, object]]:
    """The GPUs a dump recorded: as NVML named them on the machine of the dump."""
    return [{"uuid": f"GPU-{i}", "name": "NVIDIA H200", "index": i} for i in indexes]


def test_remap_plan_keeps_what_is_here_and_names_every_gpu_once_anything_moves() -> None:
    assert intercept.remap_plan(used(0), H200, {}) == {}, "restored where it was: no pairs"
    assert intercept.remap_plan(used(0), H200[1:], {}) == {"GPU-0": "GPU-1"}, "absent: a free one of its kind"
    # the driver wants every checkpointed GPU once any is remapped; the one here stays
    assert intercept.remap_plan(used(0, 1), [H200[1], H200[2]], {}) == {"GPU-0": "GPU-2", "GPU-1": "GPU-1"}
    assert intercept.remap_plan(used(0), H200, {"0": "2"}) == {"GPU-0": "GPU-2"}, "asked, by index"
    # asked onto a GPU the job also used: that one moves to a free one
    assert intercept.remap_plan(used(0, 1), H200, {"GPU-0": "GPU-1"}) == {"GPU-0": "GPU-1", "GPU-1": "GPU-2"}
    with pytest.raises(GpuError, match="no free NVIDIA H200 here"):
        intercept.remap_plan(used(0), [A100], {})


@pytest.mark.parametrize(
    ("asked", "error"),
    [
        ({"5": "1"}, "no GPU 5 in the checkpoint"),
        ({"0": "GPU-9"}, "no GPU GPU-9 on this node"),
        ({"0": "3"}, "GPU-3 is a NVIDIA A100, not a NVIDIA H200 like GPU-0"),
        ({"0": "2", "1": "2"}, "two checkpointed GPUs onto one GPU"),
    ],
)
def test_a_gpu_map_that_cannot_be_followed_is_refused(asked: dict[str, str], error: str) -> None:
    with pytest.raises(UsageError, match=f"^--gpu-map: {error}"):
        intercept.remap_plan(used(0, 1), [*H200, A100], asked)


@pytest.mark.criu
def test_gpu_map_of_a_checkpoint_without_gpu_state_is_one_line(engine: Engine) -> None:
    start(engine, COUNTER, ready="count=3")
    engine.dump("j1", DumpRequest())
    res = subprocess.run(
        [sys.executable, "-m", "cedana_ray.cli", "restore", "job", "j1", "--gpu-map", "0=1"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == UsageError.exit_code and res.stderr.count("\n") == 1, res.stderr
    assert "--gpu-map: checkpoint j1-" in res.stderr and "holds no GPU state" in res.stderr
    assert engine.job("j1").state is JobState.checkpointed
    for pair in ("0", "=1", "0="):
        bad = subprocess.run(
            [sys.executable, "-m", "cedana_ray.cli", "restore", "job", "j1", "--gpu-map", pair], capture_output=True
        )
        assert bad.returncode == 2 and b"is not FROM=TO" in bad.stderr, pair


def test_jobs_without_gpu_state_pass_through() -> None:
    fake = FakeCudaDriver([])
    assert interceptor(fake).gpu_interception(dump_ctx(False), lambda c: "ok") == "ok"
    manifest = Manifest.model_construct(details={})
    assert (
        intercept.Interceptor(load=lambda: pytest.fail("no driver needed")).gpu_interception_restore(
            Context(None, restore_state(manifest)), lambda c: "job"
        )
        == "job"
    )
    assert fake.calls == []


def test_cuda_pids_finds_no_cuda_in_a_plain_process() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        assert intercept.cuda_pids(sleeper.pid) == []
    finally:
        sleeper.kill()


# -- the interception wired into real dumps. A process that preloads a library named
# libcuda.so.1 (glibc's small libanl, renamed) is a CUDA process to it; this machine has no driver.
def cuda_lookalike(root: Path, dest: Path) -> Path:
    """``root``'s libanl.so.1 copied to ``dest/libcuda.so.1``, for a workload to preload."""
    lib = dest / "libcuda.so.1"
    shutil.copy2(next(root.glob("usr/lib/*/libanl.so.1")), lib)
    return lib


def assert_cuda_dump_refused(engine: Engine, jid: str, counting: Callable[[], int]) -> None:
    """A dump of job ``jid``, which looks like a CUDA job, fails before CRIU runs: the job
    keeps running (``counting`` goes on) and no checkpoint is left."""
    expected = (PrerequisiteError, "no CUDA driver") if nvml.unavailable() else (GpuError, "")
    with pytest.raises(expected[0], match=expected[1]):
        engine.dump(jid, DumpRequest())
    assert engine.job(jid).state is JobState.running and engine.checkpoints(jid) == []
    at = counting()
    wait_for(lambda: counting() > at + 3, what=f"{jid} counting after the refused dump")


@pytest.mark.criu
def test_a_traced_job_goes_on_being_traced_after_restore(engine: Engine) -> None:
    """Whether a job's GPU use is traced travels in its checkpoint (the gpu plugin's dump
    middleware records it, for every job type), so its restore goes on tracing. Without a
    driver here no tracer runs, and `run --gpu-tracing` is refused: the job is marked as
    that run marks it."""
    start(engine, COUNTER, ready="count=3")
    job = engine.job("j1")
    engine.registry.save_job(job.model_copy(update={"details": {**job.details, "gpu_tracing": True}}))
    dumped = engine.dump("j1", DumpRequest())
    assert engine.inspect(dumped.checkpoint).details["gpu_tracing"] is True
    assert engine.restore(RestoreRequest(), jid="j1").job.details["gpu_tracing"] is True


def start_cuda_lookalike(engine: Engine, tmp_path: Path) -> None:
    start(engine, ["env", f"LD_PRELOAD={cuda_lookalike(Path('/'), tmp_path)}", *COUNTER], ready="count=3")
    assert len(intercept.cuda_pids(engine.job("j1").pid)) == 1, "the workload, not its namespace init"


def test_a_cuda_process_is_not_dumped_without_the_driver(engine: Engine, tmp_path: Path) -> None:
    start_cuda_lookalike(engine, tmp_path)
    assert_cuda_dump_refused(engine, "j1", lambda: last_count(engine, "j1"))


def test_a_frozen_cuda_process_is_refused_at_once(engine: Engine, tmp_path: Path) -> None:
    """The driver checkpoints through a thread of the process: a frozen one is refused in a
    line, not after the lock's 30 s timeout, and stays frozen."""
    start_cuda_lookalike(engine, tmp_path)
    engine.freeze("j1")
    with pytest.raises(StateError, match="frozen job's CUDA state cannot be checkpointed"):
        engine.dump("j1", DumpRequest(leave_running=True))
    assert engine.job("j1").state is JobState.frozen and engine.checkpoints("j1") == []


@pytest.mark.slow
@pytest.mark.criu
@pytest.mark.parametrize("runtime", ["process", "runc", "containerd"])
def test_the_gpu_check_passes_on_the_cpu(runtime: str, tmp_path: Path) -> None:
    """scripts/gpu_check.py, the GPU check's flow, rehearsed with PyTorch on the CPU and a
    small state: it keeps working between GPU sessions."""
    pytest.importorskip("torch", reason="PyTorch (CPU) could not be installed here")
    needs = {"runc": ["runc"], "containerd": ["runc", "containerd", "ctr"]}.get(runtime, [])
    if absent := [b for b in needs if not shutil.which(b)]:
        pytest.skip(f"{', '.join(absent)} not installed (run `make setup`)")
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"
    args = ["--device", "cpu", "--runtime", runtime, "--gib", "0", "--steps", "30", "--dump-at", "8"]
    out = tmp_path / "out"
    cmd = [sys.executable, str(script), *args, "--home", str(tmp_path / "home"), "--out", str(out)]
    res = subprocess.run(cmd, cwd="/", capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    doc = json.loads((out / f"gpu-check-{runtime}.json").read_text())
    assert doc["ok"] and doc["steps_compared"] == 30 and doc["dump_total_s"] > 0
