"""The plugin manager and the feature matrix, with fake plugins and the installed ones."""

from __future__ import annotations

import ast
import json
import sys
from pathlib import Path
from typing import Any

import click
import pytest
from cedana_ray.plugins.process import launch
from click.testing import CliRunner
from test_cli import cedana

from cedana_ray import features
from cedana_ray.cli.main import cli
from cedana_ray.engine import Engine
from cedana_ray.errors import PluginNotFound, PrerequisiteError, UsageError
from cedana_ray.features import KNOWN_PLUGINS, ROWS, Status
from cedana_ray.hookspecs import hookimpl
from cedana_ray.models import HealthCheck
from cedana_ray.pipeline import Context
from cedana_ray.plugins_manager import PluginManager, get_plugin_manager
from cedana_ray.requests import RunRequest

ROOT = Path(__file__).resolve().parent.parent
LABELS = [row[0] for row in ROWS if row]
# rows of cedana-features.txt that no pipeline serves: no plugin can implement them
HOOKLESS = ["Run handler"]
HOOK_OF = {row[0]: row[1] for row in ROWS if row}
STATUSES = {"implemented", "unimplemented", "not installed", "incompatible"}


@click.command("fake")
def fake_command() -> None:
    """A fake plugin's command."""


def fake_handler(ctx: Context) -> str:
    return "fake"


class FakeDumpOnly:
    @hookimpl
    def cedana_dump_command(self) -> click.Command:
        return fake_command


class FakeExtraArgument:
    @hookimpl
    def cedana_dump_command(self) -> click.Command:
        return fake_command

    @hookimpl
    def cedana_run_handler_serverless(self, cluster: str) -> Any:  # the spec has no argument
        return fake_handler


class FakeUnknownHook:
    @hookimpl
    def cedana_dump_command(self) -> click.Command:
        return fake_command

    @hookimpl
    def cedana_teleport_handler(self) -> Any:
        return fake_handler


class FakeUnhealthy:
    def __init__(self, fatal: bool = True) -> None:
        self.fatal = fatal

    @hookimpl
    def cedana_dump_command(self) -> click.Command:
        return fake_command

    @hookimpl
    def cedana_health_checks(self) -> list[HealthCheck]:
        return [
            HealthCheck(name="fake-ok", ok=True, detail="fine"),
            HealthCheck(name="fake-binary", ok=False, detail="fakectl not found", fatal=self.fatal),
        ]


class FakeMissingDependency:
    """A plugin whose health checks import a library that is not installed (as storage/s3's
    imports botocore where the package was installed without its dependencies)."""

    @hookimpl
    def cedana_dump_command(self) -> click.Command:
        return fake_command

    @hookimpl
    def cedana_health_checks(self) -> list[HealthCheck]:
        import cedana_ray_test_absent_library  # noqa: F401

        return []


class FakeRunner:
    @hookimpl
    def cedana_run_handler_serverless(self) -> Any:
        return fake_handler


@pytest.fixture
def pm() -> PluginManager:
    return PluginManager()


def column(matrix: features.FeatureMatrix, name: str) -> dict[str, Status]:
    return {label: matrix.features[label][name] for label in LABELS}


# -- registration


def test_extra_argument_is_incompatible(pm: PluginManager) -> None:
    pm.register_checked(FakeExtraArgument(), "fake-extra")
    assert pm.failures["fake-extra"].startswith("incompatible")
    assert "cedana_run_handler_serverless" in pm.failures["fake-extra"]
    assert "cluster" in pm.failures["fake-extra"]
    assert pm.get_plugin("fake-extra") is None
    assert "fake-extra" not in pm.plugin_names()
    assert pm.hook.cedana_dump_command() == []  # none of its hooks is callable


def test_unknown_hook_is_incompatible(pm: PluginManager) -> None:
    pm.register_checked(FakeUnknownHook(), "fake-unknown")
    assert pm.failures["fake-unknown"].startswith("incompatible")
    assert "cedana_teleport_handler" in pm.failures["fake-unknown"]
    assert pm.get_plugin("fake-unknown") is None
    assert pm.hook.cedana_dump_command() == []


def test_same_name_twice_is_recorded(pm: PluginManager) -> None:
    pm.register_checked(FakeDumpOnly(), "fake-dump")
    pm.register_checked(FakeRunner(), "fake-dump")
    assert "fake-dump" in pm.failures
    assert not pm.implements("fake-dump", "cedana_run_handler_serverless")


def test_compatible_plugin_registers(pm: PluginManager) -> None:
    pm.register_checked(FakeDumpOnly(), "fake-dump")
    assert pm.failures == {}
    assert pm.plugin_names() == ["fake-dump"]
    assert pm.implements("fake-dump", "cedana_dump_command")
    assert not pm.implements("fake-dump", "cedana_run_command")
    assert pm.hook.cedana_dump_command() == [fake_command]


# -- per-plugin calls


def test_call_for_unknown_plugin(pm: PluginManager) -> None:
    pm.register_checked(FakeRunner(), "fake-runner")
    with pytest.raises(PluginNotFound, match="nope") as info:
        pm.call_for("nope", "cedana_run_handler_serverless")
    assert info.value.hint is not None and "fake-runner" in info.value.hint


