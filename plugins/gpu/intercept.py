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

from cedana_ray import nvml
from cedana_ray.errors import StateError, UsageError
from cedana_ray.pipeline import Context, Handler
from cedana_ray.proctree import members, signal_tree

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


def remap_plan(used: list[dict[str, Any]], present: list[nvml.GpuInfo], asked: dict[str, str]) -> dict[str, str]:
    """Where to restore the GPU state of each GPU the job used (checkpointed UUID -> UUID
    here), or {} to restore it where it was. ``asked`` (``restore --gpu-map``) maps a
    checkpointed GPU (UUID, or its index at the dump) to a GPU here (UUID or index); every
    other GPU stays if it is here, else goes to a free GPU of the same kind. With any change
    the plan names every checkpointed GPU, as the driver requires."""

    def pick(ref: str, gpus: list[dict[str, Any]], where: str) -> dict[str, Any]:
        found = [g for g in gpus if ref in (g["uuid"], str(g.get("index")))]
        if not found:
            raise UsageError(f"--gpu-map: no GPU {ref} {where}")
        return found[0]

    here = [g.model_dump() for g in present]
    plan: dict[str, str] = {}
    for old, new in asked.items():
        src, dst = pick(old, used, "in the checkpoint"), pick(new, here, "on this node")
        if src["name"] != dst["name"]:
            raise UsageError(f"--gpu-map: {dst['uuid']} is a {dst['name']}, not a {src['name']} like {src['uuid']}")
        plan[src["uuid"]] = dst["uuid"]
    if len(set(plan.values())) < len(plan):
        raise UsageError("--gpu-map: two checkpointed GPUs onto one GPU")
    uuids_here = {g["uuid"] for g in here}
    for gpu in used:  # those here stay, unless asked for another
        if gpu["uuid"] in uuids_here and gpu["uuid"] not in {*plan, *plan.values()}:
            plan[gpu["uuid"]] = gpu["uuid"]
    # a spare: a GPU the job did not use before one it left (which may be busy: why it moved)
    spares = sorted(here, key=lambda g: any(g["uuid"] == u["uuid"] for u in used))
    for gpu in (g for g in used if g["uuid"] not in plan):
        spare = next((g for g in spares if g["name"] == gpu["name"] and g["uuid"] not in plan.values()), None)
        if spare is None:
            raise GpuError(f"no free {gpu['name']} here to restore GPU state of {gpu['uuid']} onto")
        plan[gpu["uuid"]] = spare["uuid"]
    return {} if all(old == new for old, new in plan.items()) else plan


def _usage(pids: list[int]) -> dict[str, Any]:
    """The GPUs and memory ``pids`` use, as far as NVML can tell (never fatal to a dump)."""
    if nvml.unavailable():
        return {"gpus": [], "memory_bytes": 0}
    try:
        procs = nvml.processes(pids)
        known = {g.uuid: {"name": g.name, "index": g.index} for g in nvml.gpus()}
    except nvml.NVMLError:
        return {"gpus": [], "memory_bytes": 0}
    uuids = sorted({p.uuid for p in procs})
    return {
        "gpus": [{"uuid": u, **known.get(u, {"name": ""})} for u in uuids],
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
        pids = self.find(ctx.state.tree_root)
        if not pids:
            return next_(ctx)
        details = ctx.state.details
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
            ctx.state.rollback.append(lambda: self.resume(api, pids))
        return result

    def gpu_interception_restore(self, ctx: Context, next_: Handler) -> Any:
        gpu = ctx.state.manifest.details.get("gpu")
        if not gpu:
            return next_(ctx)
        # planned (and a bad --gpu-map refused) before CRIU restores anything; without NVML
        # the GPUs cannot be told apart, and the driver restores each where it was
        if ctx.request.gpu_map:
            nvml.required("--gpu-map")
        remap = {} if nvml.unavailable() else remap_plan(gpu["gpus"], nvml.gpus(), ctx.request.gpu_map)
        job = next_(ctx)
        try:
            api = self.load()
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
