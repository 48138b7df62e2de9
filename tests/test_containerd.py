"""The containerd plugin against a real containerd (started here, under a temp dir): a
busybox counter image built with umoci, dumped, killed, restored (its output still in
the job log, its exit code recorded), cloned, frozen, queried, cleaned up; the Python
container holding 256 MiB; and the error paths."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from cedana_ray.plugins.containerd.client import Ctr
from cedana_ray.plugins.containerd.requests import BindMount, ContainerdRunRequest
from containerd_daemon import start_containerd
from containers import (
    COUNT,
    assert_checksum_kept,
    busybox_rootfs,
    counts,
    last_count,
    missing,
    oci_image,
    python_image,
    python_rootfs,
    read_count,
)
from servers import stop_process
from test_cli import assert_one_error, cedana
from test_environment import proc_text
from test_gpu import assert_cuda_dump_refused, cuda_lookalike, no_gpu
from test_process_criu import wait_for

from cedana_ray import dumping
from cedana_ray.backend import job_for
from cedana_ray.engine import Engine
from cedana_ray.errors import DumpError, JobNotFound, PrerequisiteError, RestoreError, StateError, UsageError
from cedana_ray.features import compute
from cedana_ray.models import Compression, JobState
from cedana_ray.requests import DumpRequest, ManageRequest, RestoreRequest

NEEDS = ("runc", "containerd", "ctr", "umoci")
pytestmark = [pytest.mark.criu, pytest.mark.skipif(bool(missing(*NEEDS)), reason=str(missing(*NEEDS)))]
IMAGE = "localhost/counter:latest"
PYTHON_IMAGE = "localhost/python-checksummed:latest"
# Also writes its count inside the container, to check the rw layer comes back.
SCRIPT = "i=0; while true; do echo $i > /count; echo count=$i; i=$((i+1)); sleep 0.05; done"


@pytest.fixture(scope="session")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ctr]:
    base = tmp_path_factory.mktemp("containerd", numbered=True)
    daemon = start_containerd(base)
    # containerd keeps runc state in /run/containerd/runc/NAMESPACE, outside base: a fresh namespace
    ctr = Ctr(str(base / "containerd.sock"), f"cedana-ray-test-{secrets.token_hex(3)}")
    try:
        archive = oci_image(busybox_rootfs(base / "rootfs"), base / "image", SCRIPT)
        ctr.call("images", "import", "--base-name", IMAGE.rsplit(":", 1)[0], str(archive))
        yield ctr
    finally:
        stop_process(daemon)
        with contextlib.suppress(OSError):  # empty once every container is removed
            os.rmdir(f"/run/containerd/runc/{ctr.namespace}")
        shutil.rmtree(base / "tmp", ignore_errors=True)  # checkpoints containerd unpacked to restore


@pytest.fixture
def ctr(containerd: Ctr, home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Ctr]:
    """The test's view of containerd; every container it leaves is removed."""
    monkeypatch.setenv("CONTAINERD_ADDRESS", containerd.address)
    monkeypatch.setenv("CONTAINERD_NAMESPACE", containerd.namespace)
    yield containerd
    for cid in containerd.containers():
        containerd.remove(cid)


@pytest.fixture(scope="session")
def python_image_ref(containerd: Ctr) -> str:
    """The Python container's image (built once, then cached), imported into the session's namespace."""
    ctr = containerd
    ctr.call("images", "import", "--base-name", PYTHON_IMAGE.rsplit(":", 1)[0], str(python_image()))
    return PYTHON_IMAGE


def log(engine: Engine, jid: str) -> Path:
    return engine.paths.job_dir(jid) / "log"


def count(engine: Engine, jid: str, path: str = "/count") -> int:
    """The counter inside the container, through its task's root."""
    return read_count(f"/proc/{engine.job(jid).pid}/root{path}")


def start(engine: Engine, cid: str = "d1") -> str:
    engine.run("containerd", ContainerdRunRequest(cmd=["ctr"], image=IMAGE, container=cid, jid=cid))
    wait_for(lambda: count(engine, cid) >= 3, what=f"{cid} counting")
    return cid


