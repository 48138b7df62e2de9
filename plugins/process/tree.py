"""Process trees: identity, permission and signals."""

from __future__ import annotations

import os
import signal

import psutil

from cedana_ray.errors import JobNotFound, PermissionDenied, StateError
from cedana_ray.proctree import signal_tree, tree_pids
from cedana_ray.retry import until

STOP_TIMEOUT_S = 5.0


def proc(pid: int) -> psutil.Process:
    """The live process ``pid``, or a clear error."""
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            raise StateError(f"PID {pid} has exited (zombie)")
        return p
    except psutil.NoSuchProcess as exc:
        raise JobNotFound(f"no process with PID {pid}") from exc


def check_touchable(p: psutil.Process) -> None:
    """Refuse PIDs cedana-ray must not checkpoint or signal."""
    if p.pid == 1:
        raise PermissionDenied("refusing to touch PID 1 (the system's init)")
    if p.pid in _ourselves():
        raise PermissionDenied(f"refusing to touch PID {p.pid}: it is cedana-ray itself or its parent")
    try:
        if not p.exe():
            raise PermissionDenied(f"refusing to touch PID {p.pid}: it is a kernel thread")
        uid = p.uids().real
    except psutil.AccessDenied as exc:
        raise PermissionDenied(f"not permitted to inspect PID {p.pid}") from exc
    except (psutil.ZombieProcess, FileNotFoundError, OSError) as exc:
        raise PermissionDenied(f"refusing to touch PID {p.pid}: it is a kernel thread") from exc
    if os.geteuid() != 0 and uid != os.geteuid():
        raise PermissionDenied(f"PID {p.pid} belongs to another user (uid {uid})")


ANY_OWNER = "CEDANA_RAY_ANY_OWNER"


def check_owner(p: psutil.Process) -> None:
    """Under sudo, refuse to adopt a process that the user who ran sudo does not own: root
    would otherwise dump another user's memory wherever that user chose. An administrator
    allows it with CEDANA_RAY_ANY_OWNER=1 (which sudo's own policy decides who may set)."""
    caller = os.environ.get("SUDO_UID")
    if caller is None or os.geteuid() != 0 or os.environ.get(ANY_OWNER) == "1":
        return
    uid = p.uids().real
    if uid != int(caller):
        raise PermissionDenied(
            f"PID {p.pid} belongs to uid {uid}, not to you (uid {caller}, through sudo)",
            hint=f"an administrator can allow it with {ANY_OWNER}=1",
        )


def _ourselves() -> set[int]:
    """This process and its ancestors."""
    found, pid = set(), os.getpid()
    while pid and pid not in found:
        found.add(pid)
        with open(f"/proc/{pid}/stat") as f:  # field 4: the parent (psutil takes 0.15 ms a process)
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
    return found


def stdio_pipes(pid: int) -> list[str]:
    """The pipes (``pipe:[inode]``) the tree's root writes its output to."""
    found = []
    for fd in (0, 1, 2):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("pipe:") and target not in found:
            found.append(target)
    return found


def host_pid(init: int, ns_pid: int) -> int:
    """The host PID of the process that is ``ns_pid`` in the namespace of ``init``."""
    for pid in tree_pids(init)[1:]:
        try:
            with open(f"/proc/{pid}/status") as f:
                nspids = next(ln for ln in f if ln.startswith("NSpid:")).split()[1:]
        except (OSError, StopIteration):
            continue
        if int(nspids[-1]) == ns_pid:
            return pid
    raise JobNotFound(f"process {ns_pid} is gone from the namespace of PID {init}")


def is_stopped(pid: int) -> bool:
    return psutil.Process(pid).status() == psutil.STATUS_STOPPED


def stop(pid: int) -> None:
    """SIGSTOP the tree rooted at ``pid`` and wait until all of it is stopped: a signal
    takes effect asynchronously, and a dump right after a freeze must see a frozen job."""
    signal_tree(pid, signal.SIGSTOP)
    if not until(lambda: _all_stopped(pid), STOP_TIMEOUT_S, 0.002):
        raise StateError(f"the process tree of PID {pid} did not stop within {STOP_TIMEOUT_S:g} s")


def _all_stopped(root: int) -> bool:
    """Whether every process of the tree is stopped (or gone)."""
    try:
        return all(psutil.Process(p).status() in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE) for p in tree_pids(root))
    except psutil.NoSuchProcess:
        return not psutil.pid_exists(root)  # a member exited meanwhile: ask again


KILL_SIGNAL = signal.SIGKILL  # PID 1 of a namespace ignores signals it has no handler for
