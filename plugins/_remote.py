"""What the object-store plugins share: probing an endpoint for ``cedana-ray check``."""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

from cedana_ray.models import HealthCheck

PROBE_TIMEOUT_S = 2.0


def endpoint_check(url: str) -> HealthCheck:
    """Whether a TCP connection to ``url``'s host and port opens (no request, no credentials)."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        return HealthCheck(name="endpoint", ok=False, fatal=False, detail=f"{url} unreachable: {exc.strerror or exc}")
    return HealthCheck(name="endpoint", ok=True, fatal=False, detail=f"{url} reachable")
