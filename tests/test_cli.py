"""The command line: every --help, and error paths through the real entry point."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import psutil
import pytest
from click.testing import CliRunner

from cedana_ray.cli.main import cli
from cedana_ray.cli.options import pairs
from cedana_ray.errors import (
    CedanaError,
    CheckpointNotFound,
    JobNotFound,
    PermissionDenied,
    PrerequisiteError,
    StorageError,
    UsageError,
)


def command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command below ``group``, plugin-provided ones included, as argument paths."""
    ctx = click.Context(group, info_name=prefix[-1] if prefix else "cedana-ray")
    found: list[tuple[str, ...]] = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        assert command is not None, (*prefix, name)
        found.append((*prefix, name))
        if isinstance(command, click.Group):
            found += command_paths(command, (*prefix, name))
    return found


PATHS = command_paths(cli)


def test_walk_finds_core_and_plugin_commands() -> None:
    expected = {
        ("ps",),
        ("features",),
        ("job", "kill"),
        ("checkpoint", "inspect"),
        ("dump", "job"),
        ("dump", "process"),
        ("run", "process"),
        ("manage", "process"),
        ("restore", "process"),
        ("freeze", "process"),
        ("unfreeze", "job"),
        ("query", "process"),
    }
    assert expected <= set(PATHS)


@pytest.mark.parametrize("path", [(), *PATHS], ids=lambda p: " ".join(p) or "cedana-ray")
def test_help(path: tuple[str, ...], home: Path) -> None:
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Usage:")
    assert " ".join(path) in result.stdout.splitlines()[0]


def test_version() -> None:
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert "cedana-ray" in result.stdout


# -- the real entry point


