"""The crio plugin against real CRI runtimes started here under temp dirs: containerd 2.x,
whose CRI checkpoints (a busybox counter in a host-network pod, adopted, dumped, killed and
restored into its pod through CreateContainer from the archive, cloned, reaped, cleaned
up), and Debian 12's containerd 1.6, whose CRI answers UNIMPLEMENTED: the plugin says so."""

from __future__ import annotations

import json
import os
import secrets
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from cedana_ray.plugins.crio.client import Cri, messages
from containers import missing, read_count
from cri_daemons import CGROUP_PARENT, CONTAINERD2, config_v2, cri_containerd
from test_cli import assert_one_error, cedana
from test_process_criu import wait_for

from cedana_ray.backend import job_for
from cedana_ray.engine import Engine
from cedana_ray.errors import (
    CorruptCheckpoint,
    JobNotFound,
    PrerequisiteError,
    StateError,
    UsageError,
)
from cedana_ray.features import compute
from cedana_ray.models import Compression, CriuOptions, JobState
from cedana_ray.requests import DumpRequest, ManageRequest, RestoreRequest

NEEDS = ("runc", "containerd", "umoci")
WHY = missing(*NEEDS) or (
    None if (CONTAINERD2 / "containerd").exists() else f"containerd 2.x not in {CONTAINERD2} (run `make setup`)"
)
pytestmark = [pytest.mark.criu, pytest.mark.skipif(bool(WHY), reason=str(WHY))]


@pytest.fixture
def cri(cri2: tuple[Cri, str], home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Cri]:
    """The test's view of the CRI endpoint; every container it leaves is removed."""
    monkeypatch.setenv("CONTAINER_RUNTIME_ENDPOINT", cri2[0].endpoint)
    yield cri2[0]
    for c in cri2[0].containers():
        cri2[0].remove(c.id)


@pytest.fixture
def image(cri2: tuple[Cri, str]) -> str:
    return cri2[1]


def run_pod(cri: Cri, name: str) -> tuple[str, object]:
    """A host-network pod, as a kubelet would start it (no CNI here)."""
    pb = messages()
    config = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, uid=secrets.token_hex(4), namespace="default"),
        log_directory=str(Path(cri.target.removeprefix("unix://")).parent / "logs" / name),
    )
    config.linux.security_context.namespace_options.network = pb.NODE
    config.linux.cgroup_parent = CGROUP_PARENT
    return cri.call("RunPodSandbox", pb.RunPodSandboxRequest(config=config)).pod_sandbox_id, config


def run_counter(cri: Cri, image: str, name: str = "counter") -> str:
    """A counter container in a new pod, in its own PID namespace (the Kubernetes default):
    a restore into the pod's PID namespace would meet the dumped processes' PIDs."""
    pod, pod_config = run_pod(cri, f"pod-{secrets.token_hex(3)}")
    pb = messages()
    config = pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name), image=pb.ImageSpec(image=image))
    config.log_path = f"{name}.log"
    config.linux.security_context.namespace_options.pid = pb.CONTAINER
    cid = cri.create(pod, config, pod_config)
    cri.start(cid)
    wait_for(lambda: count(cri, cid) >= 3, what="the counter counting")
    return cid


def count(cri: Cri, cid: str) -> int:
    """The counter inside the container, through its init's root."""
    _, info = cri.status(cid)
    return read_count(f"/proc/{info['pid']}/root/count") if "pid" in info else -1


def state(cri: Cri, cid: str) -> str:
    status, _ = cri.status(cid)
    return messages().ContainerState.Name(status.state)


def test_health_says_checkpoint_is_implemented(cri: Cri) -> None:
    from cedana_ray.plugins.crio.plugin import health_checks

    checks = {c.name: c for c in health_checks()}
    assert checks["cri endpoint"].ok and "containerd 2." in checks["cri endpoint"].detail
    assert checks["cri checkpoint"].ok, checks["cri checkpoint"].detail


def test_counter_continues_after_dump_kill_restore(engine: Engine, cri: Cri, image: str) -> None:
    cid = run_counter(cri, image)
    job = engine.manage("crio", ManageRequest(target=cid, jid="c1"))
    assert job.details["target"] == cid and job.pid
    # far enough that a container started afresh could not have counted as far by the time we look
    before = wait_for(lambda: (n := count(cri, cid)) >= 40 and n, what="the counter reaching 40")
    result = engine.dump("c1", DumpRequest())
    assert engine.job("c1").state is JobState.checkpointed
    wait_for(lambda: state(cri, cid) == "CONTAINER_EXITED", what="the dumped container stopping")
    manifest = engine.inspect(result.checkpoint)
    assert manifest.details["runtime"].startswith("containerd 2.")
    assert [f.name for f in manifest.files] == ["checkpoint.tar"]

    restored = engine.restore(RestoreRequest(), jid="c1").job
    new = restored.details["target"]
    assert new != cid and restored.details["name"] == "counter" and restored.details["pod"] == job.details["pod"]
    restored_at = count(cri, new)
    assert restored_at >= before, "the counter came back from the checkpoint, not from 0"
    wait_for(lambda: count(cri, new) > restored_at + 3, what="counting after restore")
    assert restored.state is JobState.running and state(cri, new) == "CONTAINER_RUNNING"
    assert cid not in {c.id for c in cri.containers()}, "the dumped container made way for the restored one"


