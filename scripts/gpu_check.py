"""The GPU check: a PyTorch CUDA job dumped, killed and restored by cedana-ray.

Run by scripts/gpu-check.sh on a GPU machine (``--device cpu`` rehearses the same flow
anywhere). Steps: run jobs/gpu_train.py once uninterrupted (the reference, and the
cost of rebuilding its state from scratch); run it again under cedana-ray in local
mode with GPU tracing, dump it mid-training (the job stops), restore it, take a
second leave-running checkpoint later, and let it finish. Passes when every step's
loss and the tensors' checksum match the reference exactly. Prints a report and
writes it as JSON to OUT/gpu-check-RUNTIME.json.

``--runtime runc containerd`` runs the job as a runc container, then as a containerd
one, instead of (or after) a process, against the same reference run. A container's root
is this machine's own files (each top-level directory bound read-only) with the NVIDIA
device nodes, so it needs no image from a registry: containerd (a private daemon started
here) gets an image of one layer (the machine's top-level links), built here. On a GPU
each run traces the job's GPU use and checks the restore gap in the trace.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cedana_ray.plugins.containerd import archive
from cedana_ray.plugins.containerd.client import Ctr
from cedana_ray.plugins.containerd.requests import BindMount, ContainerdRunRequest
from cedana_ray.plugins.runc.plugin import RuncRunRequest

from cedana_ray import nvml
from cedana_ray.config import Paths
from cedana_ray.engine import Engine
from cedana_ray.models import Compression, JobState
from cedana_ray.requests import DumpRequest, RestoreRequest, RunRequest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from containerd_daemon import start_containerd  # noqa: E402 (a module of the tests that needs only cedana-ray)

IMAGE = "cedana-ray.local/gpu-check/host:1"
RUNTIMES = ("process", "runc", "containerd")
# Not bound into the runc job's root: the kernel's and runtimes' trees, and where other
# containers' and removable filesystems are mounted.
SKIPPED = {"proc", "sys", "dev", "run", "var", "mnt", "media"}
STEP = re.compile(r"step (\d+) loss (\S+) state (-?\d+)")


def parse(text: str) -> dict[str, Any]:
    steps: dict[int, tuple[str, str]] = {}
    repeated = []
    for m in STEP.finditer(text):
        i = int(m.group(1))
        if i in steps:
            repeated.append(i)
        steps[i] = (m.group(2), m.group(3))
    ready = re.search(r"ready (\S+) state (-?\d+) gpu_bytes (\d+)", text)
    return {
        "steps": steps,
        "repeated": repeated,
        "ready_s": float(ready.group(1)) if ready else None,
        "gpu_bytes": int(ready.group(3)) if ready else 0,
        "done": "done" in text.split(),
    }


def wait_for(check: Any, timeout: float, what: str, engine: Engine | None = None) -> Any:
    """Poll ``check``; fail fast, with the job's log, if the job is gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        if engine and engine.job("gpu").state not in (JobState.running, JobState.frozen):
            break
        time.sleep(0.05)
    if engine:
        job = engine.job("gpu")
        tail = Path(job.log).read_text()[-3000:] if job.log else ""
        print(f"job {job.state.value} (exit {job.exit_code}); its log ends:\n{tail}", flush=True)
    raise SystemExit(f"gpu-check: gave up waiting for {what}")


def reference(cmd: list[str]) -> dict[str, Any]:
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return {**parse(out), "wall_s": time.perf_counter() - start}


def host_tops() -> tuple[list[BindMount], dict[str, str]]:
    """This machine's top-level directories, as a container's root: the real ones as bind
    mounts, read-only with what is mounted under them, but /tmp writable and without (other
    containers' overlays, which CRIU would have to restore too); and the symbolic links
    (``bin -> usr/bin``), which the root must hold itself (CRIU cannot restore a bind mount
    whose source is a link)."""
    tops = [top for top in sorted(Path("/").iterdir()) if top.name not in SKIPPED and top.is_dir()]
    links = {top.name: os.readlink(top) for top in tops if top.is_symlink()}
    dirs = {str(top): top.name == "tmp" for top in tops if top.name not in links}
    return [BindMount(source=d, destination=d, readonly=not tmp, recursive=not tmp) for d, tmp in dirs.items()], links


