"""QEMU's migration stream written into a staged file at the store's pace (standard library only).

A dump's QMP ``migrate`` to ``exec:python pace.py FILE MAX`` pipes the VM's state here, and the
plugin copies the VM's disk with :func:`write` likewise. The store cuts the file into chunks as
it grows and frees each one it stored (a hole punched in the file), so the space the file takes
is what is written but not yet stored. While that is over MAX bytes this waits, and QEMU with it
(the guest is paused for the dump anyway): staging then holds MAX bytes at most, not the
guest's RAM or disk. Should nothing be freed for ``STALL_S`` (a filesystem that
cannot punch holes, a store that failed) it stops waiting, and the dump goes on or fails as the
store says.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time

BLOCK = 1 << 20
STALL_S = 10.0
POLL_S = 0.005
F_SETPIPE_SZ = 1031  # linux/fcntl.h


def allocated(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def wait_for_room(fd: int, most: int) -> bool:
    """Wait until the file ``fd`` takes at most ``most`` bytes; False if it stopped shrinking."""
    low, since = allocated(fd), time.monotonic()
    while (now := allocated(fd)) > most:
        if now < low:
            low, since = now, time.monotonic()
        elif time.monotonic() - since > STALL_S:
            return False
        time.sleep(POLL_S)
    return True


def main() -> None:
    try:
        write(0, sys.argv[1], int(sys.argv[2]))
    except OSError as exc:  # the dump's error says why, as cat's would
        sys.exit(f"cannot write the VM's state to {exc.filename or sys.argv[1]}: {exc.strerror}")


def write(source: int, path: str, most: int | None) -> None:
    """Copy what ``source`` (a pipe, a file) gives into ``path``, a new file, leaving holes
    for blocks of zeros; with ``most``, paced as the module says."""
    with contextlib.suppress(OSError):  # a larger pipe: fewer, larger reads
        fcntl.fcntl(source, F_SETPIPE_SZ, BLOCK)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        size, paced = 0, most is not None
        while data := os.read(source, BLOCK):
            paced = paced and most is not None and wait_for_room(fd, most)
            if data.count(0) == len(data):
                os.lseek(fd, len(data), os.SEEK_CUR)
            else:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            size += len(data)
        os.ftruncate(fd, size)  # the file ends where the source did, holes and all
    finally:
        os.close(fd)


if __name__ == "__main__":
    main()
