"""The qemu plugin's live migration (:class:`~cedana_ray.live.LiveMigrator`): QEMU's own
pre-copy migration over TCP, TLS-authenticated both ways.

The target starts QEMU with the same machine, memory, CPUs, kernel and initrd and
``-incoming defer``, adds the migration's server credentials (QMP ``object-add`` of a
``tls-creds-x509`` with ``verify-peer``: only a client whose certificate this migration's CA
signed gets in), and listens with ``migrate-incoming tcp:HOST:0``: QEMU picks the port,
``query-migrate`` says which. The source adds its client credentials and ``migrate``\\ s there
while the guest runs: QEMU copies the RAM, then what the guest dirtied meanwhile, and pauses
the guest only for the last copy, whose length it reports as ``downtime``. QEMU reads the
credentials once, when the object is made: their files go at once. A QEMU without TLS
(built without gnutls) refuses the object, and the migration with it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cedana_ray.backend import Progress
from cedana_ray.errors import MigrationError, PrerequisiteError, UsageError
from cedana_ray.live import Incoming, Sent
from cedana_ray.models import Job, JobState
from cedana_ray.spawn import LaunchError
from cedana_ray.tls import SERVER_NAME, TlsFiles, written

from . import guest
from .guest import HOLD, INITRD, KERNEL, QMP_SOCKET, Vm
from .qmp import MAX_BANDWIDTH, Qmp, QmpError

CREDS = "cedana-ray-migration"  # the id of the credentials object, in both QEMUs
BANDWIDTH_ENV = "CEDANA_RAY_LIVE_BANDWIDTH"  # bytes/s for the stream (default: unthrottled), on the source
DOWNTIME_LIMIT_MS = 300  # QEMU's own default: the longest pause it aims at for the last copy
TERMINAL = ("completed", "failed", "cancelled")
LIVE_STAGE = "live"  # the progress bar's stage while the stream runs


def _dir(job: Job) -> Path:
    assert job.log, f"qemu job {job.jid} has no log"
    return Path(job.log).parent


def _credentials(qmp: Qmp, tls: TlsFiles) -> None:
    """This migration's credentials as a QEMU object; refused in one line where QEMU has no TLS."""
    with written(tls) as folder:
        try:
            qmp.execute(
                "object-add",
                **{"qom-type": "tls-creds-x509", "id": CREDS, "dir": str(folder), "endpoint": tls.endpoint},
                **{"verify-peer": True},
            )
        except QmpError as exc:
            if "gnutls" not in str(exc).lower() and "tls-creds-x509" not in str(exc):
                raise
            raise PrerequisiteError(
                f"QEMU's TLS is unavailable here ({exc}): live migration refused rather than sent in the clear",
                hint="migrate without --live (through the store), or install a QEMU built with gnutls",
            ) from exc


def _forget_credentials(qmp: Qmp) -> None:
    """No more TLS for this QEMU's migrations (a later dump's stream into a file must not be),
    and its credentials object gone, so that its own live migration can add one again."""
    with contextlib.suppress(QmpError):
        qmp.execute("migrate-set-parameters", **{"tls-creds": "", "tls-hostname": ""})
    with contextlib.suppress(QmpError):
        qmp.execute("object-del", id=CREDS)


def _reporting(progress: Progress) -> Callable[[dict[str, Any]], None]:
    """``query-migrate``'s answers as the stage ``live`` of a progress bar: RAM sent of the
    guest's (pre-copy sends pages again as the guest dirties them, so it may pass the total)."""

    def report(info: dict[str, Any]) -> None:
        ram = info.get("ram", {})
        total = int(ram.get("total", 0))
        progress(LIVE_STAGE, min(int(ram.get("transferred", 0)), total), total)

    return report


def _address(host: str, port: int) -> str:
    return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"


