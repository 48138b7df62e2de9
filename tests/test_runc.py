"""The runc plugin with real runc and CRIU: a busybox counter container, dumped,
killed, restored, cloned, frozen, queried, cleaned up; and its error paths."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cedana_ray.plugins.runc.plugin import RuncRestoreRequest, RuncRunRequest
from cedana_ray.plugins.runc.runtime import Runc
from containers import (
    COUNT,
    assert_checksum_kept,
    bundle,
    busybox_rootfs,
    checksummed_cmd,
    counts,
    last_count,
    missing,
    python_rootfs,
)
from test_cli import assert_one_error, cedana
from test_gpu import assert_cuda_dump_refused, cuda_lookalike
from test_process_criu import wait_for

from cedana_ray.backend import job_for
from cedana_ray.engine import Engine
from cedana_ray.errors import CheckpointNotFound, DumpError, JobNotFound, StateError, UsageError
from cedana_ray.features import compute
from cedana_ray.models import Compression, JobState
from cedana_ray.proctree import alive
from cedana_ray.requests import DumpRequest, RestoreRequest

pytestmark = [pytest.mark.criu, pytest.mark.skipif(bool(missing("runc")), reason=str(missing("runc")))]


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return busybox_rootfs(tmp_path_factory.mktemp("runc") / "rootfs")


@pytest.fixture(scope="session")
def counter_bundle(rootfs: Path) -> Path:
    return bundle(rootfs.parent / "bundle", rootfs)


@pytest.fixture(scope="session")
def python_bundle(rootfs: Path) -> Path:
    """The Python container holding 256 MiB (its rootfs built once, then cached)."""
    return bundle(rootfs.parent / "python-bundle", python_rootfs(), cmd=checksummed_cmd())


@pytest.fixture(autouse=True)
def no_containers_left(home: Path) -> Iterator[None]:
    """Whatever a test leaves under its runc root is deleted (containers and cgroups)."""
    yield
    r = Runc(home / "runc")
    for c in r.containers():
        r.delete(c["id"])


def log(engine: Engine, jid: str) -> Path:
    return engine.paths.job_dir(jid) / "log"


def start(engine: Engine, counter_bundle: Path, cid: str = "c1") -> str:
    request = RuncRunRequest(cmd=["runc"], bundle=str(counter_bundle), container=cid, jid=cid)
    engine.run("runc", request)
    wait_for(lambda: last_count(log(engine, cid)) >= 3, what=f"{cid} counting")
    return cid


def runc(engine: Engine) -> Runc:
    return Runc(engine.paths.home / "runc")


@pytest.mark.parametrize("compression", [Compression.zstd, Compression.none])  # none: restored in place
def test_counter_continues_after_dump_kill_restore(
    engine: Engine, counter_bundle: Path, compression: Compression
) -> None:
    start(engine, counter_bundle)
    result = engine.dump("c1", DumpRequest(compression=compression))
    assert engine.job("c1").state is JobState.checkpointed
    stopped_at = last_count(log(engine, "c1"))
    time.sleep(0.3)
    assert last_count(log(engine, "c1")) == stopped_at, "the container must be gone after a dump"

    job = engine.restore(RestoreRequest(), jid="c1").job
    assert job.state is JobState.running and job.last_checkpoint == result.checkpoint
    wait_for(lambda: last_count(log(engine, "c1")) > stopped_at + 3, what="counting after restore")
    found = counts(log(engine, "c1"))
    assert found == list(range(len(found))), "counting went on without a restart, a gap or a repeat"
    manifest = engine.inspect(result.checkpoint)
    assert manifest.details["container"] == "c1" and manifest.details["bundle"] == str(counter_bundle)
    assert "pid" in manifest.details["namespaces"] and manifest.details["rootfs"]


def test_a_dump_returns_once_its_container_is_gone(engine: Engine, counter_bundle: Path) -> None:
    """Once a dump (without --leave-running) returns, the container's init is dead and runc
    reports it stopped: checked at once, not waited for, a few times (issue 16)."""
    for attempt in range(3):
        cid = start(engine, counter_bundle, f"gone{attempt}")
        job = engine.job(cid)
        engine.dump(cid, DumpRequest())
        dead, status = not alive(job.pid, job.details["started"]), runc(engine).state(cid)["status"]
        assert dead and status == "stopped", f"dump {attempt}: container {job.pid} {status}, dead: {dead}"


@pytest.mark.slow
@pytest.mark.skipif(bool(missing("debootstrap")), reason=str(missing("debootstrap")))
def test_python_container_keeps_its_256_mib_across_restore(engine: Engine, python_bundle: Path) -> None:
    engine.run("runc", RuncRunRequest(cmd=["runc"], bundle=str(python_bundle), container="py", jid="py"))
    assert_checksum_kept(engine, "py", DumpRequest(compression=Compression.none))


@pytest.mark.skipif(bool(missing("debootstrap")), reason=str(missing("debootstrap")))
def test_a_cuda_container_is_not_dumped_without_the_driver(engine: Engine, rootfs: Path, tmp_path: Path) -> None:
    """The GPU interception is wired into runc dumps: it finds the container's CUDA process."""
    lib = cuda_lookalike(python_rootfs(), tmp_path)
    cuda_bundle = bundle(tmp_path / "bundle", python_rootfs(), cmd=["python3", "-u", "-c", COUNT])
    config = cuda_bundle / "config.json"
    spec = json.loads(config.read_text())
    spec["mounts"].append({"destination": "/opt/libcuda.so.1", "type": "bind", "source": str(lib), "options": ["bind"]})
    spec["process"]["env"].append("LD_PRELOAD=/opt/libcuda.so.1")
    config.write_text(json.dumps(spec))
    engine.run("runc", RuncRunRequest(cmd=["runc"], bundle=str(cuda_bundle), container="g", jid="g"))
    wait_for(lambda: last_count(log(engine, "g")) >= 3, what="the container counting")
    assert_cuda_dump_refused(engine, "g", lambda: last_count(log(engine, "g")))
    assert {c["id"]: c["status"] for c in runc(engine).containers()} == {"g": "running"}


