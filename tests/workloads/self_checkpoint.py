"""Counts, checkpoints itself once at count=5 and reports restores (the in-job API)."""

import time

import cedana_ray

cedana_ray.on_restore(lambda: print("on_restore called", flush=True))
count = 0
while True:
    print(f"count={count}", flush=True)
    if count == 5:
        print(f"checkpoint={cedana_ray.checkpoint()}", flush=True)
    count += 1
    time.sleep(0.05)
