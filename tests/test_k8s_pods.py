"""`dump k8s NS/POD` and `restore k8s NS/POD`: a pod's containers checkpointed and restored
the Kubernetes way, against real components: containerd 2.1.9's CRI and Debian's
docker-registry as tests/test_cri.py starts them (its session fixture ``cri2``), a pod
sandbox and container made as the kubelet makes them, the checkpoint exported as an OCI
checkpoint image, read back by checkpointctl 1.3, and restored from that image through
CreateContainer into a new sandbox. No kubelet or API server: the kubelet's part (the
sandbox and container configs and labels) is played by the test."""

from __future__ import annotations

import itertools
import json
import re
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cedana_ray.plugins.crio.client import Cri, messages
from cedana_ray.plugins.k8s import image
from cedana_ray.plugins.k8s.pods import CONTAINER_NAME, POD_NAME, POD_NAMESPACE, POD_UID
from cri_daemons import CGROUP_PARENT, CONTAINERD2
from test_cli import assert_one_error, cedana
from test_cri import WHY as CRI_MISSING
from test_cri import count, state
from test_process_criu import wait_for

from cedana_ray.errors import JobNotFound, NotFoundError, PrerequisiteError, StateError, UsageError

CHECKPOINTCTL = CONTAINERD2 / "checkpointctl"
pytestmark = [pytest.mark.criu, pytest.mark.skipif(bool(CRI_MISSING), reason=str(CRI_MISSING))]


@pytest.fixture
def node(cri2: tuple[Cri, str], home: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Cri, str]]:
    """This node's CRI (CONTAINER_RUNTIME_ENDPOINT) and the counter image; pods removed afterwards."""
    cri = cri2[0]
    monkeypatch.setenv("CONTAINER_RUNTIME_ENDPOINT", cri.endpoint)
    yield cri2
    for pod in cri.pods():
        cri.remove_pod(pod.id)


def kubelet_sandbox(cri: Cri, namespace: str, name: str) -> tuple[str, object]:
    """A host-network pod sandbox as the kubelet makes one: metadata, io.kubernetes.pod.* labels."""
    pb = messages()
    uid = secrets.token_hex(8)
    config = pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=0),
        labels={POD_NAME: name, POD_NAMESPACE: namespace, POD_UID: uid},
        log_directory=str(Path(cri.target.removeprefix("unix://")).parent / "logs" / f"{namespace}_{name}_{uid}"),
    )
    config.linux.security_context.namespace_options.network = pb.NODE
    config.linux.cgroup_parent = CGROUP_PARENT
    return cri.run_pod(config), config


def kubelet_counter(cri: Cri, image_ref: str, namespace: str, name: str) -> tuple[str, str, object]:
    """A pod running the busybox counter as container ``counter`` (kubelet labels, own PID namespace)."""
    pod, config = kubelet_sandbox(cri, namespace, name)
    return pod, kubelet_container(cri, pod, config, image_ref, "counter"), config


def kubelet_container(cri: Cri, pod: str, config: object, image_ref: str, name: str) -> str:
    """Container ``name`` of the counter image in the pod, as the kubelet creates it; started."""
    pb, meta = messages(), config.metadata
    container = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=name),
        image=pb.ImageSpec(image=image_ref),
        labels={CONTAINER_NAME: name, POD_NAME: meta.name, POD_NAMESPACE: meta.namespace, POD_UID: meta.uid},
        log_path=f"{name}/0.log",
    )
    container.linux.security_context.namespace_options.pid = pb.CONTAINER
    (Path(config.log_directory) / name).mkdir(parents=True, exist_ok=True)
    cid = cri.create(pod, container, config)
    cri.start(cid)
    return cid


def logged_counts(path: Path) -> list[int]:
    """The counts a container printed, from its CRI log (``TIME stdout F count=N``)."""
    return [int(n) for n in re.findall(r" stdout F count=(\d+)$", path.read_text(), re.M)]