def test_restore_as_new_container_while_original_runs(engine: Engine, counter_bundle: Path, tmp_path: Path) -> None:
    start(engine, counter_bundle)
    engine.dump("c1", DumpRequest(leave_running=True))
    with pytest.raises(StateError, match="job c1 is running"):
        engine.restore(RestoreRequest(), jid="c1")
    with pytest.raises(UsageError, match="not an OCI bundle"):
        engine.restore(RuncRestoreRequest(jid="c2", bundle=str(tmp_path)), jid="c1")
    clone = engine.restore(RestoreRequest(jid="c2"), jid="c1").job
    assert clone.jid == "c2" and clone.target == "c2"
    wait_for(lambda: last_count(log(engine, "c2")) > 0, what="the clone counting")
    states = {c["id"]: c["status"] for c in runc(engine).containers()}
    assert states == {"c1": "running", "c2": "running"}
    rows = {r["id"]: r for r in engine.query("runc")}
    assert rows["c2"]["jid"] == "c2" and rows["c2"]["pid"] == clone.pid


def test_freeze_and_unfreeze(engine: Engine, counter_bundle: Path) -> None:
    start(engine, counter_bundle)
    assert engine.freeze("c1").state is JobState.frozen
    assert runc(engine).state("c1")["status"] == "paused"
    frozen_at = last_count(log(engine, "c1"))
    time.sleep(0.3)
    assert last_count(log(engine, "c1")) == frozen_at
    engine.unfreeze("c1")
    wait_for(lambda: last_count(log(engine, "c1")) > frozen_at, what="counting after unfreeze")


def test_cleanup_leaves_no_container(engine: Engine, counter_bundle: Path) -> None:
    start(engine, counter_bundle)
    engine.kill("c1")
    wait_for(lambda: engine.job("c1").state is not JobState.running, what="the kill")
    engine.delete("c1")
    assert runc(engine).containers() == []
    assert not engine.paths.job_dir("c1").exists()


def test_manage_a_container_started_elsewhere(engine: Engine, counter_bundle: Path) -> None:
    r = runc(engine)
    outside = r.argv("run", "--detach", "--bundle", str(counter_bundle), "outside")
    # its stdio /dev/null, as a detached container's often is: not the test's own stderr, which
    # pytest captures into a deleted temp file that CRIU cannot dump (files-reg: "Can't lookup mount")
    quiet = subprocess.DEVNULL
    subprocess.run(outside, check=True, stdin=quiet, stdout=quiet, stderr=quiet)
    try:
        job = job_for(engine, "runc", "outside")
        assert job.managed and job.pid == r.state("outside")["pid"]
        assert job_for(engine, "runc", "outside").jid == job.jid, "a managed container is found by its id"
        if shutil.which("iptables-restore"):
            assert engine.dump(job.jid, DumpRequest()).size_bytes > 0
        else:  # not ours, so no nftables network lock through our CRIU config: CRIU's own error
            with pytest.raises(DumpError, match="iptables-restore"):
                engine.dump(job.jid, DumpRequest())
    finally:
        r.delete("outside")


def test_errors(engine: Engine, rootfs: Path, tmp_path: Path) -> None:
    with pytest.raises(JobNotFound, match="no runc container 'nope'"):
        job_for(engine, "runc", "nope")
    with pytest.raises(UsageError, match="not an OCI bundle"):
        engine.run("runc", RuncRunRequest(cmd=["runc"], bundle=str(tmp_path), container="x"))
    done = bundle(tmp_path / "done", rootfs, "true")
    subprocess.run(runc(engine).argv("run", "--detach", "--bundle", str(done), "stopped"), check=True)
    wait_for(lambda: runc(engine).state("stopped")["status"] == "stopped", what="the container to stop")
    with pytest.raises(StateError, match="runc container stopped is stopped"):
        job_for(engine, "runc", "stopped")


def test_cli_errors_are_one_line(home: Path, counter_bundle: Path, tmp_path: Path) -> None:
    assert_one_error(cedana("dump", "runc", "nope", "--local"), JobNotFound)
    assert_one_error(cedana("run", "runc", "--bundle", str(tmp_path), "--id", "x", "--local"), UsageError)
    assert_one_error(cedana("run", "runc", "--bundle", str(counter_bundle), "--id", "../x", "--local"), UsageError)
    assert_one_error(cedana("restore", "runc", "--path", f"file://{tmp_path}/none", "--local"), CheckpointNotFound)


def test_features_show_runc(engine: Engine) -> None:
    features = compute(engine.pm).features
    for row in ("Dump command", "Dump handler", "Restore middleware (late)", "Custom reaper", "Health checks"):
        assert features[row]["runc"] == "implemented", row
    assert features["Dump VM handler"]["runc"] == "unimplemented"
