"""The package installs every module under `cedana_ray`, as a wheel and editable, and as a
library: from its manylinux wheel into a clean venv, with its dependencies from PyPI."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCH = platform.machine()
NSINIT = "cedana_ray/plugins/process/nsinit"
EXTRA_PACKAGES = {"s3fs", "gcsfs", "nvidia-ml-py", "kubernetes"}  # what only an extra brings


def run(*argv: object, ok: bool = True, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run ``argv``; its output is shown only when it fails (``ok``) and the test with it."""
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kwargs)
    if ok:
        assert done.returncode == 0, f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp_path = tmp_path_factory.mktemp("wheel")
    source = tmp_path / "src"  # setuptools builds in the source tree: keep ours clean
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", ".state", "build", "*.egg-info"))
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path, source)
    return next(tmp_path.glob("cedana_ray-*.whl"))


@pytest.mark.slow
def test_wheel_holds_only_cedana_ray(wheel: Path, tmp_path: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    packages = {n.split("/")[0] for n in names if not n.startswith("cedana_ray-")}
    assert packages == {"cedana_ray"}
    for module in ("supervisor.py", "extras.py", "actors/__init__.py", "jobs/counter.py", "py.typed"):
        assert f"cedana_ray/{module}" in names
    nsinit = zipfile.ZipFile(wheel).getinfo(NSINIT)
    assert nsinit.external_attr >> 16 & 0o111, "the namespace init is executable"
    binary = Path(zipfile.ZipFile(wheel).extract(nsinit, tmp_path / "unpacked"))
    binary.chmod(0o755)
    usage = subprocess.run([binary], capture_output=True, text=True)
    assert usage.returncode == 1 and usage.stderr.startswith("nsinit: usage"), usage.stderr
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "process = cedana_ray.plugins.process.plugin" in text
    assert "cedana-ray = cedana_ray.cli.main:main" in text


@pytest.mark.slow
def test_wheel_is_manylinux_where_nsinit_is_static(wheel: Path, tmp_path: Path) -> None:
    from elftools.elf.elffile import ELFFile  # pyelftools, which auditwheel brings

    binary = Path(zipfile.ZipFile(wheel).extract(NSINIT, tmp_path))
    with binary.open("rb") as f:
        static = not any(segment["p_type"] == "PT_INTERP" for segment in ELFFile(f).iter_segments())
    if not static:  # a C library without a static archive: the honest tag is this machine's
        assert wheel.name.endswith(f"-py3-none-linux_{ARCH}.whl"), wheel.name
        return
    assert wheel.name.endswith(f"-py3-none-manylinux_2_17_{ARCH}.manylinux2014_{ARCH}.whl"), wheel.name
    # auditwheel, the manylinux checker, agrees: nothing in the wheel needs a newer platform
    show = run(sys.executable, "-m", "auditwheel", "show", wheel).stdout
    assert "consistent with the following platform tag" in show, show


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
    # a venv, not the system Python (PEP 668); the shared store from cluster.env, no head-local
    # default; Ray's own object store size (tests/test_image.py runs the setup on a bare node)
    assert "/opt/cedana-ray/venv/bin/pip install" in commands and "python3 -m pip" not in commands
    assert "~/.local/state/cedana-ray/cluster.env" in config["file_mounts"]
    assert '--storage "$CEDANA_RAY_STORAGE"' in commands and "CEDANA_RAY_STORAGE:-file" not in commands
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert not any("--object-store-memory" in command for command in starts)


# the CLI in a process where the extras' modules cannot be imported (as in a base install)
WITHOUT_EXTRAS = (
    "import sys; sys.modules.update(dict.fromkeys(['s3fs', 'gcsfs', 'pynvml', 'grpc', 'kubernetes']));"
    "sys.argv[0] = 'cedana-ray'; from cedana_ray.cli.main import main; main()"
)


def cedana_without_extras(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("CEDANA_RAY_", "RAY_ADDRESS"))}
    env = {**clean, "CEDANA_RAY_HOME": str(home), **env}
    return run(sys.executable, "-c", WITHOUT_EXTRAS, *args, ok=False, env=env)


@pytest.mark.parametrize(
    ("url", "extra"), [("s3://bucket/checkpoints", "s3"), ("gs://bucket/checkpoints", "gcs")], ids=["s3", "gcs"]
)
def test_a_store_without_its_extra_says_which(tmp_path: Path, url: str, extra: str) -> None:
    done = cedana_without_extras(tmp_path, "checkpoint", "import", f"{url}/ckpt1")  # opens the store
    scheme = url.split("://")[0]
    assert done.returncode == 8, done  # a StorageError: the backend is missing
    assert done.stderr == f"error: {scheme}:// needs the {extra} extra: pip install 'cedana-ray[{extra}]'\n"


