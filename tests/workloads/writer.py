"""Appends numbered lines to PATH through one open file, flushing each."""

import sys
import time

with open(sys.argv[1], "w") as f:
    n = 0
    while True:
        f.write(f"line {n}\n")
        f.flush()
        print(f"wrote {n} at {f.tell()}", flush=True)
        n += 1
        time.sleep(0.1)
