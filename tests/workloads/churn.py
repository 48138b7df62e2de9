"""Holds SIZE MiB of pseudo-random bytes; on SIGUSR1 rewrites a tenth of them (one span, the same each time).

The bytes come from a seeded generator, the same in every run: content-defined chunk
boundaries fall where the content says, so what a second dump stores is the same each run.

Prints ``ready DIGEST`` once filled, ``changed DIGEST`` after each rewrite, then
``check DIGEST`` (the sha256 of the buffer) every half second.
"""

import hashlib
import random
import signal
import sys
import time

size = int(sys.argv[1]) << 20
rng = random.Random(2026)
buf = bytearray(rng.randbytes(size))


def rewrite(signum: int, frame: object) -> None:
    span = size // 10
    at = size // 3  # always the same span: a signal delivered twice changes no more
    buf[at : at + span] = rng.randbytes(span)  # a large temporary is mmap'd and unmapped: none left in the heap
    print(f"changed {hashlib.sha256(buf).hexdigest()}", flush=True)


signal.signal(signal.SIGUSR1, rewrite)
print(f"ready {hashlib.sha256(buf).hexdigest()}", flush=True)
while True:
    time.sleep(0.5)
    print(f"check {hashlib.sha256(buf).hexdigest()}", flush=True)
