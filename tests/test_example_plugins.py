"""The example plugins of docs/plugins.md: they register as a third-party plugin would, show
in the feature matrix, and work (a sleeper job's run, exit, dump and restore; a checkpoint
round trip through the memory store)."""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

import psutil
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from cedana_ray import features
from cedana_ray.config import Paths
from cedana_ray.engine import Engine
from cedana_ray.errors import UsageError
from cedana_ray.features import ROWS, Status
from cedana_ray.models import Compression, CriuOptions, JobState, utcnow
from cedana_ray.plugins_manager import PluginManager
from cedana_ray.requests import DumpRequest, RestoreRequest, RunRequest
from cedana_ray.signing import Signer
from cedana_ray.store import CheckpointStore, register_schemes

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "plugins"
SLEEPER_ROWS = {
    "Run command",
    "Restore command",
    "Query command",
    "Dump middleware",
    "Restore handler",
    "Freeze handler",
    "Unfreeze handler",
    "Run handler (serverless)",
    "Custom kill signal",
    "Custom stop check",
    "Custom cleanup",
    "Custom reaper",
    "Query handler",
    "Health checks",
}
STORAGE_ROWS = {"Checkpoint storage", "Health checks"}


def example(ref: str) -> object:
    """Load an example as the ``cedana_ray.plugins`` entry point of an installed package
    names it: ``MODULE`` or ``MODULE:OBJECT``."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    module, _, attr = ref.partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, attr) if attr else loaded


def registered(*plugins: tuple[str, str]) -> PluginManager:
    """A plugin manager with these (name, entry point) plugins, loaded as get_plugin_manager() does."""
    pm = PluginManager()
    for name, module in plugins:
        pm.register_checked(example(module), name)
    for schemes in pm.hook.cedana_checkpoint_storage():
        register_schemes(schemes)
    return pm


def column(pm: PluginManager, name: str) -> dict[str, Status]:
    matrix = features.compute(pm)
    assert name in matrix.plugins
    return {row[0]: matrix.features[row[0]][name] for row in ROWS if row}


def expected(pm: PluginManager, name: str, rows: set[str]) -> dict[str, Status]:
    """Its rows implemented, the others not; all of its rows incompatible where a health check fails."""
    healthy = all(c.ok for c in pm.health_checks(name))
    mine = Status.implemented if healthy else Status.incompatible
    return {row[0]: mine if row[0] in rows else Status.unimplemented for row in ROWS if row}


@pytest.mark.parametrize(
    ("name", "module", "rows"),
    [("sleeper", "sleeper.plugin:plugin", SLEEPER_ROWS), ("storage/memory", "storage_memory", STORAGE_ROWS)],
)
def test_registers_and_shows_in_the_matrix(name: str, module: str, rows: set[str]) -> None:
    pm = registered((name, module))
    assert pm.failures == {}
    assert name in pm.plugin_names()
    assert column(pm, name) == expected(pm, name, rows)


def test_sleeper_commands_are_named_after_its_type() -> None:
    pm = registered(("sleeper", "sleeper.plugin:plugin"))
    for hook in ("cedana_run_command", "cedana_restore_command", "cedana_query_command"):
        assert pm.call_for("sleeper", hook).name == "sleeper"


def test_memory_store_round_trip(tmp_path: Path) -> None:
    registered(("storage/memory", "storage_memory"))
    store = CheckpointStore("ckptmem://examples/ckpts", Signer(bytes(32)))
    images = store.dump_dir("ckpt-1", Compression.zstd, tmp_path)
    (images / "pages-1.img").write_bytes(b"page" * 5000)
    fields = {"checkpoint": "ckpt-1", "jid": "job-1", "type": "sleeper", "node": "local"}
    fields |= {"created": utcnow(), "criu_version": "4.2", "criu": CriuOptions()}
    manifest = store.commit(images, fields, compression=Compression.zstd)
    assert manifest.size_bytes < manifest.image_bytes == 20000
    fetched, restored = store.fetch("ckpt-1", tmp_path / "fetched")
    assert fetched == manifest
    assert (restored / "pages-1.img").read_bytes() == b"page" * 5000
    assert [m.checkpoint for m in store.list()] == ["ckpt-1"]
    assert not any(path.startswith("/examples/") for path in MemoryFileSystem.store)  # memory://'s files: not ours
    store.delete("ckpt-1")
    assert store.list() == []


# -- the sleeper at work
@pytest.fixture
def sleeper_engine(home: Path) -> Engine:
    """An engine whose only runtime plugin is the sleeper example."""
    return Engine(Paths(home), pm=registered(("sleeper", "sleeper.plugin:plugin")))


def wait_for(check: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_sleeper_exit_code_is_reaped(sleeper_engine: Engine) -> None:
    job = sleeper_engine.run("sleeper", RunRequest(cmd=["sh", "-c", "exit 3"], jid="quits"))
    wait_for(lambda: sleeper_engine.job(job.jid).state is not JobState.running)
    done = sleeper_engine.job(job.jid)
    assert (done.state, done.exit_code) == (JobState.exited, 3)
    sleeper_engine.delete(job.jid)
    assert not Path(job.details["exit_file"]).parent.exists()


@pytest.mark.criu
@pytest.mark.parametrize("compression", [Compression.zstd, Compression.none])  # none: verified while CRIU restores
def test_sleeper_dump_and_restore(sleeper_engine: Engine, compression: Compression) -> None:
    job = sleeper_engine.run("sleeper", RunRequest(cmd=["sleep", "1000"], jid="naps"))
    sleeper_engine.freeze(job.jid)
    sleeper_engine.unfreeze(job.jid)
    dumped = sleeper_engine.dump(job.jid, DumpRequest(compression=compression))
    assert sleeper_engine.job(job.jid).state is JobState.checkpointed
    assert not psutil.pid_exists(job.pid)  # reaped: its PID is free for the restore
    restored = sleeper_engine.restore(RestoreRequest(), jid=job.jid).job
    assert (restored.state, restored.pid, restored.last_checkpoint) == (JobState.running, job.pid, dumped.checkpoint)
    assert psutil.Process(restored.pid).status() != psutil.STATUS_STOPPED
    assert psutil.Process(restored.pid).cmdline() == ["sleep", "1000"]
    sleeper_engine.kill(job.jid)
    wait_for(lambda: not psutil.pid_exists(job.pid))
    assert sleeper_engine.pm.call_for("sleeper", "cedana_reaper", job=sleeper_engine.job(job.jid)) == -9


def test_sleeper_refuses_a_missing_command(sleeper_engine: Engine) -> None:
    with pytest.raises(UsageError, match="cannot start no-such-command"):
        sleeper_engine.run("sleeper", RunRequest(cmd=["no-such-command"], jid="missing"))
    assert sleeper_engine.jobs() == []
