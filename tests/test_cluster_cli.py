"""`cedana-ray up` / `down`, the CLI against a cluster, and `ray job submit` as an entrypoint.

`up` starts its own Ray head here (no address given), with Ray's token authentication on,
as it is by default: cedana-ray's own clients (the CLI, the agents, a job's supervisor
serving the job's own checkpoint) use the token; a Ray client without it is refused.
The module shares one cluster; the last test takes it `down`, which must stop exactly it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from conftest import kill_jobs
from test_cache import loaded_modules
from test_cli import assert_one_error, cedana
from test_process_criu import COUNTER, WORKLOADS, wait_for
from test_wait import counts_to

from cedana_ray import auth
from cedana_ray.errors import JobNotFound, PermissionDenied, PrerequisiteError, StateError, UsageError

pytestmark = [pytest.mark.criu, pytest.mark.ray, pytest.mark.timeout(240)]
RAY = str(Path(sys.executable).with_name("ray"))
# a client without the token gives up after about this many seconds, not Ray's default 20
QUICK_GIVE_UP = {"RAY_gcs_server_port_wait_time_s": "1"}


def cli_json(*args: str) -> object:
    done = cedana(*args, "--json", timeout=180)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def head_processes(temp_dir: str) -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]


def ray_env(home: Path, **auth_env: str) -> dict[str, str]:
    """The environment of a Ray client with no token but ``auth_env`` (and none in ~/.ray)."""
    env = {k: v for k, v in os.environ.items() if k not in (auth.MODE, auth.TOKEN, auth.TOKEN_PATH)}
    return {**env, "HOME": str(home), **auth_env}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The module's CEDANA_RAY_HOME; every job started in it is killed afterwards."""
    home = tmp_path_factory.mktemp("cli-cluster") / "home"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CEDANA_RAY_HOME", str(home))
        for var in ("CEDANA_RAY_STORAGE", "RAY_ADDRESS", auth.MODE, auth.TOKEN, auth.TOKEN_PATH, auth.OPT_OUT):
            mp.delenv(var, raising=False)  # `up`'s default: a token of its own
        yield home
    kill_jobs(home)


@pytest.fixture(scope="module")
def up(home: Path) -> Iterator[dict]:
    try:
        state = cli_json("up")
    except BaseException:
        cedana("down")  # stops a head an interrupted `up` left
        raise
    assert isinstance(state, dict)
    yield state
    if (home / "cluster.json").exists():
        cedana("down", "--kill-jobs", timeout=180)


def test_up_creates_a_private_token_that_never_reaches_argv(up: dict, home: Path) -> None:
    token_file = Path(up["auth_token_file"])
    assert token_file == home / auth.TOKEN_FILE
    assert token_file.stat().st_mode & 0o777 == 0o600
    token = token_file.read_text()
    assert len(token) == 64
    for p in head_processes(up["head_temp_dir"]):
        assert token not in " ".join(p.cmdline())
        assert p.environ().get(auth.MODE) == "token", p.cmdline()
    assert cli_json("up")["auth_token_file"] == str(token_file), "up is idempotent, with the same token"


def test_dashboard_listens_on_loopback_only(up: dict) -> None:
    port = int(up["dashboard"].rsplit(":", 1)[1])
    [listening] = [c for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port]
    assert listening.laddr.ip == "127.0.0.1"


