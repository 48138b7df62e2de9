"""For code running inside a cedana-ray job: checkpoint yourself, and react to a restore.

::

    import cedana_ray

    cedana_ray.on_restore(reconnect)       # runs after every restore of this process
    ckpt = cedana_ray.checkpoint(metadata={"step": 1200})  # a leave-running checkpoint; its id
    cedana_ray.restored()                  # the checkpoint this job was restored from, or None

A job cannot dump itself (it is frozen while CRIU works), so the request goes to its
supervisor, which lives outside the checkpointed tree: the job writes ``NAME.request``
into its control directory (``CEDANA_RAY_CONTROL``) and the supervisor runs a
leave-running dump of the job and writes ``NAME.result``. Files rather than a socket,
because nothing the job holds open may cross the checkpoint boundary. Each restore is
recorded in the same directory (``restored.json``); a restored copy of a process that
was waiting for its checkpoint returns the id it was restored from.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from .errors import CheckpointError, StateError, UsageError
from .models import Metadata

RESTORED = "restored.json"
POLL_S = 0.1
_callbacks: list[Callable[[], Any]] = []
_watcher: threading.Thread | None = None


def _control() -> Path:
    folder = os.environ.get("CEDANA_RAY_CONTROL")
    if not folder:
        raise UsageError("not inside a cedana-ray job (CEDANA_RAY_CONTROL is unset)")
    return Path(folder)


def _restores(control: Path) -> dict[str, Any]:
    try:
        return json.loads((control / RESTORED).read_text())
    except (FileNotFoundError, ValueError):
        return {"count": 0, "checkpoint": None}


def record_restore(control: Path, checkpoint: str) -> None:
    """Called by the restore pipeline once the job runs again from ``checkpoint``."""
    control.mkdir(parents=True, exist_ok=True)
    count = _restores(control)["count"] + 1
    tmp = control / f"{RESTORED}.tmp"
    tmp.write_text(json.dumps({"count": count, "checkpoint": checkpoint}))
    tmp.replace(control / RESTORED)


def restored() -> str | None:
    """The checkpoint this job was last restored from; None if it never was (this process
    runs as it was started)."""
    return _restores(_control())["checkpoint"]


def checkpoint(timeout: float = 600.0, metadata: dict[str, Any] | None = None) -> str:
    """Checkpoint the job this code runs in, leaving it running; the checkpoint's id.
    ``metadata`` labels it (``{"step": 1200}``: string keys, JSON scalar values, 4 KiB in all),
    as ``checkpoint list`` and ``inspect`` show."""
    control = _control()
    labels = TypeAdapter(Metadata).validate_python(metadata or {})  # refused here, not in the supervisor
    before = _restores(control)["count"]
    name = uuid.uuid4().hex
    tmp = control / f"{name}.tmp"
    tmp.write_text(json.dumps({"metadata": labels}))
    tmp.replace(control / f"{name}.request")
    result = control / f"{name}.result"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result.exists():
            answer = json.loads(result.read_text())
            result.unlink()
            if "error" in answer:
                raise CheckpointError(f"checkpoint of this job failed: {answer['error']}")
            return answer["checkpoint"]
        restored = _restores(control)
        if restored["count"] > before:  # we are a restored copy: this is where we came from
            return restored["checkpoint"]
        time.sleep(POLL_S)
    raise StateError(f"no checkpoint within {timeout:.0f} s", hint="is the job's supervisor alive?")


def on_restore(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``fn()`` (in a background thread) after each restore of this process; usable as a decorator."""
    global _watcher
    control = _control()
    _callbacks.append(fn)
    if _watcher is None:
        _watcher = threading.Thread(target=_watch, args=(control, _restores(control)["count"]), daemon=True)
        _watcher.start()
    return fn


def _watch(control: Path, seen: int) -> None:
    while True:
        time.sleep(POLL_S * 5)
        count = _restores(control)["count"]
        if count > seen:
            seen = count
            for fn in list(_callbacks):
                fn()
