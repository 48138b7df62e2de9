"""A small stateful workload: counts, keeps a running checksum, prints both.

Used by ``make demo`` and the tests: after a restore it must go on from where it
stopped, with a checksum that only an unbroken run can produce.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time


def main() -> None:
    interval = float(sys.argv[1]) if len(sys.argv) > 1 else 0.2
    state = hashlib.sha256()
    count = 0
    while True:
        state.update(count.to_bytes(8, "little"))
        print(f"count={count} pid={os.getpid()} digest={state.hexdigest()[:16]}", flush=True)
        count += 1
        time.sleep(interval)


if __name__ == "__main__":
    main()
