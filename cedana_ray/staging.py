"""Staging: the private scratch directories where images are laid out for CRIU.

Each dump and restore gets a fresh directory named after its process (``PID-...``), in
a per-user directory (``cedana-ray-UID``) that must be ours and 0700: on a shared
``/dev/shm`` another user must not plant or read what we stage. What a dead process left
is removed by :mod:`cedana_ray.recovery`.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import psutil

from .errors import PermissionDenied

SHM = Path("/dev/shm")
_PUNCH_HOLE = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE (linux/falloc.h)
_WRITE = 0x02  # SYNC_FILE_RANGE_WRITE: start writeback of dirty pages, wait for none (linux/fs.h)


def _fits_in_memory(nbytes: int) -> bool:
    return SHM.is_dir() and shutil.disk_usage(SHM).free > 2 * nbytes and psutil.virtual_memory().available > 3 * nbytes


def private_dir(path: Path) -> Path:
    """``path``, created 0700 if missing, once it is known to be a directory of ours that
    nobody else can enter: a shared parent (``/dev/shm``) must not let another user plant
    or read what we stage there."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
    if not _is_private(path):
        raise PermissionDenied(
            f"refusing to stage images in {path}: it must be a directory owned by uid {os.geteuid()} with mode 0700",
            hint="remove it, or name another one with CEDANA_RAY_STAGING",
        )
    return path


def staging_area(base: Path, nbytes: int = 0) -> Path:
    """A fresh private directory for ``nbytes`` of images.

    In memory (``/dev/shm/cedana-ray-UID``) when they fit there with room to spare, since
    images staged on disk are written once and read back at once: page-cache pressure
    on a slow disk made that the largest cost of compressed dumps and restores. Else
    under ``base``. ``CEDANA_RAY_STAGING`` names the directory to stage in instead, always
    (in a private ``cedana-ray-UID`` of its own there).
    """
    if pinned := os.environ.get("CEDANA_RAY_STAGING"):
        base = Path(pinned) / f"cedana-ray-{os.geteuid()}"
    elif nbytes and _fits_in_memory(nbytes):
        base = SHM / f"cedana-ray-{os.geteuid()}"
    # named after us: once we are gone, cedana_ray.recovery removes what we left
    return Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=private_dir(base)))


def staging_bases(home_staging: Path) -> list[Path]:
    """The private staging directories of ours that exist: under the state dir, in memory,
    and under ``CEDANA_RAY_STAGING``."""
    candidates = [home_staging, SHM / f"cedana-ray-{os.geteuid()}"]
    if pinned := os.environ.get("CEDANA_RAY_STAGING"):
        candidates.append(Path(pinned) / f"cedana-ray-{os.geteuid()}")
    return [path for path in candidates if _is_private(path)]


def _is_private(path: Path) -> bool:
    try:
        st = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077


def give_back(path: Path, start: int, end: int) -> bool:
    """Free the space of bytes ``start`` to ``end`` of the staged file ``path`` (they read as
    zeros after), its size kept; False where its filesystem cannot (then nothing changed)."""
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        fallocate = _libc("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
        return fallocate(fd, _PUNCH_HOLE, start, end - start) == 0
    finally:
        os.close(fd)


def start_writeback(fd: int, start: int, size: int) -> None:
    """Have the kernel start writing bytes ``start`` to ``start + size`` of ``fd`` to disk,
    without waiting: a later fsync then waits only for what is still in flight, and reports
    what failed. Nothing happens where the filesystem keeps no dirty pages (tmpfs)."""
    _libc("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)(fd, start, size, _WRITE)


@functools.cache
def _libc(name: str, *argtypes: type) -> Callable[..., int]:
    function = getattr(ctypes.CDLL(None, use_errno=True), name)
    function.argtypes = argtypes
    return function


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