def runc_bundle(dest: Path, cmd: list[str]) -> Path:
    """An OCI bundle running ``cmd`` on this machine's files, with its environment and GPUs."""
    dest.mkdir(parents=True)
    subprocess.run(["runc", "spec", "--bundle", str(dest)], check=True)
    spec = json.loads((dest / "config.json").read_text())
    (dest / "rootfs").mkdir()
    mounts, links = host_tops()
    for name, target in links.items():
        (dest / "rootfs" / name).symlink_to(target)
    for m in mounts:
        options = ["rbind" if m.recursive else "bind", "ro" if m.readonly else "rw"]
        spec["mounts"].append({"destination": m.destination, "type": "bind", "source": m.source, "options": options})
    for node in nvml.device_nodes():
        spec["mounts"].append({"destination": node, "type": "bind", "source": node, "options": ["bind"]})
    spec["root"] = {"path": "rootfs", "readonly": False}
    spec["process"].update(terminal=False, args=cmd, cwd="/", env=[f"{k}={v}" for k, v in os.environ.items()])
    spec["linux"]["resources"]["devices"] = [{"allow": True, "access": "rwm"}]
    (dest / "config.json").write_text(json.dumps(spec, indent=1))
    return dest


def host_image(dest: Path) -> Path:
    """The OCI archive of IMAGE: one layer of the links of :func:`host_tops`, for a root
    made of its mounts."""
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:
        for name, target in host_tops()[1].items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    blobs: dict[str, bytes] = {}
    diff = archive.add_blob(blobs, layer.getvalue())
    rootfs = {"type": "layers", "diff_ids": [diff["digest"]]}
    config = archive.add_blob(blobs, json.dumps({"architecture": "amd64", "os": "linux", "rootfs": rootfs}).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", **diff}],
    }
    top = {"mediaType": manifest["mediaType"], **archive.add_blob(blobs, json.dumps(manifest).encode())}
    archive.write_archive(dest, {"schemaVersion": 2, "manifests": [archive.named(top, IMAGE)]}, data=blobs)
    return dest