def test_call_for_only_calls_the_named_plugin(pm: PluginManager) -> None:
    pm.register_checked(FakeRunner(), "fake-runner")
    pm.register_checked(FakeDumpOnly(), "fake-dump")
    assert pm.call_for("fake-runner", "cedana_run_handler_serverless") is fake_handler
    assert pm.call_for("fake-dump", "cedana_run_handler_serverless") is None
    with pytest.raises(UsageError, match="fake-dump does not support running"):
        pm.require("fake-dump", "cedana_run_handler_serverless", "running")
    assert pm.require("fake-runner", "cedana_run_handler_serverless", "running") is fake_handler


# -- the feature matrix


@pytest.mark.parametrize(("plugin", "name"), [(FakeExtraArgument(), "fake-extra"), (FakeUnknownHook(), "fake-unknown")])
def test_incompatible_plugin_rows(pm: PluginManager, plugin: object, name: str) -> None:
    pm.register_checked(plugin, name)
    matrix = features.compute(pm)
    assert name in matrix.plugins
    assert set(column(matrix, name).values()) == {Status.incompatible}
    assert matrix.errors[name] == [pm.failures[name]]


def test_dump_only_plugin_rows(pm: PluginManager) -> None:
    pm.register_checked(FakeDumpOnly(), "fake-dump")
    matrix = features.compute(pm)
    col = column(matrix, "fake-dump")
    assert col.pop("Dump command") is Status.implemented
    assert set(col.values()) == {Status.unimplemented}
    assert "fake-dump" not in matrix.errors


def test_failing_fatal_health_check(pm: PluginManager) -> None:
    pm.register_checked(FakeUnhealthy(), "fake-unhealthy")
    matrix = features.compute(pm)
    col = column(matrix, "fake-unhealthy")
    assert col.pop("Dump command") is Status.incompatible
    assert col.pop("Health checks") is Status.incompatible
    assert set(col.values()) == {Status.unimplemented}
    assert matrix.errors["fake-unhealthy"] == ["health check fake-binary: fakectl not found"]


def test_failing_warning_health_check(pm: PluginManager) -> None:
    """A non-fatal check (optional hardware) does not fail `check`, but the plugin's
    features still cannot work here, and the matrix says so."""
    pm.register_checked(FakeUnhealthy(fatal=False), "fake-unhealthy")
    matrix = features.compute(pm)
    assert matrix.features["Dump command"]["fake-unhealthy"] is Status.incompatible
    assert matrix.errors["fake-unhealthy"] == ["health check fake-binary: fakectl not found"]


def test_a_health_check_that_raises_is_a_failed_check(pm: PluginManager) -> None:
    pm.register_checked(FakeMissingDependency(), "fake-missing")
    matrix = features.compute(pm)
    assert matrix.features["Dump command"]["fake-missing"] is Status.incompatible
    [reason] = matrix.errors["fake-missing"]
    assert reason.startswith("health check fake-missing: health checks failed: ModuleNotFoundError"), reason


def test_known_but_absent_plugins(pm: PluginManager) -> None:
    pm.register_checked(FakeDumpOnly(), "fake-dump")
    matrix = features.compute(pm)
    assert matrix.plugins == [*KNOWN_PLUGINS, "fake-dump"]
    for name in KNOWN_PLUGINS:
        assert set(column(matrix, name).values()) == {Status.not_installed}, name
        assert matrix.errors[name] and matrix.errors[name][0].startswith("not installed"), name


def test_import_failure_is_not_installed(pm: PluginManager) -> None:
    pm.failures["fake-broken"] = "not installed: import failed: No module named 'fakelib'"
    matrix = features.compute(pm)
    assert matrix.plugins[-1] == "fake-broken"
    assert set(column(matrix, "fake-broken").values()) == {Status.not_installed}
    assert matrix.errors["fake-broken"] == [pm.failures["fake-broken"]]