def test_clone_runs_beside_the_original(engine: Engine, cri: Cri, image: str) -> None:
    cid = run_counter(cri, image)
    engine.manage("crio", ManageRequest(target=cid, jid="c1"))
    engine.dump("c1", DumpRequest(leave_running=True, compression=Compression.none))  # restored in place
    with pytest.raises(StateError, match="job c1 is running"):
        engine.restore(RestoreRequest(), jid="c1")
    clone = engine.restore(RestoreRequest(jid="c2"), jid="c1").job
    wait_for(lambda: count(cri, clone.details["target"]) > 3, what="the clone counting")
    rows = {r["name"]: r for r in engine.query("crio")}
    assert rows["counter"]["jid"] == "c1" and rows["counter"]["state"] == "running"
    assert rows["c2"]["jid"] == "c2" and rows["c2"]["id"] == clone.details["target"]


def test_corrupted_archive_never_reaches_the_runtime(engine: Engine, cri: Cri, image: str) -> None:
    """A CRI restore cannot start stopped: an in-place archive is verified before CreateContainer."""
    cid = run_counter(cri, image)
    engine.manage("crio", ManageRequest(target=cid, jid="c1"))
    result = engine.dump("c1", DumpRequest(compression=Compression.none))
    archive = engine.paths.checkpoints / result.checkpoint / "data" / "checkpoint.tar"
    raw = bytearray(archive.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    archive.write_bytes(bytes(raw))
    before = {c.id for c in cri.containers()}
    with pytest.raises(CorruptCheckpoint, match=r"checkpoint\.tar"):
        engine.restore(RestoreRequest(), jid="c1")
    assert {c.id for c in cri.containers()} == before, "no container was created from it"
    assert engine.job("c1").state is JobState.checkpointed


def test_reaper_and_cleanup(engine: Engine, cri: Cri, image: str) -> None:
    cid = run_counter(cri, image)
    job = engine.manage("crio", ManageRequest(target=cid, jid="c1"))
    os.kill(job.pid, signal.SIGKILL)  # it dies outside cedana-ray: the reaper asks the runtime
    wait_for(lambda: engine.job("c1").state is JobState.exited, what="the reaper")
    assert engine.job("c1").exit_code == 137, "the runtime's exit code of a SIGKILLed container"
    engine.delete("c1")
    assert cid not in {c.id for c in cri.containers()}


def test_errors(engine: Engine, cri: Cri, image: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(JobNotFound, match="no CRI container 'nope'"):
        job_for(engine, "crio", "nope")
    cid = run_counter(cri, image)
    engine.manage("crio", ManageRequest(target=cid, jid="c1"))
    with pytest.raises(UsageError, match="takes no CRIU options"):
        engine.dump("c1", DumpRequest(criu=CriuOptions(tcp_established=True)))
    assert state(cri, cid) == "CONTAINER_RUNNING", "a refused dump leaves the container alone"
    monkeypatch.setenv("CONTAINER_RUNTIME_ENDPOINT", "unix:///nonexistent/cri.sock")
    with pytest.raises(PrerequisiteError, match="not reachable: no socket"):
        job_for(engine, "crio", "other")


def test_cli_dump_and_restore(cri: Cri, image: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cid = run_counter(cri, image)
    monkeypatch.delenv("CONTAINER_RUNTIME_ENDPOINT")  # the option names it; the job records it
    dumped = cedana("dump", "crio", "--cri-endpoint", cri.endpoint, cid, "--local", "--json")
    assert dumped.returncode == 0, dumped.stderr
    doc = json.loads(dumped.stdout)
    restored = cedana("restore", "crio", "--cri-endpoint", cri.endpoint, "--path", doc["path"], "--local", "--json")
    assert restored.returncode == 0, restored.stderr
    job = json.loads(restored.stdout)
    assert job["jid"] == doc["jid"] and job["type"] == "crio" and job["state"] == "running"
    rows = json.loads(cedana("query", "crio", "--cri-endpoint", cri.endpoint, "--local", "--json").stdout)
    (row,) = [r for r in rows if r["jid"] == job["jid"]]
    assert row["state"] == "running" and row["name"] == "counter" and row["id"] != cid


@pytest.mark.parametrize("gone", ["stopped", "removed"])
def test_restore_into_a_new_pod_when_its_pod_is_gone(engine: Engine, cri: Cri, image: str, gone: str) -> None:
    """As after a node restart or an eviction: the dump recorded the pod's config, and the
    restore starts a pod like it (the next attempt of its name), which cleanup removes."""
    cid = run_counter(cri, image)
    job = engine.manage("crio", ManageRequest(target=cid, jid="c1"))
    before = wait_for(lambda: (n := count(cri, cid)) >= 20 and n, what="the counter reaching 20")
    engine.dump("c1", DumpRequest())
    # stopping a pod while its container is still being killed fails in containerd ("ttrpc: closed")
    wait_for(lambda: state(cri, cid) == "CONTAINER_EXITED", what="the dumped container stopping")
    old = job.details["pod"]
    meta = cri.pod(old)[0].metadata
    cri.call("StopPodSandbox", messages().StopPodSandboxRequest(pod_sandbox_id=old))
    if gone == "removed":
        cri.call("RemovePodSandbox", messages().RemovePodSandboxRequest(pod_sandbox_id=old))

    restored = engine.restore(RestoreRequest(), jid="c1").job
    new_pod, new = restored.details["pod"], restored.details["target"]
    assert new_pod != old and restored.details["own_pod"]
    status = cri.pod(new_pod)[0]
    assert status.state == 0 and (status.metadata.name, status.metadata.uid) == (meta.name, meta.uid)
    # the next attempt of the name where the stopped pod still holds it, as the kubelet counts
    assert status.metadata.attempt == meta.attempt + (gone == "stopped")
    assert count(cri, new) >= before, "the counter came back from the checkpoint, not from 0"
    at = count(cri, new)
    wait_for(lambda: count(cri, new) > at + 3, what="counting in the new pod")

    # dumped and restored again, it goes back into that pod, which it still owns
    engine.dump("c1", DumpRequest())
    again = engine.restore(RestoreRequest(), jid="c1").job
    assert again.details["pod"] == new_pod and again.details["own_pod"]
    engine.kill("c1")
    engine.delete("c1")
    assert new_pod not in {p.id for p in cri.pods()}, "cleanup removed the pod the restore made"


def test_cli_errors_are_one_line(cri: Cri, monkeypatch: pytest.MonkeyPatch) -> None:
    assert_one_error(cedana("dump", "crio", "nope", "--local"), JobNotFound)
    down = cedana("query", "crio", "--cri-endpoint", "unix:///no/cri.sock", "--local")
    line = assert_one_error(down, PrerequisiteError)
    assert "CRI endpoint unix:///no/cri.sock is not reachable: no socket at /no/cri.sock" in line
    monkeypatch.setenv("CONTAINER_RUNTIME_ENDPOINT", "unix:///nonexistent/cri.sock")
    line = assert_one_error(cedana("dump", "crio", "x", "--local"), PrerequisiteError)
    assert "CRI endpoint unix:///nonexistent/cri.sock is not reachable" in line


def test_features_show_crio(engine: Engine, cri: Cri) -> None:
    matrix = compute(engine.pm)
    for row in ("Dump command", "Dump handler", "Restore handler", "Custom reaper", "Query handler", "Health checks"):
        assert matrix.features[row]["crio"] == "implemented", row
    for row in ("Freeze handler", "Run handler (serverless)"):  # the CRI has no pause; pods belong to their owner
        assert matrix.features[row]["crio"] == "unimplemented", row
    assert "crio" not in matrix.errors


def test_containerd_1_6_cri_cannot_checkpoint(
    tmp_path: Path, cri_images: dict[str, Path], engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Debian 12's containerd answers UNIMPLEMENTED: the health check, and so the feature
    matrix, say so, and a dump would fail with the same one line."""
    pause = {"localhost/pause:latest": cri_images["localhost/pause:latest"]}
    with cri_containerd(tmp_path / "c16", "/usr/bin/containerd", config_v2(tmp_path / "c16"), pause) as cri:
        monkeypatch.setenv("CONTAINER_RUNTIME_ENDPOINT", cri.endpoint)
        assert cri.version().runtime_version.startswith("1.6")
        with pytest.raises(PrerequisiteError, match=r"containerd 1\.6\S* does not implement CRI CheckpointContainer"):
            cri.probe_checkpoint()
        matrix = compute(engine.pm)
    assert matrix.features["Dump handler"]["crio"] == "incompatible"
    (reason,) = [r for r in matrix.errors["crio"] if "cri checkpoint" in r]
    assert "does not implement CRI CheckpointContainer" in reason and "containerd >= 2.0" in reason