class QemuLive:
    """QEMU's live migration, by the plugin's QMP client."""

    def outgoing(self, job: Job) -> dict[str, bytes]:
        vm = Vm.model_validate(job.details["vm"])
        if vm.disk:  # QEMU would need shared storage or its block migration, which we do not drive
            raise UsageError(
                f"VM {job.jid} has a disk: it does not migrate live",
                hint="migrate it without --live: its checkpoint carries the disk",
            )
        names = (KERNEL, INITRD) if vm.initrd else (KERNEL,)
        return {name: (_dir(job) / name).read_bytes() for name in names}

    def receive(self, job: Job, files: dict[str, bytes], job_dir: Path, tls: TlsFiles, host: str) -> Incoming:
        from .plugin import _killed_on_failure, job_of, qemu_said, start_in

        vm = Vm.model_validate(job.details["vm"])
        guest.require_accel(vm.accel)
        for name in (KERNEL, INITRD) if vm.initrd else (KERNEL,):
            (job_dir / name).write_bytes(files[name])
        frozen = job.state is JobState.frozen
        try:
            reply = start_in(job_dir, guest.argv(vm, job_dir, defer=True, paused=frozen), hold=True)
        except LaunchError as exc:
            raise MigrationError(f"QEMU could not start on the target: {exc}") from exc
        with _killed_on_failure(reply["pid"]):
            try:
                with Qmp(job_dir / QMP_SOCKET) as qmp:
                    _credentials(qmp, tls)
                    qmp.execute("migrate-set-parameters", **{"tls-creds": CREDS})
                    qmp.execute("migrate-incoming", uri=_address(host, 0))
                    port = int(qmp.execute("query-migrate")["socket-address"][0]["port"])
            except QmpError as exc:
                said = qemu_said(job_dir) or exc
                raise MigrationError(f"QEMU on the target does not wait for the stream: {said}") from exc
        state = JobState.frozen if frozen else JobState.running
        return Incoming(host=host, port=port, job=job_of(job.jid, job_dir, reply, vm, state, job.command))

    def send(self, job: Job, host: str, port: int, tls: TlsFiles, progress: Progress | None = None) -> Sent:
        bandwidth = int(os.environ.get(BANDWIDTH_ENV) or MAX_BANDWIDTH)
        try:
            with Qmp(_dir(job) / QMP_SOCKET) as qmp:
                _credentials(qmp, tls)
                try:
                    return self._migrate(qmp, job, _address(host, port), bandwidth, progress)
                finally:
                    _forget_credentials(qmp)
        except QmpError as exc:
            raise MigrationError(f"live migration of VM {job.jid} failed: {exc}") from exc

    def _migrate(self, qmp: Qmp, job: Job, uri: str, bandwidth: int, progress: Progress | None) -> Sent:
        params = {"tls-creds": CREDS, "tls-hostname": SERVER_NAME, "max-bandwidth": bandwidth}
        qmp.execute("migrate-set-parameters", **params, **{"downtime-limit": DOWNTIME_LIMIT_MS})
        qmp.execute("migrate", uri=uri)
        try:
            info = qmp.wait_migration(progress=_reporting(progress) if progress else None)
        except QmpError:
            with contextlib.suppress(QmpError):  # a timeout: it must not go on behind our back
                qmp.execute("migrate_cancel")
            self._running_again(qmp, job)
            raise
        ram = info.get("ram", {})
        return Sent(
            downtime_s=info.get("downtime", 0) / 1000,
            total_s=info.get("total-time", 0) / 1000,
            transferred_bytes=ram.get("transferred", 0),
        )

    def _running_again(self, qmp: Qmp, job: Job) -> None:
        """QEMU resumes a guest whose migration failed; make sure of it (a running job only)."""
        if job.state is JobState.running and qmp.status() in ("paused", "postmigrate", "finish-migrate"):
            qmp.execute("cont")

    def received(self, job: Job) -> None:
        try:
            with Qmp(_dir(job) / QMP_SOCKET) as qmp:
                qmp.wait_migration()
                want = "paused" if job.state is JobState.frozen else "running"
                if (status := qmp.status()) != want:
                    raise QmpError(f"the guest is {status}, not {want}")
                _forget_credentials(qmp)
        except QmpError as exc:
            raise MigrationError(f"VM {job.jid} did not come up on the target: {exc}") from exc
        (_dir(job) / HOLD).unlink(missing_ok=True)  # its console on to the job log

    def resume(self, job: Job) -> None:
        try:
            with Qmp(_dir(job) / QMP_SOCKET) as qmp:
                self._running_again(qmp, job)
        except QmpError as exc:
            raise MigrationError(f"VM {job.jid} could not be resumed on its node: {exc}") from exc
