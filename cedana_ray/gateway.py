"""The coordinator's front door for commands: the verbs of :class:`~cedana_ray.backend.Backend`
over HTTP, so that a command reaches the cluster without connecting to Ray (``ray.init``
costs a second or more per command).

The coordinator serves it on its node's address, on a port of its own (``up`` records the
URL in the cluster state), and answers only requests that carry its token (``Authorization:
Bearer``), a secret kept 0600 in the coordinator's state dir. A request is ``POST /v1/VERB``
with the verb's arguments by name; they and the answer are checked against the Backend's
type hints on both sides, as a Ray call's would be by the Python types. A verb whose
progress can be followed (dump, restore, migrate) answers with one JSON line per update,
then its result. Errors travel as the :class:`~cedana_ray.errors.CedanaError` they are.
The bytes of a call and its answer are :mod:`cedana_ray.wire`'s.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hmac
import importlib
import inspect
import json
import os
import secrets
import threading
import typing
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretBytes, TypeAdapter, ValidationError

from . import wire
from .backend import VERBS, Backend
from .errors import CedanaError, PermissionDenied, UsageError
from .wire import PATH, TOKEN_FILE, read_token

MAX_REQUEST = 1 << 20  # bytes: a request is a verb's arguments, never data


@functools.cache
def _hints(verb: str) -> dict[str, Any]:
    return typing.get_type_hints(getattr(Backend, verb))


def _adapter(hint: Any) -> TypeAdapter[Any]:
    return TypeAdapter(hint)


def _encode(value: Any) -> Any:
    """For json.dumps: bytes (and secrets, which travel revealed: the channel is
    authenticated, and a key given to a dump must reach it) as ``{"$bytes": base64}``."""
    if isinstance(value, SecretBytes):
        value = value.get_secret_value()
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode()}
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot send {type(value).__name__}")


def dumps(hint: Any, value: Any) -> bytes:
    return json.dumps(_adapter(hint).dump_python(value), default=_encode).encode()


def loads(hint: Any, raw: Any) -> Any:
    return _adapter(hint).validate_python(raw)


def _models_in(hint: Any) -> list[type[BaseModel]]:
    return [t for t in (hint, *typing.get_args(hint)) if isinstance(t, type) and issubclass(t, BaseModel)]


def dump_arg(hint: Any, value: Any) -> Any:
    """An argument, as sent: a request of a plugin's own subclass (``RuncRunRequest``) with its
    class named, so that its own fields arrive (the hint's type would drop them)."""
    if isinstance(value, BaseModel) and type(value) not in _models_in(hint):
        cls = type(value)
        return {"$model": f"{cls.__module__}:{cls.__qualname__}", "value": value.model_dump()}
    return _adapter(hint).dump_python(value)


def load_arg(hint: Any, raw: Any) -> Any:
    """An argument, as received: a named class only where it is a subclass of the hint's, in
    cedana-ray or an installed plugin's package (a caller names no other code to import)."""
    if not (isinstance(raw, dict) and raw.keys() == {"$model", "value"}):
        return loads(hint, raw)
    module, _, name = str(raw["$model"]).partition(":")
    from .plugins_manager import installed

    packages = {"cedana_ray", *(v.split(".")[0].split(":")[0] for v in installed().values())}
    if module.split(".")[0] not in packages:
        raise ValueError(f"{module} is not cedana-ray's nor a plugin's")
    cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and any(issubclass(cls, base) for base in _models_in(hint))):
        raise ValueError(f"{raw['$model']} is not a {hint}")
    return cls.model_validate(raw["value"])


def _error_doc(exc: CedanaError) -> dict[str, Any]:
    return {"error": {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint}}


def _as_ours(exc: Exception) -> CedanaError:
    return exc if isinstance(exc, CedanaError) else CedanaError(f"{type(exc).__name__}: {exc}")


# -- the server, in the coordinator
def token_of(base: Path) -> str:
    """The gateway's token, kept in the coordinator's state dir ``base`` (made once, 0600)."""
    with contextlib.suppress(FileExistsError):
        fd = os.open(base / TOKEN_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32))
    return read_token(base)


