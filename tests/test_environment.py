"""Secrets stay secret: what environment a workload gets, what ``ps`` and ``/proc`` show of
a job's processes and of ours, what its checkpoint holds, and what ``--debug`` prints."""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path

import psutil
import pytest
from test_cli import cedana
from test_process_criu import wait_for

from cedana_ray.engine import Engine
from cedana_ray.environment import redact, secret, workload_env
from cedana_ray.requests import RunRequest

# prints its environment's names, then holds it (and a copy in os.environ) in memory
SHOW = [sys.executable, "-c", "import os, time; print(' '.join(sorted(os.environ)), flush=True); time.sleep(600)"]


@pytest.mark.parametrize(
    "name",
    [
        *("CEDANA_RAY_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "GOOGLE_APPLICATION_CREDENTIALS", "RAY_AUTH_TOKEN"),
        *("HF_TOKEN", "DB_PASSWORD", "MY_API_KEY", "SSH_AUTH_SOCK", "azure_client_secret"),
    ],
)
def test_credentials_and_keys_are_secret(name: str) -> None:
    assert secret(name)


@pytest.mark.parametrize("name", ["PATH", "HOME", "KEYBOARD", "MONKEY_BUSINESS", "CEDANA_RAY_HOME", "TOKENIZERS"])
def test_other_names_are_not(name: str) -> None:
    assert not secret(name)


SOURCE = {"PATH": "/bin", "HOME": "/root", "LC_ALL": "C", "EDITOR": "vi", "AWS_SECRET_ACCESS_KEY": "s"}


def test_a_workload_gets_the_defaults_and_what_it_was_given() -> None:
    given = {"AWS_SECRET_ACCESS_KEY": "mine", "X": "1"}
    defaults = {"PATH": "/bin", "HOME": "/root", "LC_ALL": "C"}
    assert workload_env(given, inherit=False, source=SOURCE) == {**defaults, **given}


def test_inheriting_takes_all_but_the_secrets_and_what_is_given_wins() -> None:
    assert workload_env({"PATH": "/mine"}, inherit=True, source=SOURCE) == {
        "PATH": "/mine",
        "HOME": "/root",
        "LC_ALL": "C",
        "EDITOR": "vi",
    }


def test_redact_hides_env_values_secret_variables_and_key_files(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("00" * 32 + "\n")
    argv = ["run", "process", "--env", "A=value-one", "--env=B=value-two", "--key-file", str(key), "--", "x"]
    text = f"value-one value-two {'00' * 32} aws-secret ok"
    said = redact(text, argv, {"AWS_SECRET_ACCESS_KEY": "aws-secret", "PATH": "ok"})
    assert said == "*** *** *** *** ok"


def test_debug_output_is_redacted(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", cli_secret := secrets.token_hex(8))
    given = secrets.token_hex(8)
    # an error whose message and traceback carry both: the command names them
    command = f"/nonexistent/{given}{cli_secret}"
    ran = cedana("--debug", "run", "process", "--env", f"T={given}", "--local", "--", command)
    assert ran.returncode != 0 and "Traceback" in ran.stderr and "cannot run '/nonexistent/***" in ran.stderr
    assert given not in ran.stderr + ran.stdout and cli_secret not in ran.stderr + ran.stdout


def proc_text(pid: int, what: str) -> str:
    return Path(f"/proc/{pid}/{what}").read_bytes().decode(errors="replace")


def around(pid: int) -> tuple[psutil.Process, list[psutil.Process]]:
    """A job's workload (the init's child) and every process of the job and of ours around
    it: its supervisor (the init's parent), the supervisor's control server, the init."""
    init = psutil.Process(pid)
    supervisor = init.parent()
    assert supervisor is not None and "supervisor.py" in " ".join(supervisor.cmdline())
    (workload,) = init.children()
    return workload, [supervisor, *supervisor.children(recursive=True)]


@pytest.mark.criu
def test_secrets_stay_out_of_argv_environments_and_checkpoints(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ours = {"CEDANA_RAY_KEY": secrets.token_hex(32), "AWS_SECRET_ACCESS_KEY": secrets.token_hex(12)}
    for name, value in ours.items():
        monkeypatch.setenv(name, value)  # in the CLI's environment
    given = secrets.token_hex(12)
    ran = cedana("run", "process", "--jid", "s1", "--env", f"SOME_SECRET={given}", "--local", "--", *SHOW)
    assert ran.returncode == 0, ran.stderr
    log = Path(Engine().log_path("s1"))
    names = wait_for(lambda: log.read_text().split(), what="the workload's environment")
    assert "SOME_SECRET" in names and "PATH" in names and not set(ours) & set(names)

    workload, procs = around(Engine().job("s1").pid)
    assert len(procs) == 4, "supervisor, control server, init, workload"
    for p in procs:
        cmdline, environ = proc_text(p.pid, "cmdline"), proc_text(p.pid, "environ")
        assert given not in cmdline, p.cmdline()
        assert (given in environ) == (p == workload), p.cmdline()
        assert not any(value in cmdline + environ for value in ours.values()), p.cmdline()

    monkeypatch.delenv("CEDANA_RAY_KEY")  # a key there would encrypt the dump: its pages are searched in the clear
    dumped = cedana("dump", "job", "s1", "--leave-running", "--compression", "none", "--local", "--json")
    assert dumped.returncode == 0, dumped.stderr
    pages = b"".join(p.read_bytes() for p in Path(json.loads(dumped.stdout)["path"][7:]).rglob("pages-*.img"))
    assert given.encode() in pages, "the workload's own memory is there: the search works"
    assert not any(value.encode() in pages for value in ours.values())


@pytest.mark.criu
def test_a_job_inherits_the_environment_only_when_asked(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CEDANA_RAY_TEST_VISIBLE", "yes")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "no")
    for jid, inherit in (("plain", False), ("inherits", True)):
        engine.run("process", RunRequest(cmd=SHOW, jid=jid, inherit_env=inherit))
    names = {
        jid: wait_for(lambda jid=jid: Path(engine.log_path(jid)).read_text().split(), what=f"{jid}'s environment")
        for jid in ("plain", "inherits")
    }
    assert "CEDANA_RAY_TEST_VISIBLE" not in names["plain"] and "CEDANA_RAY_TEST_VISIBLE" in names["inherits"]
    assert not any("AWS_SECRET_ACCESS_KEY" in found for found in names.values())


def test_settings_named_like_secrets_are_not_redacted() -> None:
    """An auth mode or a token's path is what an error is about, not a secret."""
    env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": "/state/ray-auth-token", "RAY_AUTH_TOKEN": "0123abcd"}
    said = redact("refused our auth token (0123abcd) from /state/ray-auth-token", [], env)
    assert said == "refused our auth token (***) from /state/ray-auth-token"