def run_checkpointctl(*args: str) -> str:
    result = subprocess.run([str(CHECKPOINTCTL), *args], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_pod_dumped_to_a_checkpoint_image_and_restored_from_it(node: tuple[Cri, str], tmp_path: Path) -> None:
    assert CHECKPOINTCTL.exists(), f"no {CHECKPOINTCTL}: `make setup` installs it with the CRI"
    cri, counter_image = node
    registry = counter_image.split("/")[0]
    name = f"trainer-{secrets.token_hex(3)}"
    pod, cid, config = kubelet_counter(cri, counter_image, "ml", name)
    wait_for(lambda: count(cri, cid) >= 20, what="the counter reaching 20")

    ref = f"{registry}/ckpt-{name}:1"
    dumped = cedana("dump", "k8s", f"ml/{name}", "--export-image", ref, "--local", "--json")
    assert dumped.returncode == 0, dumped.stderr
    (row,) = json.loads(dumped.stdout)
    assert (row["container"], row["image"]) == ("counter", ref) and row["checkpoint"]
    wait_for(lambda: state(cri, cid) == "CONTAINER_EXITED", what="the dumped container stopping")

    # the image as Kubernetes sees it: the annotation, and the archive as its layer
    manifest = image.manifest_of(image.Ref.parse(ref))
    assert manifest["annotations"][image.CHECKPOINT_NAME] == "counter"
    archive = image.download_layer(image.Ref.parse(ref), manifest, tmp_path / "checkpoint.tar")
    inspected = run_checkpointctl("inspect", str(archive))
    assert "\ncounter\n" in inspected, inspected  # the tree's root: the container's name
    assert "Engine: containerd" in inspected and "Runtime: io.containerd.runc.v2" in inspected, inspected

    log = Path(config.log_directory) / "counter" / "0.log"  # the kubelet's path, the same for the new one
    cri.remove_pod(pod)
    assert name not in {p.metadata.name for p in cri.pods()}
    restored = cedana("restore", "k8s", f"ml/{name}", "--from-image", ref, "--local", "--json")
    assert restored.returncode == 0, restored.stderr
    (back,) = json.loads(restored.stdout)
    assert back["container"] == "counter" and back["sandbox"] != pod and back["from"] == ref

    status = cri.pod(back["sandbox"])[0]
    meta = config.metadata
    assert (status.metadata.name, status.metadata.namespace, status.metadata.uid) == (name, "ml", meta.uid)
    assert status.metadata.attempt == 1, "the next attempt of the pod's sandbox, as the kubelet counts"
    assert {k: status.labels[k] for k in (POD_NAME, POD_NAMESPACE, POD_UID)} == dict(config.labels)
    new = back["id"]
    new_status, _ = cri.status(new)
    assert new_status.labels[CONTAINER_NAME] == "counter" and new_status.metadata.name == "counter"
    at = count(cri, new)
    wait_for(lambda: count(cri, new) > at + 5, what="the counter counting in the new pod")

    # no gap, no repeat: the log (the checkpoint's copy of it, then the restored counter's
    # lines) counts on from where the checkpoint was taken. One line may show twice, at the
    # seam (seen with containerd 2.1.9; whether from the log in the runtime's archive or from
    # the restored process is not established, docs/kubernetes.md says so).
    counts = logged_counts(log)
    assert sorted(set(counts)) == list(range(counts[-1] + 1)), "no count is missing"
    repeats = [a for a, b in itertools.pairwise(counts) if b <= a]
    assert len(repeats) <= 1 and all(b - a in (0, 1) for a, b in itertools.pairwise(counts)), counts
    assert counts[-1] > at

    # the sandbox the restore made goes with the job's container when the job is deleted
    for verb in ("kill", "delete"):
        assert cedana("job", verb, back["jid"], "--local").returncode == 0
    assert back["sandbox"] not in {p.id for p in cri.pods()}


def test_two_containers_come_back_in_one_new_sandbox(node: tuple[Cri, str]) -> None:
    """Without an image: each container's cedana-ray checkpoint, restored through the
    pipeline (CreateContainer from the archive's path); the first restore makes the sandbox,
    the second goes into it."""
    cri, counter_image = node
    name = f"pair-{secrets.token_hex(3)}"
    pod, config = kubelet_sandbox(cri, "ml", name)
    ids = {c: kubelet_container(cri, pod, config, counter_image, c) for c in ("a", "b")}
    wait_for(lambda: min(count(cri, i) for i in ids.values()) >= 10, what="both counting")
    line = assert_one_error(cedana("dump", "k8s", f"ml/{name}", "--container", "c", "--local"), JobNotFound)
    assert "has no running container 'c' (it has: a, b)" in line
    unreachable = cedana(
        "dump", "k8s", f"ml/{name}", "--container", "a", "--export-image", "localhost:1/x:1", "--local"
    )
    assert "registry at http://localhost:1 is not reachable" in assert_one_error(unreachable, PrerequisiteError)
    assert state(cri, ids["a"]) == "CONTAINER_RUNNING", "a failed export stops nothing"
    ref = f"{counter_image.split('/')[0]}/pair-{name}:1"
    dumped = cedana("dump", "k8s", f"ml/{name}", "--export-image", ref, "--local", "--json")
    assert dumped.returncode == 0, dumped.stderr
    rows = json.loads(dumped.stdout)
    assert [r["container"] for r in rows] == ["a", "b"] and len({r["jid"] for r in rows}) == 2
    assert [r["image"] for r in rows] == [f"{ref}-a", f"{ref}-b"], "one image per container, by tag"
    for r in rows:
        notes = image.manifest_of(image.Ref.parse(r["image"]))["annotations"]
        assert notes[image.CHECKPOINT_NAME] == notes[image.CRIU_NAME] == r["container"]
    for i in ids.values():
        wait_for(lambda i=i: state(cri, i) == "CONTAINER_EXITED", what="the dumped containers stopping")
    cri.remove_pod(pod)
    other = cedana("restore", "k8s", "ml/other", "--path", rows[0]["path"], "--local")
    assert f"is of pod ml/{name}, not ml/other" in assert_one_error(other, UsageError)

    restored = cedana("restore", "k8s", f"ml/{name}", "--local", "--json")
    assert restored.returncode == 0, restored.stderr
    back = json.loads(restored.stdout)
    assert sorted(r["container"] for r in back) == ["a", "b"]
    assert {r["jid"] for r in back} == {r["jid"] for r in rows}, "each container is its job again"
    (sandbox,) = {r["sandbox"] for r in back}
    assert sandbox != pod and cri.pod(sandbox)[0].metadata.attempt == 1
    for r in back:
        at = count(cri, r["id"])
        assert at >= 10, "from the checkpoint, not from 0"
        wait_for(lambda r=r, at=at: count(cri, r["id"]) > at + 3, what=f"{r['container']} counting again")

    # the sandbox goes with the last of its containers' jobs, not with the one that made it
    first, second = sorted(back, key=lambda r: r["container"])
    for verb in ("kill", "delete"):
        assert cedana("job", verb, first["jid"], "--local").returncode == 0
    assert sandbox in {p.id for p in cri.pods()} and state(cri, second["id"]) == "CONTAINER_RUNNING"
    for verb in ("kill", "delete"):
        assert cedana("job", verb, second["jid"], "--local").returncode == 0
    assert sandbox not in {p.id for p in cri.pods()}


def test_bad_input_is_one_line(node: tuple[Cri, str]) -> None:
    cri, counter_image = node
    registry = counter_image.split("/")[0]
    assert "no pod ml/no-such-pod" in assert_one_error(cedana("dump", "k8s", "ml/no-such-pod", "--local"), JobNotFound)
    assert_one_error(cedana("dump", "k8s", "not-a-pod", "--local"), UsageError)
    empty = f"empty-{secrets.token_hex(3)}"
    kubelet_sandbox(cri, "ml", empty)
    line = assert_one_error(cedana("dump", "k8s", f"ml/{empty}", "--local"), StateError)
    assert f"pod ml/{empty} has no running container" in line
    # the counter's own image is no checkpoint image
    line = assert_one_error(cedana("restore", "k8s", "ml/x", "--from-image", counter_image, "--local"), UsageError)
    assert "is not a checkpoint image" in line
    missing = cedana("restore", "k8s", "ml/x", "--from-image", f"{registry}/nothing:1", "--local")
    assert "no image" in assert_one_error(missing, NotFoundError)
    assert_one_error(cedana("restore", "k8s", "ml/x", "--local"), JobNotFound)  # nothing of it was dumped