def test_options_and_plugins_without_their_extra_say_which(tmp_path: Path) -> None:
    gpu = cedana_without_extras(tmp_path, "run", "process", "--gpu", "--", "true")
    assert gpu.returncode == 6, gpu  # a PrerequisiteError
    assert gpu.stderr == "error: --gpu needs the gpu extra: pip install 'cedana-ray[gpu]'\n"
    cri = cedana_without_extras(tmp_path, "query", "crio")
    assert cri.returncode == 6, cri
    assert cri.stderr == "error: the crio plugin (CRI) needs the cri extra: pip install 'cedana-ray[cri]'\n"
    done = cedana_without_extras(tmp_path, "features", "--errors", "--json")
    assert done.returncode == 0, done.stderr
    errors = json.loads(done.stdout)["errors"]
    for plugin, extra in {"storage/s3": "s3", "storage/gcs": "gcs", "gpu": "gpu", "crio": "cri"}.items():
        assert any(f"needs the {extra} extra: pip install 'cedana-ray[{extra}]'" in e for e in errors[plugin]), errors
    check = json.loads(cedana_without_extras(tmp_path, "check", "--json").stdout)
    details = {c["component"]: c["detail"] for c in check["checks"] if "extra" in c["detail"]}
    assert set(details) >= {"plugin storage/s3", "plugin storage/gcs", "plugin gpu", "plugin crio"}, details


def _packages(python: Path) -> set[str]:
    listed = json.loads(run(python, "-m", "pip", "list", "--format", "json", "--disable-pip-version-check").stdout)
    return {p["name"].lower().replace("_", "-") for p in listed}


@pytest.mark.slow
@pytest.mark.timeout(1200)  # a clean venv, from PyPI (pip's cache makes it a minute or two)
def test_wheel_installs_as_a_library_with_extras(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)  # no system site packages, nothing of ours
    python, cli = venv / "bin" / "python", venv / "bin" / "cedana-ray"
    env = {
        "PATH": f"{venv / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "CEDANA_RAY_HOME": str(tmp_path / "state"),
        "RAY_AUTH_MODE": "disabled",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",  # nothing listens: no request leaves the machine
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
    }
    pip = (python, "-m", "pip", "install", "-q", "--disable-pip-version-check")
    pip_env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}  # pip's settings and cache, as here
    run(*pip, wheel, env=pip_env)

    # the base install is light: no extra's package came with it, and the core imports
    assert not _packages(python) & EXTRA_PACKAGES, _packages(python) & EXTRA_PACKAGES
    core = "import cedana_ray, cedana_ray.store, cedana_ray.cli.main, cedana_ray.plugins.process.plugin"
    run(python, "-c", core, cwd=tmp_path)  # not here: our source tree would be imported

    # `check` answers (CRIU may be missing there: then it fails, and says so)
    check = run(cli, "check", "--json", ok=False, env=env)
    assert check.returncode in (0, 1), check.stderr
    report = json.loads(check.stdout)
    by = {(c["component"], c["name"]): c for c in report["checks"]}
    assert any(c == "criu" for c, _ in by), by.keys()
    assert by[("state", "state dir")]["ok"] and by[("state", "state dir")]["detail"] == env["CEDANA_RAY_HOME"], by
    assert by[("store", "default store")]["detail"].endswith(": 0 checkpoint(s)"), by[("store", "default store")]
    s3 = by[("plugin storage/s3", "s3fs")]
    assert not s3["ok"] and not s3["fatal"] and "pip install 'cedana-ray[s3]'" in s3["detail"], s3
    assert "cedana-ray[gpu]" in by[("plugin gpu", "nvml")]["detail"]

    # `features --errors` names the extra of each plugin that needs one
    doc = json.loads(run(cli, "features", "--errors", "--json", env=env).stdout)
    assert doc["features"]["Dump command"]["process"] == "implemented"
    assert "s3:// needs the s3 extra: pip install 'cedana-ray[s3]'" in " ".join(doc["errors"]["storage/s3"])
    assert "needs the gcs extra" in " ".join(doc["errors"]["storage/gcs"])
    assert "needs the gpu extra" in " ".join(doc["errors"]["gpu"])
    human = run(cli, "features", "--errors", env=env).stdout
    assert "storage/s3: health check s3fs: s3:// needs the s3 extra: pip install 'cedana-ray[s3]'" in human, human

    # a store or an option that needs an extra: one line that names it, a non-zero exit
    s3_import = (cli, "checkpoint", "import", "s3://bucket/checkpoints/ckpt1")  # opens that store
    listing = run(*s3_import, ok=False, env=env)
    assert listing.returncode != 0
    assert listing.stderr == "error: s3:// needs the s3 extra: pip install 'cedana-ray[s3]'\n", listing.stderr
    gpu = run(cli, "run", "process", "--gpu", "--", "true", ok=False, env=env)
    assert gpu.returncode != 0
    assert gpu.stderr == "error: --gpu needs the gpu extra: pip install 'cedana-ray[gpu]'\n", gpu.stderr

    # an extra brings its package, and the feature then goes on to its own errors
    run(*pip, f"{wheel}[s3]", env=pip_env)
    assert "s3fs" in _packages(python)
    assert not _packages(python) & (EXTRA_PACKAGES - {"s3fs"})
    listing = run(*s3_import, ok=False, env=env)  # now: the store is unreachable (nothing listens there)
    assert listing.returncode == 8 and listing.stderr.startswith("error: "), listing.stderr
    assert "unreachable" in listing.stderr, listing.stderr
    doc = json.loads(run(cli, "features", "--errors", "--json", env=env).stdout)
    assert "needs the s3 extra" not in " ".join(doc["errors"].get("storage/s3", []))
