"""The gateway's wire (cedana_ray.gateway): a real server and client over HTTP on 127.0.0.1,
in front of a recording target that stands where the coordinator stands. The coordinator
behind it, the CLI through it and its token are tested on a real cluster in
tests/test_cluster_cli.py; here, what crosses the wire: plugin request subclasses whole,
secrets, progress, errors as their class, and what a caller may not name."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from cedana_ray.plugins.runc.plugin import RuncRunRequest
from pydantic import SecretBytes

from cedana_ray.errors import JobNotFound, PermissionDenied
from cedana_ray.gateway import Gateway, GatewayClient
from cedana_ray.models import DumpResult, Job, JobState
from cedana_ray.requests import DumpRequest

TOKEN = "gateway-test-token"


class Target:
    """What the coordinator answers, recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def run(self, jtype: str, request: Any) -> Job:
        self.calls.append(("run", {"jtype": jtype, "request": request}))
        return Job(jid=request.jid or "j1", type=jtype, state=JobState.running, command=request.cmd)

    def job(self, jid: str) -> Job:
        raise JobNotFound(f"no job {jid!r}", hint="`cedana-ray ps` lists the jobs")

    def dump(self, jid: str, request: DumpRequest, progress: Any = None) -> DumpResult:
        self.calls.append(("dump", {"jid": jid, "request": request}))
        for done in (0, 50, 100):
            progress("store", done, 100)
        created = datetime(2026, 12, 3, tzinfo=UTC)
        return DumpResult(
            jid=jid,
            checkpoint=f"{jid}-1",
            path="file:///x",
            size_bytes=1,
            image_bytes=2,
            created=created,
            duration_s=0.5,
        )


@pytest.fixture
def served() -> Iterator[tuple[Target, Gateway]]:
    target = Target()
    gateway = Gateway(target, TOKEN, "127.0.0.1")
    yield target, gateway
    gateway.close()


def no_ray() -> Any:
    raise AssertionError("the client fell back to Ray")


def test_a_plugin_s_request_arrives_whole(served: tuple[Target, Gateway]) -> None:
    target, gateway = served
    request = RuncRunRequest(cmd=["runc"], jid="r1", bundle="/srv/bundle", container="c1")
    job = GatewayClient(gateway.url, TOKEN, no_ray).run("runc", request)
    assert job.jid == "r1" and job.type == "runc"
    (_, got), = target.calls  # fmt: skip
    assert type(got["request"]) is RuncRunRequest and got["request"] == request


def test_secrets_progress_and_results_cross(served: tuple[Target, Gateway]) -> None:
    target, gateway = served
    seen: list[tuple[str, int, int]] = []
    key = SecretBytes(b"k" * 32)
    result = GatewayClient(gateway.url, TOKEN, no_ray).dump(
        "j1", DumpRequest(key=key), progress=lambda *p: seen.append(p)
    )
    assert isinstance(result, DumpResult) and result.checkpoint == "j1-1"
    assert seen[-1] == ("store", 100, 100) and ("store", 0, 100) in seen
    assert target.calls[0][1]["request"].key.get_secret_value() == b"k" * 32, "a key given to a dump reaches it"


def test_errors_come_back_as_their_class(served: tuple[Target, Gateway]) -> None:
    _, gateway = served
    with pytest.raises(JobNotFound) as raised:
        GatewayClient(gateway.url, TOKEN, no_ray).job("nobody")
    assert str(raised.value) == "no job 'nobody' (`cedana-ray ps` lists the jobs)"
    with pytest.raises(PermissionDenied, match="refused the token"):
        GatewayClient(gateway.url, "wrong", no_ray).job("nobody")


def raw(gateway: Gateway, verb: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    import http.client
    from urllib.parse import urlsplit

    url = urlsplit(gateway.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=10)
    conn.request("POST", f"/v1/{verb}", json.dumps(body), {"Authorization": f"Bearer {TOKEN}"})
    answer = conn.getresponse()
    return answer.status, json.loads(answer.read())


@pytest.mark.parametrize(
    "named",
    [
        "os:system",  # not ours: never imported
        "cedana_ray.models:Job",  # ours, but no RunRequest
        "cedana_ray.requests:NoSuchClass",
    ],
)
def test_a_caller_names_no_other_class(served: tuple[Target, Gateway], named: str) -> None:
    target, gateway = served
    request = {"$model": named, "value": {"cmd": ["true"]}}
    status, doc = raw(gateway, "run", {"args": {"jtype": "process", "request": request}})
    assert status == 400 and "malformed run call" in doc["error"]["message"]
    assert target.calls == []


def test_a_gateway_that_does_not_answer_is_left_for_ray(served: tuple[Target, Gateway]) -> None:
    _, gateway = served
    url = gateway.url
    gateway.close()

    class Ray:
        def job(self, jid: str) -> str:
            return f"ray:{jid}"

    assert GatewayClient(url, TOKEN, Ray).job("j9") == "ray:j9"  # type: ignore[arg-type]
