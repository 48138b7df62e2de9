"""The installation cache (cedana_ray.cache) and what it buys: commands that import only
what they use (the command index, plugins loaded on first use, storage schemes by path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cedana_ray import cache


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "cedana-ray"


def counting_build(source: Path, calls: list[int]):  # type: ignore[no-untyped-def]
    def build() -> tuple[dict[str, int], list[str]]:
        calls.append(1)
        return {"built": len(calls)}, [str(source)]

    return build


def test_built_once_then_read_until_a_file_it_was_built_from_changes(cache_dir: Path, tmp_path: Path) -> None:
    source, calls = tmp_path / "module.py", []
    source.write_text("x = 1\n")
    build = counting_build(source, calls)
    assert cache.cached("thing", build) == {"built": 1}
    assert cache.cached("thing", build) == {"built": 1} and len(calls) == 1
    assert cache.path("thing").stat().st_mode & 0o777 == 0o600
    assert cache_dir.stat().st_mode & 0o777 == 0o700
    source.write_text("x = 22\n")  # its size and mtime change
    assert cache.cached("thing", build) == {"built": 2}


def test_a_cache_file_others_can_write_is_not_read(cache_dir: Path, tmp_path: Path) -> None:
    source, calls = tmp_path / "module.py", []
    source.write_text("")
    build = counting_build(source, calls)
    cache.cached("thing", build)
    cache.path("thing").chmod(0o666)  # it names modules to import: anyone could have written it
    assert cache.cached("thing", build) == {"built": 2}
    assert cache.path("thing").stat().st_mode & 0o777 == 0o600, "replaced by a private one"


def test_each_environment_keeps_its_own_entry(cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source, calls = tmp_path / "module.py", []
    source.write_text("")
    build = counting_build(source, calls)
    cache.cached("thing", build)
    with monkeypatch.context() as m:
        m.setattr(sys, "prefix", str(tmp_path / "venv"))  # another installation, used in turn
        assert cache.cached("thing", build) == {"built": 2}
    assert cache.cached("thing", build) == {"built": 1}, "the first one's entry is still there"
    assert len(list(cache_dir.glob("thing-*.json"))) == 2


def test_an_unwritable_cache_still_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # a file where the directory would be
    calls: list[int] = []
    assert cache.cached("thing", counting_build(tmp_path / "file", calls)) == {"built": 1}


PROBE = """
import sys
from cedana_ray.cli.main import main
sys.argv = ["cedana-ray", *sys.argv[1:]]
try:
    main()
except SystemExit:
    pass
loaded = sorted(m for m in sys.modules if m.startswith("cedana_ray.plugins.") or m in ("fsspec", "rich", "pydantic"))
print("LOADED", " ".join(loaded), file=sys.stderr)
"""


def loaded_modules(*args: str, home: Path) -> list[str]:
    """The plugin modules a command imported, in a fresh interpreter, and fsspec, rich and
    pydantic where it imported them (slow to import: only commands that open a store, print
    for people or build a model need them)."""
    env = {**os.environ, "CEDANA_RAY_HOME": str(home)}
    done = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, timeout=120)
    (line,) = [l for l in done.stderr.splitlines() if l.startswith("LOADED")]  # noqa: E741
    return line.split()[1:]


def test_commands_import_only_the_plugins_they_use(home: Path) -> None:
    # warm: the index and the plugin list are built (every plugin imported) once; `ps` reads
    # jobs without the engine, so it builds the index alone
    loaded_modules("checkpoint", "list", "--local", home=home)
    assert loaded_modules("--help", home=home) == [], "the root's help lists plugin commands from the index"
    assert loaded_modules("dump", "--help", home=home) == []
    assert loaded_modules("ps", "--local", "--json", home=home) == [], "jobs read without their models"
    assert loaded_modules("ps", "--local", home=home) == ["rich"]
    assert loaded_modules("checkpoint", "list", "--local", "--json", home=home) == ["pydantic"], "from the catalog"
    k8s = loaded_modules("query", "k8s", "--help", home=home)
    assert "cedana_ray.plugins.k8s.plugin" in k8s and "cedana_ray.plugins.slurm.plugin" not in k8s
