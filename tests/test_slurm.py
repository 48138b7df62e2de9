"""The slurm plugin against real SLURM daemons (munged, slurmctld, slurmd; see slurm_cluster.py).

A rendered batch script brings up Ray and cedana-ray in the allocation and runs the
counter, with a training loop beside it, as a workload; SLURM's own warning (USR1 to the
batch step, from `scancel --batch --signal=USR1` or from a time limit) checkpoints it and
requeues the job, and the requeued run restores it: the count goes on with the digest of an
unbroken run, and the loss curve with the losses of an unbroken run.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from slurm_cluster import SlurmCluster, missing_binaries
from test_cli import assert_one_error, cedana
from test_process_criu import wait_for

from cedana_ray.errors import NotFoundError, PrerequisiteError, UsageError
from cedana_ray.models import Job, JobState
from cedana_ray.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
COUNTER = [sys.executable, str(ROOT / "jobs" / "counter.py"), "0.2"]
TRAIN = [sys.executable, "-m", "cedana_ray.jobs.train", "--backend", "numpy", "--interval", "0.2"]
# one process tree: the counter, and the training loop as its child
WORKLOAD = ["sh", "-c", f"{shlex.join([*TRAIN, '--steps', '100000'])} & exec {shlex.join(COUNTER)}"]
COUNT = re.compile(r"^count=(\d+) pid=\d+ digest=([0-9a-f]{16})$", re.M)
LOSS = re.compile(r"^step=(\d+) loss=(\S+)$", re.M)
RESTORED = "restored the workloads"
pytestmark = [pytest.mark.criu, pytest.mark.slow, pytest.mark.timeout(300)]


def _why_not() -> str | None:
    if missing := missing_binaries():
        return f"SLURM not installed ({', '.join(missing)}): run `make setup`"
    if os.geteuid() != 0:
        return "the test cluster runs slurmd as root"
    return None


def serve(cluster: SlurmCluster) -> Iterator[SlurmCluster]:
    """Start ``cluster`` and point every client at it, for a module fixture; stop it after."""
    if reason := _why_not():
        pytest.skip(reason)
    cluster.start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            for var, value in cluster.env.items():
                mp.setenv(var, value)
            # every allocation's Ray with the token auth of the batch template's own
            for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "CEDANA_RAY_AUTH"):
                mp.delenv(var, raising=False)
            yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def slurm() -> Iterator[SlurmCluster]:
    yield from serve(SlurmCluster())


def submit(slurm: SlurmCluster, where: Path, *render: str, sbatch: tuple[str, ...] = ()) -> tuple[str, Path]:
    """Render the batch script for the counter in ``where`` and submit it: (SLURM job id, its output)."""
    where.mkdir(exist_ok=True)
    script, out = where / "job.sbatch", where / "slurm.out"
    rendered = cedana("slurm", "sbatch", "--output", str(script), "--state-dir", str(where / "state"), *render, "--",
                      *WORKLOAD)  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    done = slurm.run("sbatch", "--parsable", "-D", str(where), "-o", str(out), *sbatch, str(script))
    return done.stdout.strip().split(";")[0], out


def output(out: Path) -> str:
    return out.read_text() if out.exists() else ""


def expected_digest(count: int) -> str:
    """What the counter prints at ``count`` after an unbroken run from 0."""
    state = hashlib.sha256()
    for n in range(count + 1):
        state.update(n.to_bytes(8, "little"))
    return state.hexdigest()[:16]


def assert_count_continues(before: str, after: str) -> None:
    """The counter printed before and after a restore, never restarted, its state intact."""
    first = [int(n) for n, _ in COUNT.findall(before)]
    then = COUNT.findall(after)
    assert first and then, after[-2000:]
    assert int(then[0][0]) > max(first), f"restarted from {then[0][0]} after reaching {max(first)}"
    for n, digest in then[:5]:
        assert digest == expected_digest(int(n)), f"count={n}: the restored state is not the run's"


def assert_loss_continues(before: str, after: str) -> None:
    """The training loop went on from its step, with the losses of an unbroken run."""
    first = [int(n) for n, _ in LOSS.findall(before)]
    then = LOSS.findall(after)[:5]
    assert first and then, after[-2000:]
    assert int(then[0][0]) > max(first), f"training restarted at step {then[0][0]} after {max(first)}"
    unbroken = subprocess.run(
        [*TRAIN, "--interval", "0", "--steps", str(int(then[-1][0]) + 1)], capture_output=True, text=True, check=True
    )
    curve = dict(LOSS.findall(unbroken.stdout))
    assert all(curve[n] == loss for n, loss in then), "the restored training is not the run's"


def leftover_workloads(where: Path) -> list[psutil.Process]:
    """Workloads (counter, training) still running in ``where``: the batch script must have stopped them."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if ("counter.py" in cmd or "cedana_ray.jobs.train" in cmd) and p.cwd() == str(where):
                found.append(p)
        except psutil.Error:
            continue
    return found


