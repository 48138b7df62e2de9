"""Ticks until TERM or INT, then writes the signal's name to PATH and exits 100 + its number,
as a training loop that saves on a graceful stop does."""

import signal
import sys
import time


def stop(sig: int, _frame: object) -> None:
    with open(sys.argv[1], "w") as f:
        f.write(signal.Signals(sig).name)
    sys.exit(100 + sig)


for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, stop)
n = 0
while True:
    print(f"tick {n}", flush=True)
    n += 1
    time.sleep(0.05)
