"""Encryption is a setting of the job (run --encrypt) or of the machine (CEDANA_RAY_KEY): every
checkpoint is then encrypted, however it is made; the cluster's (up --encrypt) is in test_cluster."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from test_cli import assert_one_error, cedana
from test_process_criu import COUNTER, wait_for

import cedana_ray
from cedana_ray.crypto import ALGORITHM, fingerprint
from cedana_ray.errors import UsageError
from cedana_ray.models import JobState
from cedana_ray.store import MANIFEST

pytestmark = pytest.mark.criu
KEY = bytes(range(32))


def manifests(home: Path) -> list[dict[str, object]]:
    return [json.loads(p.read_text()) for p in (home / "checkpoints").glob(f"*/{MANIFEST}")]


def encrypted_job(jid: str, tmp_path: Path, *options: str) -> None:
    """Run the counter as job ``jid`` with ``run --encrypt --key-file`` (and ``options``)."""
    key_file = tmp_path / "key"
    key_file.write_text(KEY.hex())
    run = cedana(
        "run", "process", "--jid", jid, "--encrypt", "--key-file", str(key_file), *options, "--local", "--", *COUNTER
    )
    assert run.returncode == 0, run.stderr


def encrypted_with_key(found: list[dict[str, object]]) -> bool:
    return {(m["encryption"], m["key_fingerprint"]) for m in found} == {(ALGORITHM, fingerprint(KEY))}


def test_a_job_run_with_encrypt_has_its_policy_checkpoints_encrypted(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CEDANA_RAY_KEY", raising=False)
    encrypted_job("e1", tmp_path, "--checkpoint-every", "1s")
    wait_for(lambda: len(manifests(home)) >= 2, what="two policy checkpoints")
    assert cedana("job", "kill", "e1", "--local").returncode == 0, "which ends its policy runner"
    assert encrypted_with_key(manifests(home))


def test_a_job_run_with_encrypt_has_its_dumps_encrypted_without_a_key_given(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CEDANA_RAY_KEY", raising=False)
    encrypted_job("e1", tmp_path)
    wait_for(lambda: "count=2" in (home / "jobs" / "e1" / "log").read_text(), what="counting")
    assert cedana("dump", "job", "e1", "--local").returncode == 0, "a plain `dump job`, no key given"
    assert cedana("restore", "job", "e1", "--local").returncode == 0, "restored without the key given again"
    assert cedana("dump", "job", "e1", "--local").returncode == 0
    found = manifests(home)
    assert len(found) == 2 and encrypted_with_key(found)
    assert KEY.hex() not in (home / "jobs" / "e1" / "log").read_text()


def test_a_key_in_the_environment_encrypts_every_dump(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CEDANA_RAY_KEY", KEY.hex())
    assert cedana("run", "process", "--jid", "e2", "--local", "--", *COUNTER).returncode == 0
    dumped = cedana("dump", "job", "e2", "--leave-running", "--local", "--json")
    assert dumped.returncode == 0, dumped.stderr
    assert [m["encryption"] for m in manifests(home)] == [ALGORITHM]


def test_encrypt_without_a_key_is_refused(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CEDANA_RAY_KEY", raising=False)
    result = cedana("run", "process", "--jid", "e3", "--encrypt", "--local", "--", *COUNTER)
    assert "--encrypt needs a key" in assert_one_error(result, UsageError)
    assert json.loads(cedana("ps", "--local", "--json").stdout) == []
    assert not [p for p in home.rglob("*") if p.name == "encryption.key"]


def test_the_job_key_is_private(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CEDANA_RAY_KEY", raising=False)
    key_file = tmp_path / "key"
    key_file.write_text(os.urandom(32).hex())
    run = cedana("run", "process", "--jid", "e4", "--encrypt", "--key-file", str(key_file), "--local", "--", *COUNTER)
    assert run.returncode == 0, run.stderr
    kept = home / "jobs" / "e4" / "encryption.key"
    assert kept.stat().st_mode & 0o777 == 0o600


def test_the_python_api_takes_the_same_options(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CEDANA_RAY_KEY", raising=False)
    monkeypatch.setattr("cedana_ray.api._backend", None)  # put back afterwards: init() sets it
    cedana_ray.init(local=True)
    job = cedana_ray.run(COUNTER, jid="e5", encrypt=True, key=KEY)
    dumped = job.dump()
    assert [m["key_fingerprint"] for m in manifests(home)] == [fingerprint(KEY)]
    assert cedana_ray.restore("e5", key=KEY).job.state is JobState.running
    assert dumped.checkpoint in {c.checkpoint for c in cedana_ray.checkpoints("e5")}
    cedana_ray.kill("e5")
