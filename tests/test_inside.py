"""The in-job API (cedana_ray.checkpoint / on_restore) with real CRIU, in local mode."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from test_process_criu import WORKLOADS, log_lines, start, wait_for

from cedana_ray import inside
from cedana_ray.engine import Engine
from cedana_ray.errors import UsageError
from cedana_ray.requests import RestoreRequest

pytestmark = pytest.mark.criu


def checkpoints_in_log(engine: Engine, jid: str) -> list[str]:
    return [m.group(1) for ln in log_lines(engine, jid) if (m := re.match(r"checkpoint=(\S+)", ln))]


def test_a_job_checkpoints_itself_and_hears_of_its_restore(engine: Engine) -> None:
    jid = start(engine, [sys.executable, str(WORKLOADS / "self_checkpoint.py")], ready="checkpoint=")
    [ckpt] = checkpoints_in_log(engine, jid)
    assert [c.checkpoint for c in engine.checkpoints(jid)] == [ckpt], "the job's own request made a real checkpoint"
    assert engine.checkpoints(jid)[0].metadata == {"count": 5, "stage": "warmup"}
    assert engine.inspect(ckpt).metadata == {"count": 5, "stage": "warmup"}, "in the signed manifest too"
    assert "restored=None" in log_lines(engine, jid)
    wait_for(lambda: "count=10" in log_lines(engine, jid), what="running on after its checkpoint")
    engine.kill(jid)

    engine.restore(RestoreRequest(checkpoint=ckpt), jid=jid)
    wait_for(lambda: "on_restore called" in log_lines(engine, jid), what="the on_restore callback")
    wait_for(lambda: f"restored={ckpt}" in log_lines(engine, jid), what="restored() naming the checkpoint")
    # the restored copy, which was waiting in checkpoint(), got the id it came from
    wait_for(lambda: checkpoints_in_log(engine, jid) == [ckpt, ckpt], what="checkpoint() returning after restore")


def test_outside_a_job_the_api_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CEDANA_RAY_CONTROL", raising=False)
    with pytest.raises(UsageError, match="not inside a cedana-ray job"):
        inside.checkpoint()
    with pytest.raises(UsageError, match="not inside a cedana-ray job"):
        inside.restored()
    with pytest.raises(UsageError):
        inside.on_restore(lambda: None)


def test_metadata_a_job_cannot_pass_on_is_refused_at_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CEDANA_RAY_CONTROL", str(tmp_path))
    with pytest.raises(ValidationError):  # would not survive the trip as `--metadata K=V`
        inside.checkpoint(metadata={"a=b": 1})
    assert list(tmp_path.iterdir()) == [], "refused before any request is written"
