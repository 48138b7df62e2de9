"""Which Ray auth token `up` uses (cedana_ray.auth), and `up`'s auth options, without Ray.

A real cluster with auth: tests/test_cluster_cli.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import assert_one_error, cedana

from cedana_ray import auth
from cedana_ray.errors import PermissionDenied, PrerequisiteError, UsageError

TOKEN = "f" * 64


@pytest.fixture(autouse=True)
def no_token(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (auth.MODE, auth.TOKEN, auth.TOKEN_PATH, auth.OPT_OUT, "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)


def private(path: Path, text: str = TOKEN, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_new_head_gets_a_random_private_token(home: Path) -> None:
    made = auth.token_file(create=True)
    assert made == home / auth.TOKEN_FILE and made.stat().st_mode & 0o777 == 0o600
    assert made.parent.stat().st_mode & 0o777 == 0o700
    assert len(made.read_text()) == 64


def test_the_token_is_made_once(home: Path) -> None:
    first = auth.token_file(create=True).read_text()
    assert auth.token_file(create=True).read_text() == first
    assert auth.token_file(create=False).read_text() == first, "what a node joining from here uses"
    (home / auth.TOKEN_FILE).unlink()
    assert auth.token_file(create=True).read_text() != first


def test_joining_needs_a_token(home: Path) -> None:
    with pytest.raises(PrerequisiteError, match="no Ray auth token") as caught:
        auth.token_file(create=False)
    assert auth.TOKEN_PATH in str(caught.value.hint)
    assert not (home / auth.TOKEN_FILE).exists()


def test_the_users_token_comes_first(home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    given = private(tmp_path / "given")
    monkeypatch.setenv(auth.TOKEN_PATH, str(given))
    assert auth.token_file(create=True) == given
    monkeypatch.setenv(auth.TOKEN, "e" * 64)  # the value itself: saved, so that only a path travels
    saved = auth.token_file(create=False)
    assert saved == home / auth.TOKEN_FILE and saved.read_text() == "e" * 64
    assert saved.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(("text", "mode"), [(TOKEN, 0o644), ("\n", 0o600)])
def test_a_token_file_others_can_read_or_without_a_token_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, mode: int
) -> None:
    monkeypatch.setenv(auth.TOKEN_PATH, str(private(tmp_path / "loose", text, mode)))
    with pytest.raises(PermissionDenied, match="mode 0600"):
        auth.token_file(create=True)


USE = "import json, os, sys; from pathlib import Path; from cedana_ray import auth; auth.use(Path(sys.argv[1]))"


def test_use_hands_on_a_path_never_the_token(tmp_path: Path) -> None:
    token = private(tmp_path / "t")
    # in a process of its own: use() sets Ray's process-wide auth mode
    done = subprocess.run(
        [sys.executable, "-c", f"{USE}; print(json.dumps(dict(os.environ)))", str(token)],
        env={**os.environ, auth.TOKEN: TOKEN},
        capture_output=True,
        text=True,
        check=True,
    )
    env = json.loads(done.stdout)
    assert TOKEN not in done.stdout and auth.TOKEN not in env
    assert env[auth.MODE] == "token" and env[auth.TOKEN_PATH] == str(token)
    assert auth.env(None) == {auth.MODE: "disabled"}


OPT_OUTS = [(auth.OPT_OUT, "disabled", True), (auth.MODE, "disabled", True), (auth.MODE, "token", False)]


@pytest.mark.parametrize(("var", "value", "off"), OPT_OUTS)
def test_opt_out(monkeypatch: pytest.MonkeyPatch, var: str, value: str, off: bool) -> None:
    monkeypatch.setenv(var, value)
    assert auth.opted_out() is off


def test_shell_exports_for_batch_scripts(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def exports() -> str:
        done = subprocess.run([sys.executable, "-m", "cedana_ray.auth"], capture_output=True, text=True, check=True)
        return done.stdout.strip()

    assert exports() == f"unset {auth.TOKEN}; export {auth.MODE}=token {auth.TOKEN_PATH}={home / auth.TOKEN_FILE}"
    assert (home / auth.TOKEN_FILE).stat().st_mode & 0o777 == 0o600
    monkeypatch.setenv(auth.OPT_OUT, "disabled")
    assert exports() == f"unset {auth.TOKEN}; export {auth.MODE}=disabled"


def test_up_dashboard_host_only_for_a_head_it_starts(home: Path) -> None:
    result = cedana("up", "--address", "127.0.0.1:1", "--dashboard-host", "0.0.0.0")
    assert "--dashboard-host" in assert_one_error(result, UsageError)


def test_up_joining_without_a_token_is_refused(home: Path) -> None:
    assert "no Ray auth token" in assert_one_error(cedana("up", "--address", "127.0.0.1:1"), PrerequisiteError)
