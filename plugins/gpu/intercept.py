"""GPU interception: dump and restore middleware for CUDA jobs.

Dump: lock every CUDA process of the tree (with a timeout), checkpoint their GPU state
into host memory, let CRIU dump, then either resume them (``--leave-running``) or leave
a rollback for the core to run if storing the checkpoint fails. A failure at any step
restores and unlocks what was done, so the job keeps running.
Restore: after CRIU, restore the GPU state (remapped onto GPUs of the same kind if the
original ones are absent) and unlock.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

from cedana_ray.errors import StateError
from cedana_ray.pipeline import Context, Handler
from cedana_ray.proctree import members, signal_tree

from . import nvml
from .cuda import CheckpointAPI, CudaCheckpoint, GpuError, ProcessState

LOCK_TIMEOUT_MS = 30_000


def cuda_pids(root: int) -> list[int]:
    """The processes of the tree rooted at ``root`` that have the CUDA driver loaded."""
    found = []
    for p in members(root):
        try:
            with open(f"/proc/{p.pid}/maps") as maps:
                if any("libcuda.so" in line for line in maps):
                    found.append(p.pid)
        except OSError:
            continue
    return found


def remap_for(used: list[dict[str, str]]) -> dict[str, str]:
    """For each GPU the job used that is absent here, a free present GPU of the same name."""
    if nvml.unavailable():
        return {}
    present = nvml.gpus()
    here = {g.uuid for g in present}
    taken = {u["uuid"] for u in used if u["uuid"] in here}
    remap = {}
    for gpu in used:
        if gpu["uuid"] in here:
            continue
        spare = next((g for g in present if g.name == gpu["name"] and g.uuid not in taken), None)
        if spare is None:
            raise GpuError(f"no free {gpu['name']} here to restore GPU state of {gpu['uuid']} onto")
        remap[gpu["uuid"]] = spare.uuid
        taken.add(spare.uuid)
    return remap


def _usage(pids: list[int]) -> dict[str, Any]:
    """The GPUs and memory ``pids`` use, as far as NVML can tell (never fatal to a dump)."""
    if nvml.unavailable():
        return {"gpus": [], "memory_bytes": 0}
    try:
        procs = nvml.processes(pids)
        names = {g.uuid: g.name for g in nvml.gpus()}
    except nvml.NVMLError:
        return {"gpus": [], "memory_bytes": 0}
    uuids = sorted({p.uuid for p in procs})
    return {
        "gpus": [{"uuid": u, "name": names.get(u, "")} for u in uuids],
        "memory_bytes": sum(p.memory_used for p in procs),
    }


class Interceptor:
    """The middleware pair, on a checkpoint API (the real one unless a test fakes it)."""

    def __init__(
        self,
        load: Callable[[], CheckpointAPI] = CudaCheckpoint.load,
        find: Callable[[int], list[int]] = cuda_pids,
        lock_timeout_ms: int = LOCK_TIMEOUT_MS,
    ) -> None:
        self.load = load
        self.find = find
        self.lock_timeout_ms = lock_timeout_ms

    @staticmethod
    def resume(api: CheckpointAPI, pids: list[int]) -> None:
        """Put every process back to RUNNING, whatever step it reached; raise the first error."""
        errors = []
        for pid in pids:
            try:
                if api.state(pid) is ProcessState.checkpointed:
                    api.restore(pid)
                if api.state(pid) is ProcessState.locked:
                    api.unlock(pid)
            except GpuError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def _suspend(self, api: CheckpointAPI, pids: list[int], ctx: Context) -> None:
        start = time.perf_counter()
        try:
            for pid in pids:
                api.lock(pid, self.lock_timeout_ms)
            locked = time.perf_counter()
            for pid in pids:
                api.checkpoint(pid)
        except BaseException:
            self.resume(api, pids)
            raise
        ctx.timings["cuda_lock"] = round(locked - start, 6)
        ctx.timings["cuda_checkpoint"] = round(time.perf_counter() - locked, 6)

    def gpu_interception(self, ctx: Context, next_: Handler) -> Any:
        pids = self.find(ctx.state["tree_root"])
        if not pids:
            return next_(ctx)
        details = ctx.state.setdefault("details", {})
        if details.get("frozen") or details.get("paused"):
            # The driver checkpoints through a thread of the process itself: a stopped
            # process would hold the lock until it times out.
            raise StateError("a frozen job's CUDA state cannot be checkpointed", hint="unfreeze it first")
        api = self.load()
        usage = _usage(pids)
        self._suspend(api, pids, ctx)
        details["gpu"] = {"processes": len(pids), **usage}
        try:
            result = next_(ctx)
        except BaseException:
            self.resume(api, pids)
            raise
        if ctx.request.leave_running:
            self.resume(api, pids)
        else:
            ctx.state.setdefault("rollback", []).append(lambda: self.resume(api, pids))
        return result

    def gpu_interception_restore(self, ctx: Context, next_: Handler) -> Any:
        job = next_(ctx)
        gpu = ctx.state["manifest"].details.get("gpu")
        if not gpu:
            return job
        try:
            api = self.load()
            remap = remap_for(gpu["gpus"])
            pids = [p for p in self.find(job.pid) if api.state(p) is ProcessState.checkpointed]
            start = time.perf_counter()
            for pid in pids:
                api.restore(pid, remap)
            for pid in pids:
                api.unlock(pid)
        except BaseException:
            signal_tree(job.pid, signal.SIGKILL)  # never leave a job without its GPU state
            raise
        ctx.timings["cuda_restore"] = round(time.perf_counter() - start, 6)
        return job
