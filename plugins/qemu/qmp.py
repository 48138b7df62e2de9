"""A small client of QEMU's machine protocol (QMP) over a unix socket: what the plugin asks
of a running QEMU (stop, cont, migrate, query-status, quit).

QMP is one JSON object per line: QEMU greets, the client enables commands with
``qmp_capabilities``, then each command gets one ``return`` or ``error``, with ``event``
lines interleaved (ignored here). Errors of the socket and of QEMU become :class:`QmpError`,
which the handlers translate into the error of what they were doing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from cedana_ray.errors import StateError

from . import pace

CONNECT_TIMEOUT_S = 10.0
REPLY_TIMEOUT_S = 60.0  # a `quit` or `stop` of a VM under TCG can take a moment
MIGRATE_POLL_S = 0.05
MIGRATE_TIMEOUT_S = 600.0  # GBs of guest RAM into a file
# QEMU throttles migration to 128 MiB/s by default, for live migration over a shared link;
# into a local file of a stopped guest that only makes the dump slow
MAX_BANDWIDTH = 1 << 40
_PACE = f"{shlex.quote(sys.executable)} -I -S {shlex.quote(pace.__file__)}"  # standard library only


class QmpError(StateError):
    """QEMU's QMP socket did not answer, or QEMU refused a command."""


def connect(path: Path, timeout: float = CONNECT_TIMEOUT_S) -> socket.socket:
    """A connected socket to ``path``. Through ``/proc/self/fd`` of its directory: a unix
    socket's path is limited to 107 bytes, which a deep CEDANA_RAY_HOME exceeds."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        folder = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
        try:
            sock.connect(f"/proc/self/fd/{folder}/{path.name}")
        finally:
            os.close(folder)
    except OSError as exc:
        sock.close()
        raise QmpError(f"QEMU's QMP socket {path} does not answer: {exc.strerror or exc}") from exc
    return sock


class Qmp:
    """One QMP session; a context manager that closes it."""

    def __init__(self, path: Path, timeout: float = REPLY_TIMEOUT_S) -> None:
        self.path = path
        self.sock = connect(path)
        self.sock.settimeout(timeout)
        self.stream = self.sock.makefile("rwb")
        self._read()  # the greeting
        self.execute("qmp_capabilities")

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.stream.close()
            self.sock.close()

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run ``command``; its ``return`` value. Raises :class:`QmpError` with QEMU's own
        description when it refuses."""
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        try:
            self.stream.write(json.dumps(message).encode() + b"\n")
            self.stream.flush()
        except OSError as exc:
            raise QmpError(f"QMP {command}: QEMU is gone ({exc.strerror or exc})") from exc
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise QmpError(f"QMP {command}: {reply['error'].get('desc', reply['error'])}")

    def _read(self) -> dict[str, Any]:
        try:
            line = self.stream.readline()
        except OSError as exc:  # a timeout too
            raise QmpError(f"QMP socket {self.path}: {exc.strerror or exc}") from exc
        if not line:
            raise QmpError(f"QMP socket {self.path}: QEMU closed it")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def status(self) -> str:
        """The VM's run state: running, paused, postmigrate, inmigrate..."""
        return str(self.execute("query-status")["status"])

    def migrate_to_file(self, path: Path, staged_max: int | None = None) -> dict[str, Any]:
        """Write the VM's device and RAM state into ``path`` (QEMU 7.2 has no ``file:``
        migration: ``exec:`` runs the shell line with the stream on its stdin), keeping at
        most ``staged_max`` bytes of it not yet stored (:mod:`.pace`); the final
        ``query-migrate``. A failed write says why as the writer did (QEMU only sees a broken pipe)."""
        fd, name = tempfile.mkstemp(prefix="cedana-ray-qemu-", suffix=".err")  # not beside it: that disk may be full
        os.close(fd)
        errors = Path(name)
        self.execute("migrate-set-parameters", **{"max-bandwidth": MAX_BANDWIDTH})
        target = shlex.quote(str(path))
        writer = f"cat > {target}" if staged_max is None else f"{_PACE} {target} {staged_max:d}"
        self.execute("migrate", uri=f"exec:{writer} 2> {shlex.quote(str(errors))}")
        try:
            return self.wait_migration()
        except QmpError as exc:
            said = errors.read_text(errors="replace").strip().splitlines() if errors.exists() else []
            raise QmpError(f"{exc}: {said[-1]}" if said else str(exc)) from exc
        finally:
            errors.unlink(missing_ok=True)

    def wait_migration(
        self, timeout: float = MIGRATE_TIMEOUT_S, progress: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any]:
        """Poll ``query-migrate`` until the migration (out, or incoming) completed, telling
        ``progress`` each answer; raises :class:`QmpError` with QEMU's reason if it failed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info: dict[str, Any] = self.execute("query-migrate")
            state = info.get("status")
            if state == "completed":
                return info
            if state in ("failed", "cancelled"):
                raise QmpError(f"migration {state}: {info.get('error-desc', 'no reason given')}")
            if progress:
                progress(info)
            time.sleep(MIGRATE_POLL_S)
        raise QmpError(f"migration not done after {timeout:.0f} s")

    def machine(self, alias: str) -> str | None:
        """The versioned machine type ``alias`` (``pc``) stands for in this QEMU."""
        for machine in self.execute("query-machines"):
            if machine.get("alias") == alias:
                return str(machine["name"])
        return None
