"""Holds SIZE MiB of random bytes; prints their sha256, then again on every tick."""

import hashlib
import os
import sys
import time

size = int(sys.argv[1]) << 20
buf = bytearray(os.urandom(size))
digest = hashlib.sha256(buf).hexdigest()
print(f"ready {digest}", flush=True)
while True:
    time.sleep(0.5)
    print(f"check {hashlib.sha256(buf).hexdigest()}", flush=True)
