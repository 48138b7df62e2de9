"""Shared fixtures: an isolated state dir per test, CRIU availability, job cleanup."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from cedana_ray.plugins._gcsfs import gcsfs  # imported with GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT off
from cedana_ray.plugins.crio.client import Cri
from containers import busybox_rootfs, oci_image
from cri_daemons import CONTAINERD2, COUNTER, PATH_ENV, PAUSE, config_v3, cri_containerd, publish, registry
from fsspec import AbstractFileSystem
from s3fs import S3FileSystem
from servers import ACCESS_KEY, SECRET_KEY, FakeGCS, SeaweedS3, Server

from cedana_ray import criu
from cedana_ray.config import Paths
from cedana_ray.engine import Engine
from cedana_ray.errors import CedanaError


def _criu_ready() -> str | None:
    """Why CRIU tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "CRIU needs root"
    try:
        criu.version()
    except CedanaError as exc:
        return str(exc)
    return None


CRIU_MISSING = _criu_ready()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "criu" in item.keywords and CRIU_MISSING:
            item.add_marker(pytest.mark.skip(reason=f"CRIU unavailable: {CRIU_MISSING}"))


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh CEDANA_RAY_HOME; every job started in it is killed afterwards."""
    home = tmp_path / "home"
    monkeypatch.setenv("CEDANA_RAY_HOME", str(home))
    monkeypatch.delenv("CEDANA_RAY_STORAGE", raising=False)
    yield home
    kill_jobs(home)


def kill_jobs(home: Path) -> None:
    if not (home / "state.db").exists():
        return
    for job in Engine(Paths(home)).registry.jobs():
        if job.pid and psutil.pid_exists(job.pid):
            try:
                for p in [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]:
                    p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
    shutil.rmtree(home / "staging", ignore_errors=True)


@pytest.fixture
def own_staging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This test's own staging base (CEDANA_RAY_STAGING), so that what is left there is its doing."""
    base = tmp_path / "staging"
    base.mkdir()
    monkeypatch.setenv("CEDANA_RAY_STAGING", str(base))
    return base


@pytest.fixture
def engine(home: Path) -> Engine:
    return Engine(Paths(home))


# -- object stores: real servers, started once per session (see servers.py)
@dataclass
class Remote:
    """A bucket on a running server, with a raw client to tamper with what is stored."""

    scheme: str
    bucket: str
    server: Server
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.bucket}/ckpts"

    def raw(self) -> AbstractFileSystem:
        """A client of the backend itself, not of cedana-ray."""
        if self.scheme == "s3":
            return S3FileSystem(
                key=ACCESS_KEY, secret=SECRET_KEY, endpoint_url=self.server.endpoint, skip_instance_cache=True
            )
        return gcsfs.GCSFileSystem(token="anon", endpoint_url=self.server.endpoint, skip_instance_cache=True)


def _remote_env(scheme: str, server: Server) -> dict[str, str]:
    if scheme == "s3":
        return {
            "AWS_ENDPOINT_URL_S3": server.endpoint,
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        }
    return {"STORAGE_EMULATOR_HOST": server.endpoint}


def _start(scheme: str, root: Path) -> Server:
    server: Server = SeaweedS3(root) if scheme == "s3" else FakeGCS(root)
    server.start()
    return server


def _remote(scheme: str, server: Server, bucket: str) -> Remote:
    remote = Remote(scheme, bucket, server, _remote_env(scheme, server))
    remote.raw().mkdir(bucket)
    return remote


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    started: dict[str, Server] = {}
    try:
        for scheme in ("s3", "gs"):
            started[scheme] = _start(scheme, tmp_path_factory.mktemp(f"{scheme}-server"))
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.fixture(params=["s3", "gs"])
def remote(request: pytest.FixtureRequest, servers: dict[str, Server], monkeypatch: pytest.MonkeyPatch) -> Remote:
    """A fresh bucket on the session's S3 or GCS server, its endpoint and credentials in the environment."""
    scheme = request.param
    bucket = f"b-{secrets.token_hex(4)}"
    remote = _remote(scheme, servers[scheme], bucket)
    for var, value in remote.env.items():
        monkeypatch.setenv(var, value)
    return remote


@pytest.fixture(params=["s3", "gs"])
def own_remote(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Remote]:
    """Like ``remote``, on a server of this test's own, which it may kill."""
    server = _start(request.param, tmp_path / "server")
    try:
        remote = _remote(request.param, server, "own")
        for var, value in remote.env.items():
            monkeypatch.setenv(var, value)
        yield remote
    finally:
        server.kill()  # a throwaway server: a graceful stop of weed takes 2 s


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 16 MiB filesystem (tmpfs) to fill up."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.fixture(scope="session")
def cri_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The CRI tests' pause and counter images, as OCI archives."""
    base = tmp_path_factory.mktemp("cri-images")
    rootfs = busybox_rootfs(base / "rootfs")
    for name in ("pause", "counter"):
        (base / name).mkdir()
    return {
        # oci_image unpacks beside the layout: one dir per image
        "localhost/pause:latest": oci_image(rootfs, base / "pause" / "image", PAUSE, env=PATH_ENV),
        "localhost/counter:latest": oci_image(rootfs, base / "counter" / "image", COUNTER, env=PATH_ENV),
    }


@pytest.fixture(scope="session")
def cri2(tmp_path_factory: pytest.TempPathFactory, cri_images: dict[str, Path]) -> Iterator[tuple[Cri, str]]:
    """containerd 2.x's CRI and the counter image's name in the local registry."""
    base = tmp_path_factory.mktemp("cri2")
    pause = {"localhost/pause:latest": cri_images["localhost/pause:latest"]}
    with (
        registry(base / "registry") as address,
        cri_containerd(
            base / "containerd", str(CONTAINERD2 / "containerd"), config_v3(base / "containerd"), pause
        ) as cri,
    ):
        yield cri, publish(cri, "localhost/counter:latest", cri_images["localhost/counter:latest"], address)