def test_job_submit_without_the_token_is_refused(up: dict, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("0" * 64)
    for env in (ray_env(tmp_path), ray_env(tmp_path, **auth.env(wrong))):
        submit = subprocess.run(
            [RAY, "job", "submit", "--address", up["dashboard"], "--", "touch", str(tmp_path / "ran")],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert submit.returncode != 0
        assert "Authentication" in submit.stdout + submit.stderr, submit.stdout + submit.stderr
    assert not (tmp_path / "ran").exists()


def test_ray_init_without_the_token_is_refused(up: dict, tmp_path: Path) -> None:
    code = f"import ray; ray.init(address={up['address']!r}); print('connected')"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=ray_env(tmp_path, **QUICK_GIVE_UP)
    )
    assert done.returncode != 0 and "connected" not in done.stdout
    assert "InvalidAuthToken" in done.stderr, done.stderr[-2000:]


def test_cli_with_a_wrong_token_says_so(up: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("0" * 64)
    wrong.chmod(0o600)
    for var, value in {**auth.env(wrong), **QUICK_GIVE_UP, "CEDANA_RAY_ADDRESS": up["address"]}.items():
        monkeypatch.setenv(var, value)
    done = cedana("ps")
    # not assert_one_error: Ray's C++ client logs each refused attempt on stderr itself, before our line
    assert done.returncode == PrerequisiteError.exit_code and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].startswith("error: the Ray cluster at"), done.stderr
    assert "refused our auth" in done.stderr  # "token" itself: the CLI redacts RAY_AUTH_MODE's value


def test_a_job_checkpoints_itself_through_its_supervisor(up: dict) -> None:
    """The job's own checkpoint request goes from its supervisor to the cluster, with the token."""
    started = cedana("run", "process", "--jid", "inside", "--", sys.executable, str(WORKLOADS / "self_checkpoint.py"))
    assert started.returncode == 0, started.stderr
    wait_for(lambda: "checkpoint=" in cedana("logs", "inside").stdout, 60, "the job's own checkpoint")
    cli_json("job", "kill", "inside")


def test_a_cluster_job_runs_in_the_caller_s_directory(up: dict, tmp_path: Path) -> None:
    """Not in the node agent's: the caller's directory, checked where the job runs."""
    waited = subprocess.run(
        [sys.executable, "-m", "cedana_ray.cli", "run", "process", "--wait", "--jid", "here", "--", "pwd"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert waited.returncode == 0 and waited.stdout.strip() == str(tmp_path), waited.stdout + waited.stderr
    gone = cedana("run", "process", "--cwd", str(tmp_path / "nowhere"), "--", "pwd")
    assert "does not exist on node" in assert_one_error(gone, UsageError)


def test_a_cluster_job_gets_the_caller_s_environment(up: dict, tmp_path: Path) -> None:
    """The caller's PATH, locale, virtualenv... (not the node agent's), and never its secrets,
    unless given with --env."""
    show = "echo TZ=$TZ VIRTUAL_ENV=$VIRTUAL_ENV AWS=$AWS_SECRET_ACCESS_KEY GIVEN=$GIVEN"
    caller = {**os.environ, "TZ": "Test/Zone", "VIRTUAL_ENV": str(tmp_path), "AWS_SECRET_ACCESS_KEY": "s3cr3t"}
    waited = subprocess.run(
        [sys.executable, "-m", "cedana_ray.cli", "run", "process", "--wait", "--env", "GIVEN=yes", "--",
         "sh", "-c", show],
        capture_output=True, text=True, timeout=120, env=caller,
    )  # fmt: skip
    assert waited.stdout.strip() == f"TZ=Test/Zone VIRTUAL_ENV={tmp_path} AWS= GIVEN=yes", waited.stderr


@pytest.mark.parametrize("status", [0, 3])
def test_job_submit_with_wait_ends_as_the_workload(up: dict, status: int) -> None:
    """`ray job submit -- cedana-ray run --wait ...`: Ray's job shows the workload's output and
    ends SUCCEEDED or FAILED with it."""
    entrypoint = ["cedana-ray", "run", "process", "--wait", "--jid", f"waited-{status}", "--"]
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", up["dashboard"], "--", *entrypoint, *counts_to(5, status, 0.01)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **auth.env(Path(up["auth_token_file"]))},
    )
    assert "count=4" in submit.stdout, submit.stdout + submit.stderr
    assert submit.returncode == (0 if status == 0 else 1), submit.stdout + submit.stderr
    assert ("succeeded" if status == 0 else "failed") in submit.stdout
    [job] = [j for j in cli_json("ps") if j["jid"] == f"waited-{status}"]  # type: ignore[attr-defined]
    assert (job["state"], job["exit_code"]) == ("exited", status)


def test_progress_reaches_a_log_from_the_job_s_node(up: dict) -> None:
    """Without a terminal, `up`, `dump` and `restore` on a cluster print a line per stage as
    it ends (the job's node reports them), and nothing with --quiet."""
    again = cedana("up", timeout=180)
    assert again.returncode == 0 and re.search(r"^connecting to Ray at \S+: \d+\.\d\d s$", again.stderr, re.M)
    assert cedana("run", "process", "--jid", "prog", "--", *COUNTER).returncode == 0
    wait_for(lambda: "count=2" in cedana("logs", "prog").stdout, 30, "prog counting")
    dumped = cedana("dump", "job", "prog", timeout=120)
    assert dumped.returncode == 0, dumped.stderr
    assert re.search(r"^criu_dump: \d+\.\d\d s$", dumped.stderr, re.M), dumped.stderr
    assert re.search(r"^store: \d+\.\d\d s, [\d.]+ [KM]iB at [\d.]+ [KMG]?i?B/s$", dumped.stderr, re.M), dumped.stderr
    restored = cedana("restore", "job", "prog", "--quiet", timeout=120)
    assert restored.returncode == 0 and restored.stderr == "", restored.stderr
    assert cedana("job", "kill", "prog").returncode == 0


# -- the coordinator's gateway: commands without ray.init
def gateway_call(up: dict, home: Path, verb: str, body: bytes, token: str | None = None) -> tuple[int, dict]:
    """A raw call to the gateway, as anyone on the network could make one."""
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(up["gateway"])
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    conn.request("POST", f"/v1/{verb}", body=body, headers=headers)
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def test_commands_go_through_the_gateway_which_wants_its_token(
    up: dict, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token_file = Path(up["base"]) / "gateway.token"
    assert up["gateway"].startswith("http://") and token_file.stat().st_mode & 0o777 == 0o600
    token = token_file.read_text().strip()
    assert cedana("run", "process", "--jid", "gw", "--", *COUNTER).returncode == 0
    wait_for(lambda: "count=2" in cedana("logs", "gw").stdout, 30, "gw counting")
    listed = cli_json("ps")
    assert [j["state"] for j in listed if j["jid"] == "gw"] == ["running"]  # type: ignore[union-attr]
    assert "pydantic" not in loaded_modules("ps", "--json", home=home), "ps reads the gateway's answer as it is"
    with monkeypatch.context() as through_ray:  # a Ray token named: the CLI connects to Ray
        for var, value in auth.env(Path(up["auth_token_file"])).items():
            through_ray.setenv(var, value)
        assert cli_json("ps") == listed

    assert gateway_call(up, home, "jobs", b'{"args": {}}')[0] == 401
    assert gateway_call(up, home, "jobs", b'{"args": {}}', token="x" * len(token))[0] == 401
    status, doc = gateway_call(up, home, "jobs", b'{"args": {}}', token=token)
    assert status == 200 and "gw" in [j["jid"] for j in doc["result"]]
    status, doc = gateway_call(up, home, "shutdown", b"{}", token=token)
    assert status == 400 and doc["error"]["type"] == "UsageError"
    status, doc = gateway_call(up, home, "job", b'{"args": {"jid": ["not", "a", "name"]}}', token=token)
    assert status == 400 and "malformed job call" in doc["error"]["message"]
    status, doc = gateway_call(up, home, "job", b'{"args": {"jid": "nobody"}}', token=token)
    assert status == 200 and doc["error"]["type"] == "JobNotFound", "a job's error as it is"

    # the CLI uses the gateway (with the token in the state dir) and never falls back to Ray
    # on a refusal: with another token, it is refused
    try:
        token_file.write_text("y" * len(token))
        assert "refused the token" in assert_one_error(cedana("ps"), PermissionDenied)
    finally:
        token_file.write_text(token)
    assert "no job 'nobody' (`cedana-ray ps` lists" in assert_one_error(cedana("logs", "nobody"), JobNotFound)
    assert cli_json("job", "kill", "gw")["state"] == "killed"  # type: ignore[index]


def test_up_job_submit_ps_dump_and_down(up: dict, home: Path) -> None:
    assert len(up["nodes"]) == 1 and up["head_temp_dir"] and up["storage"].startswith("file://")
    assert cli_json("up")["address"] == up["address"], "up is idempotent"
    entrypoint = ["cedana-ray", "run", "process", "--jid", "sub", "--checkpoint-every", "1s", "--keep", "2", "--"]
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", up["dashboard"], "--", *entrypoint, *COUNTER],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **auth.env(Path(up["auth_token_file"]))},
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    [job] = [j for j in cli_json("ps") if j["jid"] == "sub"]  # type: ignore[attr-defined]
    assert job["state"] == "running" and job["node"] == up["nodes"][0]["node"]
    wait_for(lambda: len(cli_json("checkpoint", "list", "sub")) >= 1, 30, "a policy checkpoint")  # type: ignore[arg-type]
    dumped = cli_json("dump", "job", "sub", "--leave-running")
    assert dumped["checkpoint"].startswith("sub-")  # type: ignore[index]
    assert "count=" in cedana("logs", "sub").stdout
    assert_one_error(cedana("migrate", "sub", "--to", "ffff"), type("E", (StateError,), {"exit_code": 3}))

    assert_one_error(cedana("down"), StateError)  # a running job: refused
    report = cli_json("down", "--kill-jobs")
    assert report["killed_jobs"] == ["sub"]  # type: ignore[index]
    time.sleep(0.5)
    assert head_processes(up["head_temp_dir"]) == [], "down stopped the head it started"
    assert not (home / "cluster.json").exists()
    assert_one_error(cedana("down"), StateError)
    assert_one_error(cedana("nodes"), UsageError)
    assert cli_json("ps") == [], "back in local mode"