def cedana(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``cedana-ray ARGS`` in a subprocess, with the test's CEDANA_RAY_HOME."""
    assert "CEDANA_RAY_HOME" in os.environ  # the `home` fixture must be active
    return subprocess.run(
        [sys.executable, "-m", "cedana_ray.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


# what the CLI prints as each stage of a dump or restore ends, when stderr is not a terminal
STAGE_LINE = re.compile(r"^[\w .:-]+: \d+\.\d\d s(, [\d.]+ [KMGT]?i?B at [\d.]+ [KMGT]?i?B/s)?$")


def assert_one_error(result: subprocess.CompletedProcess[str], error: type[CedanaError]) -> str:
    """The command failed with ``error``'s exit code and one line saying why (after the lines
    of the stages it went through, if any)."""
    assert result.returncode == error.exit_code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if not STAGE_LINE.match(line)]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), result.stderr
    return lines[0]


def free_pid() -> int:
    pid = 999999
    while psutil.pid_exists(pid):
        pid += 1
    return pid


ERRORS: list[tuple[str, type[CedanaError], str]] = [
    ("logs nope", JobNotFound, "nope"),
    ("job kill nope", JobNotFound, "nope"),
    ("job kill nope --signal FOO", UsageError, "FOO"),
    ("job kill nope --signal 0", UsageError, "no such signal"),
    ("job delete nope", JobNotFound, "nope"),
    ("checkpoint inspect nope", CheckpointNotFound, "nope"),
    ("checkpoint delete nope", CheckpointNotFound, "nope"),
    ("checkpoint list nope", JobNotFound, "nope"),
    ("run process --jid ../x -- true", UsageError, "../x"),
    ("run process --jid a/b -- true", UsageError, "a/b"),
    ("manage process notapid", UsageError, "notapid"),
    ("manage process 1", PermissionDenied, "PID 1"),
    ("dump process 1", PermissionDenied, "PID 1"),
    ("migrate nope --to x", UsageError, "needs a cluster"),
    ("restore process --path cedana://ckpts/c1", StorageError, "no cluster here"),
    ("freeze job nope", JobNotFound, "nope"),
    ("run process --cwd /nonexistent-dir -- true", UsageError, "/nonexistent-dir does not exist on node"),
    ("run process --cpus 1 -- true", UsageError, "--memory need a cluster"),
    ("run process --memory lots -- true", UsageError, "invalid size 'lots'"),
    ("dump job j --metadata step", UsageError, "K=V"),
    ("dump job j --metadata " + "k=" + "x" * 5000, UsageError, "4096 bytes"),
]


@pytest.mark.parametrize(("args", "error", "mention"), ERRORS, ids=[e[0] for e in ERRORS])
def test_error(args: str, error: type[CedanaError], mention: str, home: Path) -> None:
    assert mention in assert_one_error(cedana(*args.split()), error)


# dump and restore need CRIU; these run where it is installed
CRIU_ERRORS: list[tuple[str, type[CedanaError], str]] = [
    ("dump job nope", JobNotFound, "nope"),
    ("restore job nope", JobNotFound, "nope"),
    ("restore process --path file:///nonexistent/ckpt-1", CheckpointNotFound, "ckpt-1"),
    ("restore process --path file:///nonexistent/.hidden", UsageError, ".hidden"),
]


@pytest.mark.criu
@pytest.mark.parametrize(("args", "error", "mention"), CRIU_ERRORS, ids=[e[0] for e in CRIU_ERRORS])
def test_error_with_criu(args: str, error: type[CedanaError], mention: str, home: Path) -> None:
    assert mention in assert_one_error(cedana(*args.split()), error)


def test_manage_missing_pid(home: Path) -> None:
    pid = free_pid()
    assert str(pid) in assert_one_error(cedana("manage", "process", str(pid)), JobNotFound)


def test_click_usage_error(home: Path) -> None:
    result = cedana("dump", "job", "x", "--compression", "bogus")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "bogus" in result.stderr
    assert result.stdout == ""


def test_repeated_pairs_become_a_dict() -> None:
    @click.command()
    @click.option("--env", multiple=True, callback=pairs("K=V", empty_value=True))
    @click.option("--map", multiple=True, callback=pairs("FROM=TO"))
    def show(env: dict[str, str], map: dict[str, str]) -> None:
        click.echo(json.dumps([env, map]))

    ok = CliRunner().invoke(show, ["--env", "A=1=2", "--env", "B=", "--map", "0=1"])
    assert json.loads(ok.output) == [{"A": "1=2", "B": ""}, {"0": "1"}]
    for args in (["--env", "=1"], ["--env", "A"], ["--map", "0="], ["--map", "=1"]):
        bad = CliRunner().invoke(show, args)
        assert bad.exit_code == 2 and "is not" in bad.output, args


def test_unknown_command(home: Path) -> None:
    result = cedana("dump", "teleporter", "x")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


@pytest.mark.criu
def test_run_missing_binary_leaves_no_job(home: Path) -> None:
    line = assert_one_error(cedana("run", "process", "--", "/nonexistent/binary"), UsageError)
    assert "/nonexistent/binary" in line
    ps = cedana("ps", "--json")
    assert ps.returncode == 0, ps.stderr
    assert json.loads(ps.stdout) == []
    assert list((home / "jobs").iterdir()) == []


def test_debug_shows_traceback(home: Path) -> None:
    result = cedana("--debug", "job", "kill", "nope")
    assert result.returncode == JobNotFound.exit_code
    assert "Traceback (most recent call last)" in result.stderr
    assert "JobNotFound" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error:")


@pytest.mark.parametrize("args", [["ps", "--json"], ["checkpoint", "list", "--json"]])
def test_empty_home_lists_nothing(args: list[str], home: Path) -> None:
    result = cedana(*args)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert json.loads(result.stdout) == []


def test_json_document_only_on_stdout(home: Path) -> None:
    result = CliRunner().invoke(cli, ["plugin", "list", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert {"process", "storage/local"} <= set(rows)
    assert rows["storage/local"]["status"] == "ok"


@pytest.mark.parametrize(
    ("criu_stand_in", "mention"),
    [
        (None, "criu --version failed"),
        ("#!/bin/sh\necho 'Version: 3.17'\n", "criu 3.17 is too old"),
    ],
    ids=["missing", "too-old"],
)
def test_missing_or_old_criu_is_refused_and_the_job_runs_on(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, criu_stand_in: str | None, mention: str
) -> None:
    """CEDANA_RAY_CRIU points at no binary, or at a stand-in script that reports an old version."""
    started = cedana("run", "process", "--jid", "c1", "--", "sleep", "30")
    assert started.returncode == 0, started.stderr
    binary = tmp_path / "criu"
    if criu_stand_in:
        binary.write_text(criu_stand_in)
        binary.chmod(0o755)
    monkeypatch.setenv("CEDANA_RAY_CRIU", str(binary))
    line = assert_one_error(cedana("dump", "job", "c1"), PrerequisiteError)
    monkeypatch.delenv("CEDANA_RAY_CRIU")
    assert mention in line and "make setup" in line
    assert json.loads(cedana("ps", "--json").stdout)[0]["state"] == "running"


@pytest.mark.criu
def test_progress_without_a_terminal_is_a_line_per_stage(home: Path) -> None:
    """In a log (stderr not a terminal): a line as each stage ends, with the bytes it moved and
    their rate, before the result; none with --quiet or --json."""
    started = cedana("run", "process", "--jid", "p1", "--", sys.executable, "-c", BUSY_64_MIB)
    assert started.returncode == 0, started.stderr
    dumped = cedana("dump", "job", "p1", "--leave-running", "--compression", "none")
    assert dumped.returncode == 0, dumped.stderr
    lines = dumped.stderr.splitlines()
    assert any(re.fullmatch(r"criu_dump: \d+\.\d\d s", line) for line in lines), lines
    [store] = [line for line in lines if line.startswith("store: ")]
    assert re.fullmatch(r"store: \d+\.\d\d s, (6\d|7\d)\.\d MiB at [\d.]+ [KMG]?i?B/s", store), store
    assert dumped.stdout.startswith("checkpoint p1-")
    for quiet in ("--quiet", "--json"):
        assert cedana("dump", "job", "p1", "--leave-running", quiet).stderr == ""
    made = [
        cedana("dump", "job", "p1", "--leave-running", *extra, "--json") for extra in ((), ("--compression", "lz4"))
    ]
    inspected = [cedana("checkpoint", "inspect", json.loads(m.stdout)["checkpoint"], "--json") for m in made]
    assert [json.loads(i.stdout)["compression"] for i in inspected] == ["none", "lz4"], "local default; asked wins"
    assert cedana("job", "kill", "p1").returncode == 0
    restored = cedana("restore", "job", "p1", "-q")
    assert restored.returncode == 0 and restored.stderr == "", restored.stderr
    cedana("job", "kill", "p1")


BUSY_64_MIB = "import time; b = bytearray(range(256)) * (1 << 18)\nwhile True: time.sleep(0.1)"