class Gateway:
    """Serves ``target``'s verbs (the coordinator's) on ``host``, to holders of ``token``."""

    def __init__(self, target: Any, token: str, host: str) -> None:
        handler = type("Handler", (_Handler,), {"target": target, "token": f"Bearer {token}"})
        self.server = ThreadingHTTPServer((host, 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://{host}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, name="gateway", daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    target: Any
    token: str
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # the coordinator's log has what matters
        pass

    def do_POST(self) -> None:
        if not hmac.compare_digest(self.headers.get("Authorization", "").encode(), self.token.encode()):
            return self._answer(401, _error_doc(PermissionDenied("the cedana-ray gateway refused the token")))
        verb = self.path.removeprefix(PATH)
        size = int(self.headers.get("Content-Length") or 0)
        if verb not in VERBS or not self.path.startswith(PATH) or size > MAX_REQUEST:
            return self._answer(400, _error_doc(UsageError(f"no such call: {self.path}")))
        try:
            body = json.loads(self.rfile.read(size), object_hook=wire.decode)
            named = {k: load_arg(_hints(verb)[k], v) for k, v in body["args"].items() if k != "progress"}
        except (ValueError, KeyError, TypeError, ValidationError, ImportError) as exc:
            return self._answer(400, _error_doc(UsageError(f"a malformed {verb} call: {exc}")))
        call = functools.partial(getattr(self.target, verb), **named)
        if body.get("progress"):
            return self._stream(verb, call)
        try:
            result = dumps(_hints(verb)["return"], call())
        except Exception as exc:  # the caller's error, never a dropped connection it might retry
            return self._answer(200, _error_doc(_as_ours(exc)))
        self._send(200, b'{"result": ' + result + b"}")

    def _stream(self, verb: str, call: Callable[..., Any]) -> None:
        """One JSON line per progress update, then the result (or the error)."""
        from .remote import Finished, streamed

        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            for item in streamed(lambda progress: call(progress=progress)):
                if isinstance(item, Finished):
                    line = b'{"result": ' + dumps(_hints(verb)["return"], item.value) + b"}"
                else:
                    line = json.dumps({"progress": list(item)}).encode()
                self.wfile.write(line + b"\n")
                self.wfile.flush()
        except Exception as exc:
            self.wfile.write(json.dumps(_error_doc(_as_ours(exc))).encode() + b"\n")

    def _answer(self, code: int, doc: dict[str, Any]) -> None:
        self._send(code, json.dumps(doc).encode())

    def _send(self, code: int, data: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


# -- the client, in a command
class GatewayClient:
    """The cluster through the coordinator's gateway: the verbs of
    :class:`~cedana_ray.backend.Backend`; what needs this process's Ray node (``node``,
    ``manage``) goes through ``ray_backend()``, as does every verb when the gateway does
    not answer (a coordinator restarted elsewhere)."""

    def __init__(self, url: str, token: str, ray_backend: Callable[[], Backend]) -> None:
        self.url = url
        self.token = token
        self._ray_backend = ray_backend
        self._fallen_back: Backend | None = None

    def _ray(self) -> Backend:
        if self._fallen_back is None:
            self._fallen_back = self._ray_backend()
        return self._fallen_back

    def __getattr__(self, name: str) -> Any:
        if name in VERBS:
            return functools.partial(self._call, name)
        return getattr(self._ray(), name)  # node, manage

    def manage(self, *args: Any, **kwargs: Any) -> Any:
        return self._ray().manage(*args, **kwargs)

    def _call(self, verb: str, *args: Any, **kwargs: Any) -> Any:
        if self._fallen_back is not None:
            return getattr(self._fallen_back, verb)(*args, **kwargs)
        bound = inspect.signature(getattr(Backend, verb)).bind(self, *args, **kwargs).arguments
        progress = bound.pop("progress", None)
        named = {k: v for k, v in bound.items() if k != "self"}
        hints = _hints(verb)
        args_doc = {k: dump_arg(hints[k], v) for k, v in named.items()}
        body = json.dumps({"args": args_doc, "progress": progress is not None}, default=_encode).encode()
        try:
            result = wire.call(self.url, self.token, verb, body, progress)
        except wire.NoGateway:  # no gateway there (any more): the slow way, which says what is wrong
            return getattr(self._ray(), verb)(*args, **kwargs)
        return loads(hints["return"], result)
