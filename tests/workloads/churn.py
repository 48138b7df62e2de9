"""Holds SIZE MiB of random bytes; on SIGUSR1 rewrites a tenth of them (one span, the same each time).

Prints ``ready DIGEST`` once filled, ``changed DIGEST`` after each rewrite, then
``check DIGEST`` (the sha256 of the buffer) every half second.
"""

import hashlib
import os
import signal
import sys
import time

size = int(sys.argv[1]) << 20
buf = bytearray(os.urandom(size))


def rewrite(signum: int, frame: object) -> None:
    span = size // 10
    at = size // 3  # always the same span: a signal delivered twice changes no more
    with open("/dev/urandom", "rb") as random:  # in place: no temporary copy left in the heap
        random.readinto(memoryview(buf)[at : at + span])
    print(f"changed {hashlib.sha256(buf).hexdigest()}", flush=True)


signal.signal(signal.SIGUSR1, rewrite)
print(f"ready {hashlib.sha256(buf).hexdigest()}", flush=True)
while True:
    time.sleep(0.5)
    print(f"check {hashlib.sha256(buf).hexdigest()}", flush=True)