def test_counter_continues_after_dump_kill_restore(engine: Engine, ctr: Ctr) -> None:
    start(engine)
    assert "count=" in log(engine, "d1").read_text(), "the task's output is the job log"
    result = engine.dump("d1", DumpRequest())
    stopped_at = last_count(log(engine, "d1"))
    assert engine.job("d1").state is JobState.checkpointed
    assert ctr.tasks().get("d1", (0, "STOPPED"))[1] == "STOPPED", "the task is gone after a dump"
    manifest = engine.inspect(result.checkpoint)
    assert manifest.details["image"] == IMAGE and manifest.details["snapshotter"] == "overlayfs"
    assert not any("checkpoint" in i for i in ctr.images()), "the checkpoint lives in our store only"

    job = engine.restore(RestoreRequest(), jid="d1").job
    restored_at = count(engine, "d1")
    assert restored_at >= 3, "the rw layer and the counter came back, not a fresh start"
    wait_for(lambda: count(engine, "d1") > restored_at + 3, what="counting after restore")
    assert job.state is JobState.running and ctr.tasks()["d1"] == (job.pid, "RUNNING")

    # the restored task's output goes on in the job log, and its end is recorded
    wait_for(lambda: last_count(log(engine, "d1")) > stopped_at + 3, what="the restored task's output in the log")
    found = counts(log(engine, "d1"))
    assert found == list(range(len(found))), "the log goes on without a gap or a repeat"
    shown = cedana("logs", "d1", "--local").stdout
    assert f"count={stopped_at + 1}\n" in shown and f"count={stopped_at}\n" in shown
    os.kill(job.pid, signal.SIGKILL)
    wait_for(lambda: engine.job("d1").state is JobState.exited, what="the restored task's exit to be recorded")
    assert engine.job("d1").exit_code == 128 + signal.SIGKILL


def test_a_dump_returns_once_its_task_is_gone(engine: Engine, ctr: Ctr) -> None:
    """Once a dump (without --leave-running) returns, the task's init is reaped and containerd
    reports it stopped: checked at once, not waited for, a few times (issue 16: the core's
    kill signal was sent, not waited for, and ``ctr`` merely took long enough to start)."""
    for attempt in range(3):
        cid = start(engine, f"gone{attempt}")
        pid = engine.job(cid).pid
        engine.dump(cid, DumpRequest())
        reaped, status = not psutil.pid_exists(pid), ctr.tasks().get(cid, (0, "STOPPED"))[1]
        assert reaped and status == "STOPPED", f"dump {attempt}: task {pid} {status}, reaped: {reaped}"


