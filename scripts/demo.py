"""`make demo`: run a counter, checkpoint it, kill it, restore it, show it went on.

Everything goes through the `cedana-ray` CLI in local mode, with checkpoints on
local disk, in a state dir of its own (.state/demo, or CEDANA_RAY_HOME).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = str(Path(sys.executable).with_name("cedana-ray"))


def sh(*args: str, quiet: bool = False) -> str:
    if not quiet:
        print(f"\n$ cedana-ray {shlex.join(args)}", flush=True)
    res = subprocess.run([CLI, *args], capture_output=True, text=True)
    if not quiet or res.returncode:
        print(res.stdout.rstrip(), res.stderr.rstrip(), sep="\n" if res.stderr else "", flush=True)
    if res.returncode:
        sys.exit(f"demo failed: cedana-ray {args[0]} exited {res.returncode}")
    return res.stdout


def counts(jid: str) -> list[int]:
    log = sh("logs", jid, quiet=True)
    return [int(m.group(1)) for m in re.finditer(r"count=(\d+)", log)]


def main() -> None:
    os.environ.setdefault("CEDANA_RAY_HOME", str(ROOT / ".state" / "demo"))
    jid = f"demo-{int(time.time())}"
    sh("check")
    sh("run", "process", "--jid", jid, "--", sys.executable, str(ROOT / "jobs" / "counter.py"), "0.2")
    time.sleep(3)
    print("\n".join(sh("logs", jid, quiet=True).splitlines()[-3:]))
    sh("dump", "job", jid)
    stopped = counts(jid)[-1]
    sh("ps")
    time.sleep(2)
    assert counts(jid)[-1] == stopped, "the job still ran after its dump"
    print(f"\nthe job is gone; it stopped at count={stopped}. Restoring it...")
    sh("restore", "job", jid)
    time.sleep(3)
    print("\n".join(sh("logs", jid, quiet=True).splitlines()[-3:]))
    after = counts(jid)
    sh("checkpoint", "list", jid)
    sh("job", "kill", jid)
    if after != list(range(len(after))) or after[-1] <= stopped:
        sys.exit(f"demo failed: the counter did not go on from {stopped}: {after[-5:]}")
    print(f"\ndemo OK: the counter was checkpointed at {stopped}, killed, restored, and went on to {after[-1]}")
    print("without restarting: same PID inside its namespace, same running checksum.")


if __name__ == "__main__":
    main()
