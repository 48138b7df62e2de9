"""Failpoints: crash this process at a named point, to test what a crash there leaves behind.

With ``CEDANA_RAY_FAILPOINT=NAME`` in its environment, a cedana-ray process kills itself
with SIGKILL (as the OOM killer, a lost node or ``kill -9`` would) when it reaches the
point NAME. Unset, a failpoint costs one dictionary lookup. The points:

* ``dump:criu``       while CRIU dumps (CRIU goes on, orphaned, and leaves the tree stopped)
* ``dump:store``      after the first image is stored, before the manifest
* ``dump:committed``  after the manifest, before the job is recorded and stopped
"""

from __future__ import annotations

import os
import signal

ENV = "CEDANA_RAY_FAILPOINT"


def reached(name: str) -> None:
    """Die here if the environment names this point."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
