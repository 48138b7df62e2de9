"""Counts, checkpoints itself once at count=5 with metadata, and reports restores (the in-job API)."""

import time

import cedana_ray


def restored() -> None:
    print("on_restore called", flush=True)
    print(f"restored={cedana_ray.restored()}", flush=True)


print(f"restored={cedana_ray.restored()}", flush=True)
cedana_ray.on_restore(restored)
count = 0
while True:
    print(f"count={count}", flush=True)
    if count == 5:
        print(f"checkpoint={cedana_ray.checkpoint(metadata={'count': 5, 'stage': 'warmup'})}", flush=True)
    count += 1
    time.sleep(0.05)
