"""NVIDIA GPUs as NVML sees them; without a driver, one clear reason why not.

In the core, not the gpu plugin: runtimes use it too (`run --gpu`, the device nodes a
container needs, the GPU memory a process job uses).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel

from .errors import PrerequisiteError
from .extras import MissingExtra, needs

try:
    import pynvml

    NVMLError: type[Exception] = pynvml.NVMLError
except ImportError:  # the gpu extra (nvidia-ml-py) is not installed
    pynvml = None
    NVMLError = OSError


class GpuInfo(BaseModel):
    index: int
    uuid: str
    name: str
    memory_total: int
    memory_used: int
    utilization: int | None = None


class GpuProcess(BaseModel):
    pid: int
    uuid: str
    memory_used: int


@functools.cache
def unavailable() -> str | None:
    """Why NVML cannot be used here, or None when it can."""
    if pynvml is None:
        return needs("gpu", "NVML (nvidia-ml-py)")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        return f"no NVIDIA driver: {exc}"
    return None


def required(option: str) -> None:
    """Refuse ``option`` (a run option that cannot work without NVML) in one line."""
    if pynvml is None:
        raise MissingExtra(needs("gpu", option))
    if reason := unavailable():
        raise PrerequisiteError(f"{option}: {reason}")


def device_nodes() -> list[str]:
    """The NVIDIA device nodes a container needs to use this machine's GPUs (``/dev/nvidia*``
    and the MIG capabilities under ``/dev/nvidia-caps``), as NVIDIA's container runtime adds them."""
    found = [*Path("/dev").glob("nvidia*"), *Path("/dev/nvidia-caps").glob("*")]
    return sorted(str(p) for p in found if p.is_char_device())


def driver() -> dict[str, str]:
    """Driver and CUDA versions (needs NVML)."""
    cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()
    return {"driver": pynvml.nvmlSystemGetDriverVersion(), "cuda": f"{cuda // 1000}.{cuda % 1000 // 10}"}


def _handles() -> list[object]:
    return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]


def gpus() -> list[GpuInfo]:
    found = []
    for i, h in enumerate(_handles()):
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        try:
            util = pynvml.nvmlDeviceGetUtilizationRates(h).gpu
        except pynvml.NVMLError:
            util = None
        found.append(
            GpuInfo(
                index=i,
                uuid=pynvml.nvmlDeviceGetUUID(h),
                name=pynvml.nvmlDeviceGetName(h),
                memory_total=mem.total,
                memory_used=mem.used,
                utilization=util,
            )
        )
    return found


def processes(pids: Iterable[int] | None = None) -> list[GpuProcess]:
    """Compute processes on every GPU (only ``pids`` when given) and their memory."""
    wanted = set(pids) if pids is not None else None
    found = []
    for h in _handles():
        uuid = pynvml.nvmlDeviceGetUUID(h)
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
            if wanted is None or p.pid in wanted:
                found.append(GpuProcess(pid=p.pid, uuid=uuid, memory_used=p.usedGpuMemory or 0))
    return found
