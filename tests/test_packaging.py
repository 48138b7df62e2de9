"""The package installs every module under `cedana_ray`, as a wheel and editable."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_holds_only_cedana_ray(tmp_path: Path) -> None:
    source = tmp_path / "src"  # setuptools builds in the source tree: keep ours clean
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", ".state", "build", "*.egg-info"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    wheel = next(tmp_path.glob("cedana_ray-*.whl"))
    assert wheel.name.endswith(f"-py3-none-linux_{platform.machine()}.whl"), "nsinit: any Python, this platform"
    names = zipfile.ZipFile(wheel).namelist()
    packages = {n.split("/")[0] for n in names if not n.startswith("cedana_ray-")}
    assert packages == {"cedana_ray"}
    for module in ("supervisor.py", "actors/__init__.py", "jobs/counter.py", "py.typed"):
        assert f"cedana_ray/{module}" in names
    nsinit = zipfile.ZipFile(wheel).getinfo("cedana_ray/plugins/process/nsinit")
    assert nsinit.external_attr >> 16 & 0o111, "the namespace init is executable"
    binary = Path(zipfile.ZipFile(wheel).extract(nsinit, tmp_path / "unpacked"))
    binary.chmod(0o755)
    usage = subprocess.run([binary], capture_output=True, text=True)
    assert usage.returncode == 1 and usage.stderr.startswith("nsinit: usage"), usage.stderr
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "process = cedana_ray.plugins.process.plugin" in text
    assert "cedana-ray = cedana_ray.cli.main:main" in text


def test_editable_install_maps_folders_under_cedana_ray(tmp_path: Path) -> None:
    code = (
        "import importlib.util as u, cedana_ray.plugins.process.plugin as p, cedana_ray.actors, cedana_ray.jobs;"
        "print(p.__file__);print(u.find_spec('plugins'), u.find_spec('actors'), u.find_spec('jobs'))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True)
    plugin_file, bare = out.stdout.splitlines()
    assert Path(plugin_file).resolve() == ROOT / "plugins" / "process" / "plugin.py"
    assert bare == "None None None", "no bare top-level plugins/actors/jobs modules"


def test_cluster_yaml_is_a_valid_ray_launcher_config() -> None:
    import yaml
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    validate_config(config)  # Ray's own schema check, as `ray up` runs it
    commands = " ".join(config["setup_commands"] + config["head_start_ray_commands"])
    assert "install-criu.sh" in commands and "cedana-ray up --address" in commands
    # Ray's token authentication on every node: the token travels as a file, never in argv
    assert "~/.local/state/cedana-ray/ray-auth-token" in config["file_mounts"]
    assert "RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=" in commands
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "ray stop" in command or command.startswith("source ~/cedana-ray-auth.sh && "), command
    assert "--dashboard-host=127.0.0.1" in commands and "0.0.0.0" not in commands and "disabled" not in commands
