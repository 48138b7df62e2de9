"""The CUDA driver checkpoint API (driver >= 570) through ctypes on ``libcuda.so.1``.

A CUDA process goes RUNNING -lock-> LOCKED -checkpoint-> CHECKPOINTED (its GPU memory
copied into host memory, GPU resources released; CRIU can then dump it), and back
with restore (optionally onto other GPUs) and unlock.
"""

from __future__ import annotations

import ctypes
import enum
import functools
from typing import Protocol

from cedana_ray.errors import CheckpointError, PrerequisiteError


class GpuError(CheckpointError):
    """A CUDA checkpoint API call failed."""


class ProcessState(enum.IntEnum):
    running = 0
    locked = 1
    checkpointed = 2
    failed = 3


class CheckpointAPI(Protocol):
    """What the interception needs; :class:`CudaCheckpoint` is the real one."""

    def state(self, pid: int) -> ProcessState | None: ...
    def lock(self, pid: int, timeout_ms: int) -> None: ...
    def checkpoint(self, pid: int) -> None: ...
    def restore(self, pid: int, remap: dict[str, str] | None = None) -> None: ...
    def unlock(self, pid: int) -> None: ...


class _LockArgs(ctypes.Structure):
    _fields_ = (("timeoutMs", ctypes.c_uint), ("reserved0", ctypes.c_uint), ("reserved1", ctypes.c_uint64 * 7))


class _GpuPair(ctypes.Structure):
    _fields_ = (("oldUuid", ctypes.c_char * 16), ("newUuid", ctypes.c_char * 16))


class _RestoreArgs(ctypes.Structure):
    _fields_ = (
        ("gpuPairs", ctypes.POINTER(_GpuPair)),
        ("gpuPairsCount", ctypes.c_uint),
        ("reserved", ctypes.c_char * (52 - ctypes.sizeof(ctypes.c_void_p))),
        ("reserved1", ctypes.c_uint64),
    )


def uuid_bytes(uuid: str) -> bytes:
    """NVML's ``GPU-xxxxxxxx-...`` as the 16 raw bytes of a CUuuid."""
    return bytes.fromhex(uuid.removeprefix("GPU-").replace("-", ""))


class CudaCheckpoint:
    """The real API, on this machine's ``libcuda.so.1``."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib

    @classmethod
    @functools.cache
    def load(cls) -> CudaCheckpoint:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            raise PrerequisiteError(f"no CUDA driver: {exc}") from exc
        if not hasattr(lib, "cuCheckpointProcessLock"):
            raise PrerequisiteError("the CUDA driver has no checkpoint API (driver >= 570 needed)")
        api = cls(lib)
        api._call("cuInit", 0)
        return api

    def _error(self, code: int) -> str:
        name = ctypes.c_char_p()
        self.lib.cuGetErrorName(code, ctypes.byref(name))
        return name.value.decode() if name.value else f"CUresult {code}"

    def _call(self, fn: str, *args: object) -> None:
        code = getattr(self.lib, fn)(*args)
        if code != 0:
            raise GpuError(f"{fn}({', '.join(map(str, args[:1]))}) failed: {self._error(code)}")

    def state(self, pid: int) -> ProcessState | None:
        """The CUDA state of ``pid``; None when it is not a CUDA process."""
        out = ctypes.c_int()
        code = self.lib.cuCheckpointProcessGetState(pid, ctypes.byref(out))
        return ProcessState(out.value) if code == 0 else None

    def lock(self, pid: int, timeout_ms: int) -> None:
        self._call("cuCheckpointProcessLock", pid, ctypes.byref(_LockArgs(timeoutMs=timeout_ms)))

    def checkpoint(self, pid: int) -> None:
        self._call("cuCheckpointProcessCheckpoint", pid, None)

    def restore(self, pid: int, remap: dict[str, str] | None = None) -> None:
        if not remap:
            self._call("cuCheckpointProcessRestore", pid, None)
            return
        pairs = (_GpuPair * len(remap))(*(_GpuPair(uuid_bytes(a), uuid_bytes(b)) for a, b in remap.items()))
        args = _RestoreArgs(gpuPairs=pairs, gpuPairsCount=len(remap))
        self._call("cuCheckpointProcessRestore", pid, ctypes.byref(args))

    def unlock(self, pid: int) -> None:
        self._call("cuCheckpointProcessUnlock", pid, None)