def query(job_id: str) -> dict:
    import json

    done = cedana("query", "slurm", "--json")
    assert done.returncode == 0, done.stderr
    rows = {r["slurm_job"]: r for r in json.loads(done.stdout)}
    return rows.get(job_id, {})


def restored_counts(out: Path, runs: int) -> int:
    """Counts printed after the ``runs``-th restore."""
    parts = output(out).split(RESTORED)
    return len(COUNT.findall(parts[runs])) if len(parts) > runs else 0


def test_warnings_checkpoint_requeue_and_restore(slurm: SlurmCluster, home: Path, tmp_path: Path) -> None:
    """One job through both of SLURM's warnings, then cancelled:
    1. a preemption notice, sent as SLURM does it (USR1 to the batch step only);
    2. a time limit: the job's limit is cut to 1 min, so the 60 s warning is due at once
       (slurmctld looks at time limits every 30 s);
    3. scancel: TERM (to the workloads too), so no checkpoint and no requeue; nothing left running."""
    job_id, out = submit(slurm, tmp_path / "sub", "--warning", "60", "--checkpoint-every", "2s")
    wait_for(lambda: "count=3" in output(out), 90, f"the counter to run in job {job_id}")
    row = query(job_id)
    assert row["state"] == "RUNNING" and row["nodes"] == "localhost" and row["ray_address"], row
    assert row["workloads"] == [{"jid": f"slurm-{job_id}", "state": "running"}], row
    wait_for(lambda: query(job_id)["last_checkpoint"], 30, "a periodic checkpoint")
    token = Path(row["home"]) / "ray-auth-token"  # every node of the allocation reads it
    assert token.stat().st_mode & 0o777 == 0o600 and Path(row["home"]).stat().st_mode & 0o777 == 0o700

    slurm.run("scancel", "--batch", "--signal=USR1", job_id)
    wait_for(lambda: restored_counts(out, 1) >= 2, 90, "the counter restored after the preemption notice")
    assert "checkpointed" in output(out) and f"requeueing SLURM job {job_id}" in output(out)
    assert_count_continues(output(out).split(RESTORED)[0], output(out).split(RESTORED)[1])
    slurm.run("scontrol", "update", f"JobId={job_id}", "TimeLimit=1")  # the training is checked while that comes
    wait_for(lambda: LOSS.search(output(out).split(RESTORED)[1]), 30, "training after the restore")
    assert_loss_continues(output(out).split(RESTORED)[0], output(out).split(RESTORED)[1])
    wait_for(lambda: output(out).count("requeueing") == 2, 60, "the time-limit warning")
    slurm.run("scontrol", "update", f"JobId={job_id}", "TimeLimit=UNLIMITED")  # or it is warned at once again
    wait_for(lambda: restored_counts(out, 2) >= 2, 90, "the counter restored after the time-limit warning")
    assert_count_continues(output(out).split(RESTORED)[1], output(out).split(RESTORED)[2])
    wait_for(lambda: LOSS.search(output(out).split(RESTORED)[2]), 30, "training after the second restore")
    assert_loss_continues(output(out).split(RESTORED)[1], output(out).split(RESTORED)[2])
    assert "Restarts=2" in slurm.run("scontrol", "show", "job", job_id).stdout

    slurm.run("scancel", job_id)
    wait_for(lambda: not slurm.run("squeue", "-h", "-j", job_id, check=False).stdout.strip(), 60, "the job to end")
    ended = output(out).split("TERM: ")
    assert len(ended) == 2 and "checkpoint" not in ended[1].replace("no checkpoint now", ""), ended[-1][-2000:]
    assert output(out).count("requeueing") == 2
    wait_for(lambda: not leftover_workloads(tmp_path / "sub"), 10, "the workload to stop with the job")


def test_a_reused_job_id_sets_the_earlier_jobs_state_aside(slurm: SlurmCluster, home: Path, tmp_path: Path) -> None:
    """SLURM reuses job ids once its own state is reset: a new job that finds an earlier one's
    state under its id (its workload recorded, checkpointed) starts afresh beside it."""
    where = tmp_path / "sub"
    next_id = re.search(r"NEXT_JOB_ID\s*=\s*(\d+)", slurm.run("scontrol", "show", "config").stdout)[1]  # type: ignore[index]
    earlier = where / "state" / next_id
    (earlier / "cluster").mkdir(parents=True)
    Registry(earlier / "cluster" / "coordinator.db").add_job(
        Job(jid=f"slurm-{next_id}", type="process", state=JobState.checkpointed)
    )
    job_id, out = submit(slurm, where)
    assert job_id == next_id
    wait_for(lambda: "count=3" in output(out), 90, f"the counter to run in job {job_id}")
    assert f"set aside the state of an earlier SLURM job {job_id}" in output(out)
    assert [p.name.split(".stale-")[0] for p in (where / "state").glob("*.stale-*")] == [job_id]
    slurm.run("scancel", job_id)
    wait_for(lambda: not slurm.run("squeue", "-h", "-j", job_id, check=False).stdout.strip(), 60, "the job to end")


