"""A private containerd, started and stopped by PID: for the tests, bench/containers.py and
scripts/gpu_check.py (which runs where pytest may be missing, so this module needs only
cedana-ray)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from cedana_ray.retry import until

READY_TIMEOUT_S = 30.0


def start_containerd(base: Path) -> subprocess.Popen[bytes]:
    """containerd with its config, root, state and socket under ``base`` (CRI disabled).

    Its temp dir too: for each live restore containerd unpacks the checkpoint into
    ``$XDG_RUNTIME_DIR`` (else ``$TMPDIR``, else /tmp) as ``ctrd-checkpoint*`` and never
    removes it (containerd issue 10166); under ``base``, it goes when ``base`` does."""
    config = base / "config.toml"
    (base / "tmp").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"} | {"TMPDIR": str(base / "tmp")}
    config.write_text(
        "version = 2\n"
        f'root = "{base}/root"\nstate = "{base}/state"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{base}/containerd.sock"\n'
        f'[ttrpc]\n  address = "{base}/containerd.sock.ttrpc"\n'
        f'[debug]\n  address = "{base}/debug.sock"\n'
    )
    with open(base / "containerd.log", "wb") as log:
        daemon = subprocess.Popen(["containerd", "--config", str(config)], stdout=log, stderr=log, env=env)
    until(lambda: (base / "containerd.sock").exists() or daemon.poll() is not None, READY_TIMEOUT_S, 0.05)
    if daemon.poll() is not None or not (base / "containerd.sock").exists():
        daemon.kill()
        raise RuntimeError(f"containerd did not start: {(base / 'containerd.log').read_text()[-500:]}")
    return daemon