@pytest.mark.parametrize(
    ("source", "extra"),
    [
        ("import pynvml\n", "gpu"),  # a module only an extra brings, missing
        (
            "from cedana_ray.extras import MissingExtra\nraise MissingExtra('the fake plugin needs the cri extra')\n",
            "cri",
        ),
    ],
)
def test_a_plugin_whose_extra_is_missing_names_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, source: str, extra: str
) -> None:
    (tmp_path / "cedana_ray_fake_extra_plugin.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    pm = PluginManager({"fake-extra": "cedana_ray_fake_extra_plugin"})  # its entry point
    reason = pm.failures["fake-extra"]
    assert reason.startswith("not installed: ") and f"needs the {extra} extra" in reason, reason
    matrix = features.compute(pm)
    assert matrix.errors["fake-extra"] == [reason]
    assert set(column(matrix, "fake-extra").values()) == {Status.not_installed}


def test_every_row_has_every_plugin(pm: PluginManager) -> None:
    pm.register_checked(FakeDumpOnly(), "fake-dump")
    pm.register_checked(FakeUnknownHook(), "fake-unknown")
    matrix = features.compute(pm)
    assert list(matrix.features) == LABELS
    for label in LABELS:
        assert list(matrix.features[label]) == matrix.plugins, label


def test_rows_name_real_hooks(pm: PluginManager) -> None:
    assert len(LABELS) == len(set(LABELS))
    assert [label for label, hook in HOOK_OF.items() if hook is None] == HOOKLESS
    for hook in filter(None, HOOK_OF.values()):
        assert getattr(pm.hook, hook).has_spec(), hook


def core_names() -> set[str]:
    """Every string and attribute name in the core and the actors, but for the hook specs and
    the matrix's rows themselves: where the core calls a hook, it names it so."""
    skip = {ROOT / "cedana_ray" / "hookspecs.py", ROOT / "cedana_ray" / "features.py"}
    paths = [p for d in ("cedana_ray", "actors") for p in (ROOT / d).rglob("*.py") if p not in skip]
    nodes = [node for path in paths for node in ast.walk(ast.parse(path.read_text()))]
    strings = {n.value for n in nodes if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    return strings | {n.attr for n in nodes if isinstance(n, ast.Attribute)}


def test_every_hook_spec_is_a_row_the_core_calls(pm: PluginManager) -> None:
    """A hook that no pipeline calls would show ✔ for a feature that does nothing."""
    specs = {name for name in vars(pm.hook) if getattr(pm.hook, name).has_spec()}
    assert specs == set(filter(None, HOOK_OF.values()))
    assert specs - core_names() == set()


def test_hookless_rows_are_unimplemented(pm: PluginManager) -> None:
    pm.register_checked(FakeRunner(), "fake-runner")
    col = column(features.compute(pm), "fake-runner")
    assert col["Run handler (serverless)"] is Status.implemented
    assert {col[label] for label in HOOKLESS} == {Status.unimplemented}


# -- the installed plugins


def test_installed_plugins_register() -> None:
    pm = get_plugin_manager()
    assert {"process", "storage/local"} <= set(pm.plugin_names())
    assert pm.failures == {}
    assert pm.implements("storage/local", "cedana_checkpoint_storage")


def features_json(*args: str) -> dict[str, Any]:
    result = CliRunner().invoke(cli, ["features", "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_features_json_shape(home: Path) -> None:
    doc = features_json()
    assert set(doc) == {"plugins", "features"}
    assert doc["plugins"][: len(KNOWN_PLUGINS)] == list(KNOWN_PLUGINS)
    assert list(doc["features"]) == LABELS
    for label, row in doc["features"].items():
        assert list(row) == doc["plugins"], label
        assert set(row.values()) <= STATUSES, label
    assert doc["features"]["Dump command"]["kata"] == "not installed"


def test_features_json_errors(home: Path) -> None:
    doc = features_json("--errors")
    assert set(doc) == {"plugins", "features", "errors"}
    assert doc["errors"]["kata"][0].startswith("not installed")


def test_features_hookless_rows(home: Path) -> None:
    doc = features_json()
    for label in HOOKLESS:
        assert set(doc["features"][label].values()) <= {"unimplemented", "not installed"}, label


@pytest.fixture
def no_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """No cluster known here (a fresh state dir, no address in the environment)."""
    for var in ("CEDANA_RAY_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)


def cli_features_json(*args: str) -> dict[str, Any]:
    """``features --json`` from the real CLI, a process of its own: connected to no Ray,
    whatever this test process has done."""
    result = cedana("features", "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_cluster_store_needs_a_cluster(home: Path, no_cluster: None) -> None:
    doc = cli_features_json("--errors")
    assert doc["features"]["Checkpoint storage"]["storage/cedana"] == "incompatible"
    [reason] = doc["errors"]["storage/cedana"]
    assert reason.startswith("health check cluster store: cedana:// is the cluster's store: no cluster here"), reason


def test_cluster_store_of_a_known_cluster(home: Path, no_cluster: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Known is enough: `features` does not connect (nothing listens at this address)."""
    monkeypatch.setenv("CEDANA_RAY_ADDRESS", "127.0.0.1:1")
    doc = cli_features_json("--errors")
    assert doc["features"]["Checkpoint storage"]["storage/cedana"] == "implemented"
    assert "storage/cedana" not in doc["errors"]


@pytest.mark.criu  # without a working CRIU the process plugin's health checks fail
def test_features_process_column(home: Path) -> None:
    doc = features_json()
    for label in ("Dump command", "Restore handler", "Run handler (serverless)"):
        assert doc["features"][label]["process"] == "implemented", label
    assert doc["features"]["Checkpoint storage"]["storage/local"] == "implemented"


@pytest.mark.criu
def test_process_without_its_native_init_says_so(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An install whose nsinit was not built: the column is incompatible, a run says why."""
    monkeypatch.setattr(launch, "NSINIT", home / "missing" / "nsinit")
    doc = features_json("--errors")
    assert doc["features"]["Run handler (serverless)"]["process"] == "incompatible"
    assert any("nsinit" in line and "is not built" in line for line in doc["errors"]["process"])
    with pytest.raises(PrerequisiteError, match="nsinit is not built"):
        Engine().run("process", RunRequest(cmd=["true"]))