@contextmanager
def containerd() -> Iterator[None]:
    """A private containerd with IMAGE, as the containerd plugin's (CONTAINERD_ADDRESS).
    Its directory is a short path (a socket's has at most 104 bytes), in memory where it
    can be: containerd's content store holds each checkpoint on its way to our store."""
    base = Path(tempfile.mkdtemp(prefix="cedana-ray-ctrd-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    daemon = start_containerd(base)
    ctr = Ctr(str(base / "containerd.sock"), "gpu-check")
    os.environ.update(CONTAINERD_ADDRESS=ctr.address, CONTAINERD_NAMESPACE=ctr.namespace)
    try:
        ctr.call("images", "import", str(host_image(base / "image.tar")))
        yield
    finally:
        for cid in ctr.containers():
            ctr.remove(cid)
        daemon.terminate()
        daemon.wait(30)
        shutil.rmtree(base, ignore_errors=True)


def start(engine: Engine, cmd: list[str], runtime: str, device: str) -> Path:
    """The job under cedana-ray in ``runtime``, its GPU use traced on a GPU; its log."""
    gpu = device == "cuda"
    if runtime == "runc":
        bundle = runc_bundle(engine.paths.home / "bundle", cmd)
        request: RunRequest = RuncRunRequest(cmd=cmd, jid="gpu", bundle=str(bundle), container="gpu", gpu_tracing=gpu)
    elif runtime == "containerd":
        snapshotter = "overlayfs" if "overlay" in Path("/proc/filesystems").read_text() else "native"
        request = ContainerdRunRequest(
            cmd=cmd, jid="gpu", image=IMAGE, container="gpu", args=cmd, env=dict(os.environ), cwd="/",
            mounts=host_tops()[0], gpu=gpu, gpu_tracing=gpu, snapshotter=snapshotter,
        )  # fmt: skip
    else:
        # this script's environment, as the uninterrupted run has it (CUDA's and PyTorch's settings)
        request = RunRequest(cmd=cmd, jid="gpu", gpu=gpu, gpu_tracing=gpu, inherit_env=True)
    return Path(engine.run(runtime, request).log)


def under_cedana(engine: Engine, cmd: list[str], runtime: str, args: argparse.Namespace) -> dict[str, Any]:
    log = start(engine, cmd, runtime, args.device)
    wait_for(lambda: f"step {args.dump_at} " in log.read_text(), 90, f"step {args.dump_at}", engine)
    users = [r["jobs"] for r in engine.query("gpu")] if args.device == "cuda" else []
    env = {**os.environ, "CEDANA_RAY_HOME": str(engine.paths.home)}
    ps = subprocess.run([sys.executable, "-m", "cedana_ray.cli", "ps", "--json"], capture_output=True, env=env)
    ps_gpus = {r["jid"]: r.get("gpus") for r in json.loads(ps.stdout or "[]")}.get("gpu")
    dump = engine.dump("gpu", DumpRequest(compression=Compression(args.compression), streams=16))
    assert engine.job("gpu").state is JobState.checkpointed
    manifest = engine.inspect(dump.checkpoint)
    restored = engine.restore(RestoreRequest(streams=16), jid="gpu")
    wait_for(lambda: f"step {args.dump_at + 20} " in log.read_text(), 90, "training after restore", engine)
    hot = engine.dump("gpu", DumpRequest(compression=Compression.none, leave_running=True, streams=16))
    wait_for(lambda: parse(log.read_text())["done"], 120, "the end of training", engine)
    return {
        "run": parse(log.read_text()),
        "dump": dump.model_dump(),
        "gpu": manifest.details.get("gpu", {}),
        "restore": restored.model_dump(),
        "hot_dump": hot.model_dump(),
        "trace": _trace(engine, log) if args.device == "cuda" else None,
        "query_gpu_jobs": users,
        "ps_gpus": ps_gpus,
    }


def _trace(engine: Engine, log: Path) -> dict[str, Any]:
    from cedana_ray.plugins.gpu import tracing

    time.sleep(0.5)
    return tracing.summary(log.with_name(tracing.TRACE))


def verdict(ref: dict[str, Any], got: dict[str, Any], args: argparse.Namespace) -> list[str]:
    failures = []
    run = got["run"]
    if not ref["done"] or len(ref["steps"]) != args.steps:
        failures.append("the reference run did not finish")
    if set(run["steps"]) != set(range(args.steps)):
        failures.append(f"steps missing after restore: {sorted(set(range(args.steps)) - set(run['steps']))[:5]}")
    if run["repeated"]:
        failures.append(f"steps ran twice (a restart, not a restore): {run['repeated'][:5]}")
    diff = [i for i in ref["steps"] if run["steps"].get(i) != ref["steps"][i]]
    if diff:
        failures.append(
            f"{len(diff)} steps differ from the reference, first {diff[0]}: "
            f"{run['steps'].get(diff[0])} != {ref['steps'][diff[0]]}"
        )
    if args.device == "cuda":
        if not got["gpu"].get("processes"):
            failures.append("the dump did not intercept any CUDA process")
        if not any("gpu" in jobs for jobs in got["query_gpu_jobs"]):
            failures.append(f"`query gpu` does not list the job on any GPU: {got['query_gpu_jobs']}")
        if not got["ps_gpus"]:
            failures.append(f"`ps --json` shows no GPU for the job: {got['ps_gpus']}")
        if not (got["trace"] or {}).get("gaps"):
            failures.append(f"the GPU trace has no restore gap: {got['trace']}")
    return failures


def report(ref: dict[str, Any], got: dict[str, Any], failures: list[str]) -> dict[str, Any]:
    t = got["dump"]["timings"]
    gib = (got["gpu"].get("memory_bytes") or ref["gpu_bytes"]) / 2**30  # NVML's count, else torch's
    gpu_ckpt = t.get("cuda_lock", 0) + t.get("cuda_checkpoint", 0)
    doc = {
        "ok": not failures,
        "failures": failures,
        "gpu_state_gib": round(gib, 3),
        "image_gib": round(got["dump"]["image_bytes"] / 2**30, 3),
        "lock_s": t.get("cuda_lock"),
        "gpu_checkpoint_s": t.get("cuda_checkpoint"),
        "gpu_checkpoint_gib_per_s": round(gib / gpu_ckpt, 2) if gpu_ckpt else None,
        "criu_dump_s": t.get("criu_dump"),
        "store_s": t.get("commit"),
        "dump_total_s": got["dump"]["duration_s"],
        "restore_total_s": got["restore"]["duration_s"],
        "cuda_restore_s": got["restore"]["timings"].get("cuda_restore"),
        "hot_dump_total_s": got["hot_dump"]["duration_s"],
        "rebuild_from_scratch_s": ref["ready_s"],
        "restore_vs_rebuild": round(got["restore"]["duration_s"] / ref["ready_s"], 3) if ref["ready_s"] else None,
        "dump_timings": t,
        "restore_timings": got["restore"]["timings"],
        "hot_dump_timings": got["hot_dump"]["timings"],
        "trace": got["trace"],
        "steps_compared": len(ref["steps"]),
    }
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gib", type=int, default=3)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--dump-at", type=int, default=30)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--compression", default="none")
    parser.add_argument("--runtime", nargs="+", choices=RUNTIMES, default=["process"], help="one or more")
    parser.add_argument("--home", type=Path, default=Path("/dev/shm/cedana-ray-gpu-check"))
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    cmd = [
        sys.executable,
        str(ROOT / "jobs" / "gpu_train.py"),
        "--gib",
        str(args.gib),
        "--steps",
        str(args.steps),
        "--device",
        args.device,
    ]
    ref = reference(cmd)
    print(f"reference: {len(ref['steps'])} steps, state rebuilt in {ref['ready_s']:.2f} s", flush=True)
    passed = [check(runtime, ref, cmd, args) for runtime in args.runtime]
    sys.exit(0 if all(passed) else 1)


def check(runtime: str, ref: dict[str, Any], cmd: list[str], args: argparse.Namespace) -> bool:
    """The check in ``runtime``; whether it passed. It leaves neither a job holding GPU
    memory, even after a crash, nor its checkpoints (two of the job's size each, in memory
    under the default home) for the next runtime's check."""
    engine = Engine(Paths(args.home / runtime))
    try:
        with containerd() if runtime == "containerd" else contextlib.nullcontext():
            got = under_cedana(engine, cmd, runtime, args)
    except (Exception, SystemExit) as exc:
        print(f"gpu-check ({runtime}): FAIL {exc}", flush=True)
        return False
    finally:
        with contextlib.suppress(Exception):
            engine.kill("gpu")
        shutil.rmtree(engine.paths.home, ignore_errors=True)
    doc = report(ref, got, verdict(ref, got, args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"gpu-check-{runtime}.json").write_text(json.dumps(doc, indent=2, default=str))
    print(json.dumps(doc, indent=2, default=str))
    print(f"gpu-check ({runtime}):", "PASS" if doc["ok"] else "FAIL " + "; ".join(doc["failures"]), flush=True)
    return doc["ok"]


if __name__ == "__main__":
    main()
