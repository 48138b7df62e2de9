"""A two-node allocation against real SLURM daemons: node crs1 is this machine, crs2 a
slurmd in a network namespace of its own (see slurm_cluster.py and netns.py).

The batch script starts the Ray head on the first node and a Ray worker on the second
with srun; cedana-ray's control plane spans both. A second workload is started on crs2
beside the batch script's own on crs1; SLURM's warning checkpoints both at once, the job
is requeued, and the requeued run restores both with their state intact.
"""

from __future__ import annotations

import itertools
import json
import shlex
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import netns
import pytest
from slurm_cluster import SlurmCluster
from test_cli import cedana
from test_process_criu import wait_for
from test_slurm import (
    COUNT,
    COUNTER,
    LOSS,
    RESTORED,
    assert_count_continues,
    assert_loss_continues,
    expected_digest,
    leftover_workloads,
    output,
    query,
    restored_counts,
    serve,
    submit,
)

pytestmark = [pytest.mark.criu, pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def slurm2() -> Iterator[SlurmCluster]:
    if reason := netns.why_not():
        pytest.skip(reason)
    yield from serve(SlurmCluster(nodes=2, memory_mb=8000))


def cedana_json(*args: str) -> object:
    """``cedana-ray ARGS --json`` (before any ``--``), decoded."""
    cut = args.index("--") if "--" in args else len(args)
    done = cedana(*args[:cut], "--json", *args[cut:])
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def ray_nodes() -> dict[str, str]:
    """The allocation's nodes with a working agent, as `cedana-ray nodes` reports them: host -> node id."""
    return {n["hostname"]: n["node"] for n in cedana_json("nodes") if not n["error"]}  # type: ignore[union-attr]


def assert_side_continues(before: str, after: str) -> None:
    """The counter on crs2 went on after the restore from where it stopped, with its state:
    its log counts up without a restart and past the count it had reached."""
    reached = max(int(n) for n, _ in COUNT.findall(before))
    counts = [(int(n), digest) for n, digest in COUNT.findall(after)]
    assert all(b[0] == a[0] + 1 for a, b in itertools.pairwise(counts)), "the count jumped or restarted"
    later = [(n, digest) for n, digest in counts if n > reached]
    assert later, after[-2000:]
    assert all(digest == expected_digest(n) for n, digest in later[:5]), "the restored state is not the run's"


@pytest.fixture
def ray_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """TMPDIR for the jobs (sbatch passes it on; short: Ray's socket paths must stay under
    108 chars): where every node starter keeps its Ray's temp dir."""
    path = Path(tempfile.mkdtemp(prefix="crst-"))
    monkeypatch.setenv("TMPDIR", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_two_nodes_checkpoint_requeue_and_restore(
    slurm2: SlurmCluster, home: Path, tmp_path: Path, ray_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    where = tmp_path / "sub"
    job_id, out = submit(slurm2, where, "--nodes", "2", "--warning", "60")
    wait_for(lambda: "count=3" in output(out), 90, f"the counter to run in job {job_id}")
    row = query(job_id)
    assert row["state"] == "RUNNING" and row["nodes"] == "crs[1-2]", row
    monkeypatch.setenv("CEDANA_RAY_HOME", row["home"])  # from here on, the allocation's cedana-ray
    hosts = {socket.gethostname(), "crs2"}
    nodes = ray_nodes()
    assert set(nodes) == hosts, "the Ray worker on crs2 joined the head on crs1"

    # the second workload writes its count to a file of its own: read without Ray, and kept across restore
    side_out = where / "side.out"
    side_cmd = f"exec {shlex.join(COUNTER)} >>{side_out}"
    side = cedana_json("run", "process", "--node", nodes["crs2"], "--jid", "side", "--", "sh", "-c", side_cmd)
    assert side["node"] == nodes["crs2"], side  # type: ignore[index]
    wait_for(lambda: "count=3" in output(side_out), 30, "the workload on crs2")

    before = output(side_out)  # it stops counting with the checkpoint
    slurm2.run("scancel", "--batch", "--signal=USR1", job_id)
    wait_for(lambda: restored_counts(out, 1) >= 2, 120, "the workloads restored after the warning")
    text = output(out)
    assert "checkpointed" in text and f"requeueing SLURM job {job_id}" in text
    assert_count_continues(*text.split(RESTORED)[:2])
    wait_for(lambda: LOSS.search(output(out).split(RESTORED)[1]), 30, "training after the restore")
    assert_loss_continues(*output(out).split(RESTORED)[:2])
    assert set(ray_nodes()) == hosts, "the requeued run has its two nodes again"
    states = {j["jid"]: j["state"] for j in cedana_json("ps")}  # type: ignore[union-attr]
    assert states == {f"slurm-{job_id}": "running", "side": "running"}, states
    wait_for(lambda: len(COUNT.findall(output(side_out))) > len(COUNT.findall(before)) + 2, 30, "the restored side")
    assert_side_continues(before, output(side_out))

    slurm2.run("scancel", job_id)
    wait_for(lambda: not slurm2.run("squeue", "-h", "-j", job_id, check=False).stdout.strip(), 60, "the job to end")
    wait_for(lambda: not leftover_workloads(where), 10, "the workloads to stop with the job")
    left = [p.name() for p in slurm2.hosts["crs2"].processes()]
    assert left == ["slurmd"], f"left on crs2 after the job: {left}"
    assert not list(ray_tmp.iterdir()), "a node starter left its Ray temp dir behind"
