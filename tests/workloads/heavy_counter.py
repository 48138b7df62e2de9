"""A counter that also holds SIZE MiB of random bytes, so that its dumps take a while."""

import os
import sys
import time

ballast = os.urandom(int(sys.argv[1]) << 20)
count = 0
while True:
    print(f"count={count}", flush=True)
    count += 1
    time.sleep(0.05)