def test_a_task_still_running_after_the_wait_fails_the_dump_in_one_line(
    engine: Engine, ctr: Ctr, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the task outlives the wait (here: the stop check made to say so), the dump fails
    in one line; its checkpoint is kept and the job recorded checkpointed, its dump finished."""
    cid = start(engine, "stuck")
    monkeypatch.setattr(dumping, "STOP_TIMEOUT_S", 1.0)
    monkeypatch.setattr(Engine, "_stopped", lambda self, job: False)
    with pytest.raises(StateError, match=r"^job stuck is checkpointed but still runs 1 s after being killed$"):
        engine.dump(cid, DumpRequest())
    job = engine.job(cid)
    assert job.state is JobState.checkpointed and job.last_checkpoint and not job.details.get("dump")


# What a container given a command, an env var, a working dir, a read-only bind mount and a
# device says about them, then a counter in its rw layer.
SETTINGS = (
    'echo "env=$GREETING cwd=$(pwd) note=$(cat note)"; (echo x > /srv/w) 2>/dev/null || echo read-only; '
    "ls -l /dev/fuse; i=0; while true; do echo $i > /count; i=$((i+1)); sleep 0.05; done"
)


def test_a_container_keeps_its_command_env_cwd_mounts_and_devices_across_restore(
    engine: Engine, ctr: Ctr, tmp_path: Path
) -> None:
    (tmp_path / "note").write_text("hello")
    args = ["--env", "GREETING=hi", "--cwd", "/srv", "--mount", f"{tmp_path}:/srv:ro,bind", "--device", "/dev/fuse"]
    ran = cedana("run", "containerd", "--image", IMAGE, "--id", "opts", *args, "--local", "--", "sh", "-c", SETTINGS)
    assert ran.returncode == 0, ran.stderr
    wait_for(lambda: count(engine, "opts") >= 3, what="the container counting")
    said = log(engine, "opts").read_text()
    assert "env=hi cwd=/srv note=hello\nread-only\n" in said and "crw" in said, said
    engine.dump("opts", DumpRequest())
    job = engine.restore(RestoreRequest(), jid="opts").job
    restored_at = count(engine, "opts")
    wait_for(lambda: count(engine, "opts") > restored_at + 3, what="counting after restore")
    root = Path(f"/proc/{job.pid}/root")
    assert (root / "srv/note").read_text() == "hello", "the bind mount is back"
    assert (root / "dev/fuse").stat().st_rdev == Path("/dev/fuse").stat().st_rdev, "so is the device"
    assert log(engine, "opts").read_text().count("env=hi") == 1, "restored, not started again"


def test_a_failed_restore_loses_nothing(engine: Engine, ctr: Ctr, tmp_path: Path) -> None:
    """CRIU fails to restore a container whose bind mount's source is gone: the job stays
    restorable, and restores once the source is back."""
    src = tmp_path / "src"
    src.mkdir()
    mount = BindMount(source=str(src), destination="/srv")
    engine.run("containerd", ContainerdRunRequest(cmd=["ctr"], image=IMAGE, container="m", jid="m", mounts=[mount]))
    wait_for(lambda: count(engine, "m") >= 3, what="the container counting")
    engine.dump("m", DumpRequest())
    src.rename(tmp_path / "away")
    with pytest.raises(RestoreError, match=r"restore of checkpoint .* as m failed"):
        engine.restore(RestoreRequest(), jid="m")
    assert engine.job("m").state is JobState.checkpointed
    (tmp_path / "away").rename(src)
    job = engine.restore(RestoreRequest(), jid="m").job
    at = count(engine, "m")
    wait_for(lambda: count(engine, "m") > at + 3, what="counting after the second restore")
    assert ctr.tasks()["m"] == (job.pid, "RUNNING")


def test_env_goes_through_the_containers_spec_not_ctrs_argv(
    engine: Engine, ctr: Ctr, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", ours := secrets.token_hex(12))  # in the CLI's environment
    given = secrets.token_hex(12)
    run = ("run", "containerd", "--image", IMAGE, "--id", "env", "--env", f"SOME_SECRET={given}", "--local")
    ran = cedana(*run, "--", "sh", "-c", 'echo "$SOME_SECRET"; sleep 600')
    assert ran.returncode == 0, ran.stderr
    wait_for(lambda: given in log(engine, "env").read_text(), what="the container's environment")
    assert not (engine.paths.job_dir("env") / "env").exists(), "the env file is gone once ctr read it"

    task = psutil.Process(engine.job("env").pid)
    workload = [task, *task.children(recursive=True)]
    job_dir = str(engine.paths.job_dir("env"))
    watcher = [p for p in psutil.process_iter(["cmdline"]) if job_dir in (p.info["cmdline"] or [])]
    assert len(watcher) == 1 and watcher[0].children(), "the watcher and its ctr"
    for p in [*watcher, *watcher[0].children(), *workload]:
        cmdline, environ = proc_text(p.pid, "cmdline"), proc_text(p.pid, "environ")
        assert given not in cmdline and (given in environ) == (p in workload), p.cmdline()
        assert ours not in cmdline + environ, p.cmdline()


def test_run_options_are_checked(ctr: Ctr, tmp_path: Path) -> None:
    run = ("run", "containerd", "--image", IMAGE, "--id", "x", "--local")
    for bad in ("", ":rel", ":/x:rx", ":/x:ro,rw", ":/x:bind,rbind", "/nope:/x"):
        assert cedana(*run, "--mount", f"{tmp_path}{bad}").returncode == 2, bad
    for env in ("NOVALUE", "=value"):
        assert cedana(*run, "--env", env).returncode == 2, env
    assert "x" not in ctr.containers()


@no_gpu
def test_a_gpu_container_is_refused_without_the_driver(ctr: Ctr) -> None:
    ran = cedana("run", "containerd", "--image", IMAGE, "--id", "x", "--gpu", "--local")
    assert "--gpu: no NVIDIA driver" in assert_one_error(ran, PrerequisiteError)
    assert "x" not in ctr.containers()


def test_exit_code_of_a_run_task(engine: Engine, ctr: Ctr) -> None:
    job = engine.run("containerd", ContainerdRunRequest(cmd=["ctr"], image=IMAGE, container="d1", jid="d1"))
    os.kill(job.pid, signal.SIGKILL)
    wait_for(lambda: engine.job("d1").state is not JobState.running, what="the task's exit")
    assert engine.job("d1").state is JobState.exited and engine.job("d1").exit_code == 128 + signal.SIGKILL


@pytest.mark.slow
@pytest.mark.skipif(bool(missing("debootstrap")), reason=str(missing("debootstrap")))
def test_python_container_keeps_its_256_mib_across_restore(engine: Engine, ctr: Ctr, python_image_ref: str) -> None:
    engine.run("containerd", ContainerdRunRequest(cmd=["ctr"], image=python_image_ref, container="py", jid="py"))
    assert_checksum_kept(engine, "py", DumpRequest(compression=Compression.none))


def test_restore_as_new_container_while_original_runs(engine: Engine, ctr: Ctr) -> None:
    start(engine)
    engine.dump("d1", DumpRequest(leave_running=True))
    with pytest.raises(StateError, match="job d1 is running"):
        engine.restore(RestoreRequest(), jid="d1")
    clone = engine.restore(RestoreRequest(jid="d2"), jid="d1").job
    wait_for(lambda: count(engine, "d2") > 3, what="the clone counting")
    assert {c: s for c, (_, s) in ctr.tasks().items()} == {"d1": "RUNNING", "d2": "RUNNING"}
    rows = {r["id"]: r for r in engine.query("containerd")}
    assert rows["d2"]["jid"] == "d2" and rows["d2"]["pid"] == clone.pid and rows["d2"]["image"] == IMAGE

    # the clone has its own cgroup: pausing the original leaves it counting
    assert cgroup_path(ctr, "d2") == f"/{ctr.namespace}/d2" != cgroup_path(ctr, "d1")
    assert f":/{ctr.namespace}/d2" in Path(f"/proc/{clone.pid}/cgroup").read_text()
    engine.freeze("d1")
    at = count(engine, "d2")
    wait_for(lambda: count(engine, "d2") > at + 3, what="the clone counting while the original is frozen")
    assert ctr.tasks()["d1"][1] == "PAUSED" and ctr.tasks()["d2"][1] == "RUNNING"
    assert not any("checkpoint" in i for i in ctr.images()), "the checkpoint images went after the restore"


def cgroup_path(ctr: Ctr, cid: str) -> str:
    return json.loads(ctr.call("containers", "info", cid))["Spec"]["linux"]["cgroupsPath"]


def test_freeze_and_unfreeze(engine: Engine, ctr: Ctr) -> None:
    start(engine)
    engine.freeze("d1")
    assert ctr.tasks()["d1"][1] == "PAUSED"
    frozen_at = count(engine, "d1")
    time.sleep(0.3)
    assert count(engine, "d1") == frozen_at
    engine.unfreeze("d1")
    wait_for(lambda: count(engine, "d1") > frozen_at, what="counting after unfreeze")


def test_a_frozen_container_dumps_and_stays_frozen(engine: Engine, ctr: Ctr) -> None:
    """How a migration dumps: frozen, leaving it running. containerd refuses to checkpoint a
    paused task, so the task is resumed for it (CRIU leaves it stopped) and paused again."""
    start(engine)
    engine.freeze("d1")
    result = engine.dump("d1", DumpRequest(leave_running=True))
    assert ctr.tasks()["d1"][1] == "PAUSED" and engine.job("d1").state is JobState.frozen
    frozen_at = count(engine, "d1")  # it may have counted once while resumed for the checkpoint
    time.sleep(0.3)
    assert count(engine, "d1") == frozen_at, "no progress after the checkpoint: stopped by CRIU, then paused"
    assert engine.inspect(result.checkpoint).details["paused"]

    clone = engine.restore(RestoreRequest(jid="d2"), jid="d1").job
    assert clone.state is JobState.frozen and ctr.tasks()["d2"][1] == "PAUSED", "restored as it was: frozen"
    assert count(engine, "d2") == frozen_at
    for jid in ("d1", "d2"):
        engine.unfreeze(jid)
        wait_for(lambda jid=jid: count(engine, jid) > frozen_at + 3, what=f"{jid} counting after unfreeze")


def test_manage_a_container_started_by_someone_else(engine: Engine, ctr: Ctr) -> None:
    """Adopted: it has no CRIU config of ours, so only --leave-running dumps of a running
    task; CRIU's defaults apply, and a failing CRIU is reported with its own first error."""
    ctr.call("run", "-d", IMAGE, "theirs")
    job = engine.manage("containerd", ManageRequest(target="theirs", jid="theirs"))
    assert job.managed and job.state is JobState.running and job.pid == ctr.tasks()["theirs"][0]
    assert {r["id"]: r["jid"] for r in engine.query("containerd")}["theirs"] == "theirs"
    wait_for(lambda: count(engine, "theirs") >= 3, what="their container counting")
    with pytest.raises(UsageError, match="not started by cedana-ray: only --leave-running dumps"):
        engine.dump("theirs", DumpRequest())
    if shutil.which("iptables-restore"):
        engine.dump("theirs", DumpRequest(leave_running=True))
    else:  # CRIU locks the network with iptables by default; our containers say nftables
        with pytest.raises(DumpError, match=r"failed: CRIU Error \(.*iptables-restore.*\(log: /"):
            engine.dump("theirs", DumpRequest(leave_running=True))
    assert ctr.tasks()["theirs"][1] == "RUNNING" and engine.job("theirs").state is JobState.running

    engine.freeze("theirs")
    with pytest.raises(StateError, match="cannot checkpoint container theirs while it is frozen"):
        engine.dump("theirs", DumpRequest(leave_running=True))
    assert ctr.tasks()["theirs"][1] == "PAUSED", "a refused dump leaves it as it was"


@pytest.mark.slow
def test_a_cuda_container_is_not_dumped_without_the_driver(
    engine: Engine, ctr: Ctr, python_image_ref: str, tmp_path: Path
) -> None:
    """The GPU interception is wired into containerd dumps: it finds the container's CUDA process."""
    lib = cuda_lookalike(python_rootfs(), tmp_path)
    mount = f"type=bind,src={lib},dst=/opt/libcuda.so.1,options=rbind:ro"
    env = "LD_PRELOAD=/opt/libcuda.so.1"
    ctr.call("run", "-d", "--mount", mount, "--env", env, python_image_ref, "g", "python3", "-c", COUNT)
    engine.manage("containerd", ManageRequest(target="g", jid="g"))
    counting = lambda: count(engine, "g", "/dev/shm/count")  # noqa: E731
    wait_for(lambda: counting() >= 3, what="the container counting")
    assert_cuda_dump_refused(engine, "g", counting)
    assert ctr.tasks()["g"][1] == "RUNNING"


def test_cleanup_leaves_no_task_container_or_snapshot(engine: Engine, ctr: Ctr) -> None:
    start(engine)
    engine.kill("d1")
    wait_for(lambda: engine.job("d1").state is not JobState.running, what="the kill")
    engine.delete("d1")
    assert "d1" not in ctr.containers() and "d1" not in ctr.tasks() and "d1" not in ctr.snapshots()


def test_errors(engine: Engine, ctr: Ctr) -> None:
    with pytest.raises(JobNotFound, match="image localhost/nope:1 not found"):
        engine.run("containerd", ContainerdRunRequest(cmd=["ctr"], image="localhost/nope:1", container="x"))
    with pytest.raises(JobNotFound, match="no containerd container 'nope'"):
        job_for(engine, "containerd", "nope")
    bad = ContainerdRunRequest(cmd=["ctr"], image=IMAGE, container="x", jid="x", snapshotter="nope")
    with pytest.raises(UsageError, match=r"containerd could not start x: .*nope"):  # ctr's own words, via the watcher
        engine.run("containerd", bad)
    assert not engine.paths.job_dir("x").exists() and "x" not in ctr.containers()
    start(engine)
    with pytest.raises(StateError, match="already exists"):
        engine.run("containerd", ContainerdRunRequest(cmd=["ctr"], image=IMAGE, container="d1", jid="other"))
    engine.dump("d1", DumpRequest())
    with pytest.raises(StateError, match="is stopped"):
        engine.manage("containerd", ManageRequest(target="d1"))


def test_cli_errors_are_one_line(ctr: Ctr) -> None:
    assert_one_error(cedana("run", "containerd", "--image", "localhost/nope:1", "--id", "x", "--local"), JobNotFound)
    assert_one_error(cedana("dump", "containerd", "nope", "--local"), JobNotFound)
    assert_one_error(cedana("run", "containerd", "--image", IMAGE, "--id", "a/b", "--local"), UsageError)


def test_features_show_containerd(engine: Engine, ctr: Ctr) -> None:
    features = compute(engine.pm).features
    for row in ("Dump command", "Dump handler", "Restore handler", "Custom cleanup", "Health checks"):
        assert features[row]["containerd"] == "implemented", row
    assert features["Custom reaper"]["containerd"] == features["Custom stop check"]["containerd"] == "implemented"
    assert features["Dump VM handler"]["containerd"] == "unimplemented"
