"""Per-job GPU tracing: NVML samples written as a Chrome/Perfetto trace.

The tracer is a detached process (``python -m cedana_ray.plugins.gpu.tracing``) that
samples the GPUs the job's process tree uses until the tree is gone, appending
counter events to ``gpu-trace.json`` in the JSON array format (the closing ``]`` is
optional there, which is what lets a restored job's tracer append to the same file).
A restore marks the gap since the last sample as one complete ("X") event.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

TRACE = "gpu-trace.json"


def _us(t: float) -> int:
    return int(t * 1_000_000)


def counter(name: str, ts: float, values: dict[str, float], pid: int = 1) -> dict[str, Any]:
    return {"name": name, "ph": "C", "ts": _us(ts), "pid": pid, "tid": 0, "args": values}


def gap(start: float, end: float, reason: str) -> dict[str, Any]:
    return {"name": reason, "ph": "X", "ts": _us(start), "dur": max(0, _us(end) - _us(start)), "pid": 1, "tid": 1}


def append(path: Path, events: list[dict[str, Any]]) -> None:
    with path.open("a") as f:
        if f.tell() == 0:
            f.write("[\n")
        for event in events:
            f.write(json.dumps(event) + ",\n")


def read(path: Path) -> list[dict[str, Any]]:
    """The events of a trace, closed or not."""
    text = path.read_text().strip().rstrip(",")
    return json.loads(text if text.endswith("]") else text + "]") if text else []


READINGS = {
    "utilization_pct": lambda nv, h: nv.nvmlDeviceGetUtilizationRates(h).gpu,
    "memory_bw_pct": lambda nv, h: nv.nvmlDeviceGetUtilizationRates(h).memory,
    "sm_clock_mhz": lambda nv, h: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM),
    "power_w": lambda nv, h: nv.nvmlDeviceGetPowerUsage(h) / 1000,
}


def sample(root: int) -> list[dict[str, Any]]:
    """One counter event per GPU the tree of ``root`` uses, at this moment."""
    import pynvml

    from cedana_ray.proctree import members

    tree = {p.pid for p in members(root)}
    now = time.time()
    events = []
    for i in range(pynvml.nvmlDeviceGetCount()):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        used = [p for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h) if p.pid in tree]
        if not used:
            continue
        values = {"job_memory_mib": sum((p.usedGpuMemory or 0) for p in used) / 2**20}
        for key, read_value in READINGS.items():
            with contextlib.suppress(pynvml.NVMLError):  # not every GPU reports everything
                values[key] = read_value(pynvml, h)
        events.append(counter(f"GPU {i}", now, values))
    return events


def summary(path: Path) -> dict[str, Any]:
    """What a trace says: samples, span, peak memory, mean utilization, gaps."""
    events = read(path) if path.exists() else []
    samples = [e for e in events if e["ph"] == "C"]
    gaps = [{"reason": e["name"], "seconds": e["dur"] / 1e6} for e in events if e["ph"] == "X"]
    span = (samples[-1]["ts"] - samples[0]["ts"]) / 1e6 if samples else 0.0
    util = [e["args"]["utilization_pct"] for e in samples if "utilization_pct" in e["args"]]
    return {
        "trace": str(path),
        "samples": len(samples),
        "seconds": span,
        "peak_job_memory_mib": max((e["args"]["job_memory_mib"] for e in samples), default=0.0),
        "mean_utilization_pct": sum(util) / len(util) if util else 0.0,
        "gaps": gaps,
    }


def start(root: int, path: Path, interval: float, after_restore: bool) -> None:
    """Start a detached tracer for the tree of ``root``."""
    args = [sys.executable, "-m", "cedana_ray.plugins.gpu.tracing", str(root), str(path), str(interval)]
    if after_restore:
        args.append("--after-restore")
    subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def run(root: int, path: Path, interval: float, after_restore: bool) -> None:
    import pynvml

    from cedana_ray.proctree import alive

    pynvml.nvmlInit()
    if after_restore and path.exists():
        last = max((e["ts"] + e.get("dur", 0) for e in read(path)), default=None)
        if last is not None:
            append(path, [gap(last / 1e6, time.time(), "checkpointed (restored here)")])
    while alive(root):
        append(path, sample(root))
        time.sleep(interval)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("root", type=int)
    parser.add_argument("path", type=Path)
    parser.add_argument("interval", type=float)
    parser.add_argument("--after-restore", action="store_true")
    ns = parser.parse_args()
    os.nice(5)
    run(ns.root, ns.path, ns.interval, ns.after_restore)


if __name__ == "__main__":
    main()
