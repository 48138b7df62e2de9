"""A STAND-IN for the Kubernetes API server, for tests/test_k8s.py.

No kube-apiserver (nor k3s, envtest or kind) can be installed on our machines, so the
apply path is tested against this: a small HTTP server that answers the REST calls the
official client makes for create, read, replace and delete, with the JSON the client
expects (the object, 201 on create, 409 AlreadyExists, 404 NotFound as a ``Status``), keeps
the objects in memory by path, and records every request. It validates nothing (no
schemas, admission, RBAC or defaulting): the objects are validated offline against the
real schemas with kubernetes-validate instead.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class Request:
    method: str
    path: str
    authorization: str | None
    body: dict[str, Any] | None


@dataclass
class StandIn:
    """The stand-in's state: the objects by path, and every request in order."""

    url: str = ""
    objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    versions: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def add(self, obj: dict[str, Any]) -> None:
        """Store a namespaced core object (a Pod, as the kubelet and scheduler left it)."""
        meta = obj["metadata"]
        self.objects[f"/api/v1/namespaces/{meta['namespace']}/{obj['kind'].lower()}s/{meta['name']}"] = obj

    def kubeconfig(self, path: Path, token: str) -> Path:
        """A kubeconfig naming this server, with a bearer token."""
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "stand-in", "cluster": {"server": self.url}}],
            "users": [{"name": "admin", "user": {"token": token}}],
            "contexts": [{"name": "stand-in", "context": {"cluster": "stand-in", "user": "admin"}}],
            "current-context": "stand-in",
        }
        path.write_text(json.dumps(doc))
        return path


POD_LIST = re.compile(r"^/api/v1(/namespaces/[^/]+)?/pods$")  # every namespace's pods, or one's


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "code": code,
        "reason": reason,
        "message": message,
    }


class _Handler(BaseHTTPRequestHandler):
    state: StandIn  # set on the class made per server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _body(self) -> dict[str, Any] | None:
        size = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(size)) if size else None

    def _answer(self, code: int, doc: dict[str, Any]) -> None:
        data = json.dumps(doc).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _record(self) -> tuple[str, dict[str, Any] | None]:
        path, body = self.path.split("?", 1)[0], self._body()
        self.state.requests.append(Request(self.command, path, self.headers.get("Authorization"), body))
        return path, body

    def _stored(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = {**obj["metadata"], "resourceVersion": str(next(self.state.versions)), "uid": "stand-in"}
        return {**obj, "metadata": meta}

    def do_POST(self) -> None:
        path, body = self._record()
        item = f"{path}/{body['metadata']['name']}"
        if item in self.state.objects:
            return self._answer(409, _status(409, "AlreadyExists", f"{item} already exists"))
        self.state.objects[item] = self._stored(body)
        self._answer(201, self.state.objects[item])

    def do_GET(self) -> None:
        path, _ = self._record()
        if POD_LIST.match(path):
            return self._answer(200, self._pods(path))
        if path not in self.state.objects:
            return self._answer(404, _status(404, "NotFound", f"{path} not found"))
        self._answer(200, self.state.objects[path])

    def _pods(self, path: str) -> dict[str, Any]:
        """The stored pods under ``path``, as the server lists them (a PodList)."""
        prefix = "/api/v1/namespaces/" if path == "/api/v1/pods" else path.removesuffix("pods")
        items = [o for at, o in sorted(self.state.objects.items()) if at.startswith(prefix) and o.get("kind") == "Pod"]
        meta = {"resourceVersion": str(next(self.state.versions))}
        return {"kind": "PodList", "apiVersion": "v1", "metadata": meta, "items": items}

    def do_PUT(self) -> None:
        path, body = self._record()
        if path not in self.state.objects:
            return self._answer(404, _status(404, "NotFound", f"{path} not found"))
        self.state.objects[path] = self._stored(body)
        self._answer(200, self.state.objects[path])

    def do_DELETE(self) -> None:
        path, _ = self._record()
        if self.state.objects.pop(path, None) is None:
            return self._answer(404, _status(404, "NotFound", f"{path} not found"))
        self._answer(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})


@contextmanager
def stand_in() -> Iterator[StandIn]:
    """The stand-in API server on a free port of 127.0.0.1, stopped afterwards."""
    state = StandIn()
    handler = type("Handler", (_Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
