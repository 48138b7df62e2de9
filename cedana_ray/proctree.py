"""Process trees by PID: liveness and signals (psutil)."""

from __future__ import annotations

import contextlib
import os
import signal

import psutil

from .errors import UsageError
from .retry import until


def alive(pid: int | None, started: float | None = None) -> bool:
    """Whether ``pid`` is still the (non-zombie) process that started at ``started``."""
    if pid is None:
        return False
    try:
        p = psutil.Process(pid)
        same = started is None or abs(p.create_time() - started) < 0.01
        return same and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_reaped(pid: int, timeout: float) -> bool:
    """Whether ``pid`` is gone (exited and reaped) within ``timeout`` seconds. A killed
    process with a large memory takes a moment to exit, and its parent to reap it."""
    return until(lambda: not psutil.pid_exists(pid), timeout, 0.02)


def _children(pid: int) -> list[int]:
    """The children of ``pid``, as its threads' ``children`` files list them."""
    kids: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            kids += map(int, f.read().split())
    return kids


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants, parents first. From the kernel's lists of each
    process's children: psutil would read every process of the machine to find them."""
    if not os.path.exists(f"/proc/{pid}/task/{pid}/children"):  # gone, or a kernel without them
        p = psutil.Process(pid)
        return [pid, *(c.pid for c in p.children(recursive=True))]
    found = [pid]
    for parent in found:  # grows while it is walked
        with contextlib.suppress(OSError):  # exited meanwhile
            found += _children(parent)
    return found


def members(pid: int) -> list[psutil.Process]:
    """The process ``pid`` and all its descendants."""
    procs = [psutil.Process(pid)]
    for child in tree_pids(pid)[1:]:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.append(psutil.Process(child))
    return procs


def tree_rss(pid: int | None) -> int:
    """Resident bytes of the tree rooted at ``pid`` (0 when it is gone)."""
    try:
        return sum(p.memory_info().rss for p in members(pid)) if pid else 0
    except psutil.NoSuchProcess:
        return 0


def signal_tree(pid: int, sig: int) -> None:
    """Send ``sig`` to every process of the tree rooted at ``pid``."""
    try:
        pids = tree_pids(pid)
    except psutil.NoSuchProcess:
        return
    for p in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, sig)


def parse_signal(value: int | str) -> int:
    """A signal by number or name, as ``kill`` takes it (``TERM``, ``SIGTERM``, ``term``, ``15``).

    Raises:
        UsageError: no such signal.
    """
    text = str(value).strip().upper()
    try:
        if text.isdigit():
            number = int(text)
            if 0 < number <= signal.SIGRTMAX:
                return number
            raise ValueError(number)
        return signal.Signals[text if text.startswith("SIG") else "SIG" + text]
    except (KeyError, ValueError):
        raise UsageError(f"no such signal: {value!r}", hint="a name such as TERM, INT or USR1, or a number") from None
