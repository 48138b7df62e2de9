"""How a verb travels to the coordinator's gateway and back: ``POST /v1/VERB`` with the
caller's token, answered with JSON (one line per progress update, then the result, or the
error). The bytes, not their types: :mod:`cedana_ray.gateway` checks both ends against the
Backend's type hints, and ``ps`` (:mod:`cedana_ray.listing`) reads its answer as it is.
"""

from __future__ import annotations

import base64
import http.client
import json
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from . import errors
from .cluster_state import gateway_of

if TYPE_CHECKING:
    from .backend import Progress

PATH = "/v1/"
TOKEN_FILE = "gateway.token"
CONNECT_TIMEOUT_S = 5.0


class NoGateway(OSError):
    """Nothing answers at the gateway's address: the call was not made."""


def read_token(base: Path) -> str:
    """The gateway's token, in the coordinator's state dir ``base``."""
    return (base / TOKEN_FILE).read_text().strip()


def endpoint(addr: str) -> tuple[str, str] | None:
    """The URL and token of the gateway of the cluster at ``addr``, where ``up`` recorded one
    here that commands may use (:func:`~cedana_ray.cluster_state.gateway_of`) and its token
    can be read."""
    state = gateway_of(addr)
    if state is None or state.gateway is None:
        return None
    try:
        return state.gateway, read_token(Path(state.base))
    except OSError:
        return None


def decode(obj: dict[str, Any]) -> Any:
    """For json.loads: bytes travel as ``{"$bytes": base64}``."""
    return base64.b64decode(obj["$bytes"]) if obj.keys() == {"$bytes"} else obj


def raise_error(doc: dict[str, Any]) -> typing.NoReturn:
    """The error the coordinator raised, as its class (any other name: a CedanaError)."""
    cls = getattr(errors, str(doc.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, errors.CedanaError)):
        cls = errors.CedanaError
    raise cls(str(doc.get("message")), hint=doc.get("hint"))


def call(url: str, token: str, verb: str, body: bytes, progress: Progress | None = None) -> Any:
    """The JSON result of ``verb`` called with ``body`` (``{"args": ..., "progress": ...}``),
    progress updates given to ``progress``. Raises :class:`NoGateway` where nothing answers
    at ``url``; once asked, the call may have run, and it is never made twice."""
    where = urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname or "", where.port, timeout=CONNECT_TIMEOUT_S)
    try:
        conn.connect()
        conn.sock.settimeout(None)  # a dump or a migration takes as long as it takes
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        conn.request("POST", f"{PATH}{verb}", body=body, headers=headers)
    except OSError as exc:
        conn.close()
        raise NoGateway(str(exc)) from None
    try:
        return _answer(verb, conn.getresponse(), progress)
    except (OSError, http.client.HTTPException) as exc:
        raise errors.Unreachable(f"the cedana-ray gateway at {where.netloc} went away: {exc}") from None
    finally:
        conn.close()


def _answer(verb: str, response: http.client.HTTPResponse, progress: Progress | None) -> Any:
    for line in _lines(response):
        doc = json.loads(line, object_hook=decode)
        if "error" in doc:
            raise_error(doc["error"])
        if "result" in doc:
            return doc["result"]
        if progress is not None:
            progress(*doc["progress"])
    raise errors.Unreachable(f"the cedana-ray gateway ended the {verb} call without an answer")


def _lines(response: http.client.HTTPResponse) -> Iterator[bytes]:
    if response.getheader("Content-Type") != "application/x-ndjson":
        yield response.read()
        return
    while line := response.readline():
        yield line