def test_unknown_and_foreign_jobs(slurm: SlurmCluster, home: Path) -> None:
    assert "no SLURM job 999999" in assert_one_error(cedana("dump", "slurm", "999999"), NotFoundError)
    assert_one_error(cedana("restore", "slurm", "not-a-job"), UsageError)
    foreign = slurm.run("sbatch", "--parsable", "-o", "/dev/null", "--wrap", "sleep 60").stdout.strip()
    try:
        assert "does not run cedana-ray" in assert_one_error(cedana("freeze", "slurm", foreign), UsageError)
        assert query(foreign) == {}, "query lists only cedana-ray's jobs"
    finally:
        slurm.run("scancel", foreign)


def test_no_slurmctld(slurm: SlurmCluster, home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "slurm.conf"
    port = re.search(r"SlurmctldPort=(\d+)", slurm.conf.read_text())
    assert port
    from cedana_ray.actors.launcher import free_port

    # nothing listens on that port; clients give up after MessageTimeout
    text = slurm.conf.read_text().replace(port.group(0), f"SlurmctldPort={free_port()}")
    conf.write_text(text + "MessageTimeout=1\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    assert "slurmctld" in assert_one_error(cedana("query", "slurm"), PrerequisiteError)
    assert_one_error(cedana("dump", "slurm", "1"), PrerequisiteError)


def test_features_column(slurm: SlurmCluster, home: Path) -> None:
    import json

    doc = json.loads(cedana("features", "--json", "--errors").stdout)
    col = {row: doc["features"][row]["slurm"] for row in doc["features"]}
    implemented = {"Dump command", "Restore command", "Freeze command", "Unfreeze command", "Query command",
                   "Helper command(s)", "Query handler", "Health checks"}  # fmt: skip
    assert {r for r, s in col.items() if s == "implemented"} == implemented, doc["errors"].get("slurm")
    assert col["Run command"] == col["Dump handler"] == "unimplemented"
    checks = json.loads(cedana("check", "--json").stdout)["checks"]
    slurm_checks = {c["name"]: c["ok"] for c in checks if c["component"] == "plugin slurm"}
    assert slurm_checks == {"version": True, "munge": True, "slurmctld": True}


def test_sbatch_bad_input(home: Path, tmp_path: Path) -> None:
    out = str(tmp_path / "x.sbatch")
    assert_one_error(cedana("slurm", "sbatch", "-o", out, "--checkpoint-every", "soon", "--", "true"), UsageError)
    assert_one_error(cedana("slurm", "sbatch", "-o", out, "--storage", "ftp2://x", "--", "true"), UsageError)
    assert not Path(out).exists()


def test_sbatch_renders_the_preemption_contract(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "x.sbatch"
    done = cedana("slurm", "sbatch", "-o", str(out), "--nodes", "3", "--warning", "90", "--storage", "s3://b/ck",
                  "--checkpoint-every", "5m", "--", "python", "train.py", "--lr", "0.1")  # fmt: skip
    assert done.returncode == 0, done.stderr
    script = out.read_text()
    wanted = (
        "#SBATCH --nodes=3",
        "#SBATCH --signal=B:USR1@90",
        "#SBATCH --requeue",
        "trap on_warning USR1",
        "trap on_term TERM",
        '"$PYTHON" -m cedana_ray.auth',  # Ray's token authentication, from the job's state dir
    )
    for line in wanted:
        assert line in script, line
    assert "--storage s3://b/ck" in script and "--checkpoint-every 5m -- python train.py --lr 0.1" in script
    assert 'dump slurm "$SLURM_JOB_ID"; then' in script  # the store's own compression
    assert "{{" not in script and os.access(out, os.X_OK)


def test_setup_and_destroy(home: Path, tmp_path: Path) -> None:
    import json

    target = tmp_path / "etc"
    done = cedana("slurm", "setup", "--dir", str(target), "--warning", "90", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert "PreemptMode=REQUEUE" in doc["slurm_conf"] and "GraceTime=90" in doc["slurm_conf"]
    assert sorted(p.name for p in target.iterdir()) == ["cedana-ray.sbatch.tmpl", "slurm.conf.cedana-ray"]
    assert cedana("slurm", "destroy", "--dir", str(target)).returncode == 0
    assert not target.exists()
    assert_one_error(cedana("slurm", "destroy", "--dir", str(target)), NotFoundError)
