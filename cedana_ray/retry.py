"""Retries with backoff for remote storage, and one-line descriptions of its errors.

Backends (s3fs, gcsfs) are configured to try each request once: the store retries
here, the same way on every backend, so a dead server costs a known, short time
and a permanent error (wrong credentials, missing bucket) is never retried.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

ATTEMPTS = 4
BASE_DELAY_S = 0.2  # then 0.4, 0.8: about 1.5 s before giving up on a dead server

# Connection-level failures of the HTTP stacks under s3fs (botocore, aiohttp) and
# gcsfs (aiohttp, requests), by class name so the core imports none of them.
_TRANSIENT_NAMES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ResponseStreamingError",
        "IncompleteReadError",
        "ClientConnectionError",
        "ClientPayloadError",
        "ServerDisconnectedError",
        "ChunkedEncodingError",
    }
)
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "CEDANA_RAY_KEY")


def http_status(exc: BaseException) -> int | None:
    """The HTTP status a backend error carries (gcsfs ``code``, aiohttp ``status``, botocore
    ``response``), or its cause carries: s3fs turns S3 errors into plain ``OSError``s whose
    cause is botocore's."""
    for err in (exc, exc.__cause__):
        for value in (getattr(err, "code", None), getattr(err, "status", None), _botocore_status(err)):
            if isinstance(value, int) and 100 <= value < 600:
                return value
    return None


def _botocore_status(exc: BaseException | None) -> object:
    response = getattr(exc, "response", None)
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(response, dict) else None


def is_transient(exc: BaseException) -> bool:
    """Whether trying ``exc``'s request again may succeed."""
    if isinstance(exc, PermissionError | FileNotFoundError | FileExistsError | IsADirectoryError):
        return False
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(exc).__mro__):
        return True
    return http_status(exc) in _TRANSIENT_STATUS


def is_storage_error(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a storage backend (and not from a bug of ours)."""
    return isinstance(exc, OSError) or is_transient(exc) or http_status(exc) is not None


def retrying(call: Callable[[], T], attempts: int = ATTEMPTS, base_delay: float = BASE_DELAY_S) -> T:
    """``call()``, again after a doubling delay while it fails transiently."""
    for attempt in range(attempts - 1):
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc):
                raise
        time.sleep(base_delay * 2**attempt)
    return call()


def redact(text: str) -> str:
    """``text`` without any credential found in the environment."""
    for var in _SECRET_VARS:
        secret = os.environ.get(var)
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def describe(exc: BaseException, bucket: str) -> str:
    """One line saying what went wrong with ``bucket``, never with credentials in it."""
    status = http_status(exc)
    first = redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    if isinstance(exc, PermissionError) or status in (401, 403) or first.startswith("Forbidden"):
        return f"access to bucket {bucket!r} denied (check the credentials): {first}"
    if isinstance(exc, FileNotFoundError) and "bucket" in first.lower():
        return f"bucket {bucket!r} does not exist"
    if is_transient(exc):
        return f"storage server unreachable or failing after {ATTEMPTS} attempts: {first}"
    return first


def until(check: Callable[[], object], timeout: float, interval: float) -> bool:
    """Whether ``check()`` becomes true within ``timeout`` seconds, asked every ``interval``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True
