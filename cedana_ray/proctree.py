"""Process trees by PID: liveness and signals (psutil)."""

from __future__ import annotations

import contextlib

import psutil

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


def members(pid: int) -> list[psutil.Process]:
    """The process ``pid`` and all its descendants."""
    p = psutil.Process(pid)
    return [p, *p.children(recursive=True)]


def tree_rss(pid: int | None) -> int:
    """Resident bytes of the tree rooted at ``pid`` (0 when it is gone)."""
    try:
        return sum(p.memory_info().rss for p in members(pid)) if pid else 0
    except psutil.NoSuchProcess:
        return 0


def signal_tree(pid: int, sig: int) -> None:
    """Send ``sig`` to every process of the tree rooted at ``pid``."""
    try:
        procs = members(pid)
    except psutil.NoSuchProcess:
        return
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)
