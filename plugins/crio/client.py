"""A CRI client: ``runtime.v1.RuntimeService`` over gRPC, errors as one line.

Why gRPC and not ``crictl``: the issue asks for the CRI API itself, and crictl is not
packaged anywhere we can reach. The CRI is one protobuf file (``proto/api.proto``,
from Debian's golang-k8s-cri-api-dev); only its messages are generated
(``proto/api_pb2.py``, see scripts/gen-cri-stubs.sh): the methods are called by name
with :meth:`grpc.Channel.unary_unary`, so no generated service stubs are needed.

grpc and the generated module are imported when a call is made, not when the plugin
is loaded: every ``cedana-ray`` command loads every plugin. Both come with the ``cri``
extra; without it a call (and the health check) says so in one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cedana_ray.errors import CedanaError, JobNotFound, PrerequisiteError, StateError, UsageError
from cedana_ray.extras import MissingExtra, load, needs

if TYPE_CHECKING:
    from .proto import api_pb2 as pb

DEFAULT_ENDPOINT = "unix:///run/containerd/containerd.sock"
ENDPOINT_ENV = "CONTAINER_RUNTIME_ENDPOINT"  # crictl's and the kubelet's name for it
RUNTIME, IMAGES = "RuntimeService", "ImageService"
TIMEOUT_S = 10.0
REMOVE_RETRY_S = 3.0
CHECKPOINT_TIMEOUT_S = 300.0  # a CRIU dump or restore of a large container takes a while
CHECKPOINT_HINT = "CRI checkpointing needs containerd >= 2.0 or CRI-O with enable_criu_support"


REQUIRED = needs("cri", "the crio plugin (CRI)")


def messages() -> Any:
    """The generated CRI messages (``runtime.v1``); refused in one line, naming the extra,
    without the protobuf runtime they were generated for."""
    try:
        from .proto import api_pb2
    except Exception as exc:  # protobuf missing, or older than protoc was (its VersionError)
        raise MissingExtra(REQUIRED) from exc
    return api_pb2


def json_mapping() -> Any:
    """protobuf's JSON mapping of messages (``google.protobuf.json_format``), from the
    protobuf runtime :func:`messages` accepted."""
    messages()
    from google.protobuf import json_format

    return json_format


def grpc_module() -> Any:
    """grpc, or our one-line error naming the extra."""
    return load("grpc", REQUIRED)


def one_line(text: str) -> str:
    return "; ".join(ln.strip() for ln in text.splitlines() if ln.strip()) or "no details"


@dataclass(frozen=True)
class Cri:
    """The ``RuntimeService`` of one CRI endpoint (``unix:///path`` or a bare socket path)."""

    endpoint: str
    timeout: float = TIMEOUT_S

    @classmethod
    def from_env(cls) -> Cri:
        """The endpoint of ``CONTAINER_RUNTIME_ENDPOINT``, default the system containerd's."""
        return cls(os.environ.get(ENDPOINT_ENV) or DEFAULT_ENDPOINT)

    @property
    def target(self) -> str:
        return self.endpoint if "://" in self.endpoint else f"unix://{self.endpoint}"

    def call(
        self,
        method: str,
        request: Any,
        error: type[CedanaError] = StateError,
        timeout: float | None = None,
        service: str = RUNTIME,
    ) -> Any:
        """``runtime.v1.SERVICE/METHOD(request)``; the response, or our error with the runtime's message."""
        grpc, pb = grpc_module(), messages()
        self._require_socket()
        response_type = getattr(pb, f"{method}Response")
        with grpc.insecure_channel(self.target) as channel:
            rpc = channel.unary_unary(
                f"/runtime.v1.{service}/{method}",
                request_serializer=type(request).SerializeToString,
                response_deserializer=response_type.FromString,
            )
            try:
                return rpc(request, timeout=timeout or self.timeout)
            except grpc.RpcError as exc:
                raise self._error(method, exc, error) from exc

    def _require_socket(self) -> None:
        """A missing unix socket, said plainly rather than as gRPC's connection error."""
        path = self.target.removeprefix("unix://")
        if self.target.startswith("unix://") and not os.path.exists(path):
            raise PrerequisiteError(
                f"CRI endpoint {self.endpoint} is not reachable: no socket at {path}", hint=f"set {ENDPOINT_ENV}"
            )

    def _error(self, method: str, exc: Any, error: type[CedanaError]) -> CedanaError:
        """The gRPC status as one of our errors: the code decides the class."""
        grpc = grpc_module()

        code, details = exc.code(), one_line(exc.details() or "")
        if code is grpc.StatusCode.UNAVAILABLE:
            message = f"CRI endpoint {self.endpoint} is not reachable: {details}"
            return PrerequisiteError(message, hint=f"set {ENDPOINT_ENV}")
        if code is grpc.StatusCode.UNIMPLEMENTED:
            message = f"{self.runtime_name()} does not implement CRI {method} (UNIMPLEMENTED: {details})"
            return PrerequisiteError(message, hint=CHECKPOINT_HINT)
        if code is grpc.StatusCode.NOT_FOUND:
            return JobNotFound(f"CRI {method}: {details}")
        if code is grpc.StatusCode.INVALID_ARGUMENT:
            return UsageError(f"CRI {method}: {details}")
        return error(f"CRI {method} failed: {details}")

    def runtime_name(self) -> str:
        """``NAME VERSION`` of the runtime behind the endpoint, or the endpoint if it does not say."""
        try:
            v = self.version()
        except CedanaError:
            return f"the CRI runtime at {self.endpoint}"
        return f"{v.runtime_name} {v.runtime_version}"

    # -- the calls the plugin makes
    def version(self) -> pb.VersionResponse:
        return self.call("Version", messages().VersionRequest(version="v1"))

    def containers(self) -> list[pb.Container]:
        return list(self.call("ListContainers", messages().ListContainersRequest()).containers)

    def status(self, cid: str) -> tuple[pb.ContainerStatus, dict[str, Any]]:
        """The container's status and the runtime's verbose info (containerd: ``pid``, ``config``...)."""
        res = self.call("ContainerStatus", messages().ContainerStatusRequest(container_id=cid, verbose=True))
        info = json.loads(res.info["info"]) if "info" in res.info else {}
        return res.status, info

    def pod(self, pod_id: str) -> tuple[pb.PodSandboxStatus, pb.PodSandboxConfig]:
        """The pod's status, and its config as far as the runtime tells it (CreateContainer
        wants the pod's config too): containerd returns all of it in the verbose info."""
        from google.protobuf import json_format

        req = messages().PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True)
        res = self.call("PodSandboxStatus", req)
        config = messages().PodSandboxConfig(metadata=res.status.metadata)
        config.labels.update(res.status.labels)
        config.annotations.update(res.status.annotations)
        config.linux.security_context.namespace_options.CopyFrom(res.status.linux.namespaces.options)
        found = json.loads(res.info["info"]).get("config") if "info" in res.info else None
        if found:
            json_format.ParseDict(found, config, ignore_unknown_fields=True)
        return res.status, config

    def pods(self) -> list[pb.PodSandbox]:
        return list(self.call("ListPodSandbox", messages().ListPodSandboxRequest()).items)

    def run_pod(self, config: pb.PodSandboxConfig) -> str:
        """A new pod sandbox from ``config``, as the kubelet starts one; its id."""
        req = messages().RunPodSandboxRequest(config=config)
        return self.call("RunPodSandbox", req, timeout=CHECKPOINT_TIMEOUT_S).pod_sandbox_id

    def remove_pod(self, pod_id: str) -> None:
        """Stop and remove the pod sandbox with its containers; a missing one is fine."""
        pb = messages()
        with contextlib.suppress(JobNotFound):
            self.call("StopPodSandbox", pb.StopPodSandboxRequest(pod_sandbox_id=pod_id))
            self.call("RemovePodSandbox", pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id))

    def checkpoint(self, cid: str, archive: str) -> None:
        """Checkpoint container ``cid`` to the tar ``archive`` (a path on the runtime's host);
        the container keeps running."""
        req = messages().CheckpointContainerRequest(container_id=cid, location=archive)
        self.call("CheckpointContainer", req, timeout=CHECKPOINT_TIMEOUT_S)

    def create(self, pod_id: str, config: pb.ContainerConfig, pod_config: pb.PodSandboxConfig) -> str:
        req = messages().CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod_config)
        return self.call("CreateContainer", req, timeout=CHECKPOINT_TIMEOUT_S).container_id

    def start(self, cid: str) -> None:
        self.call("StartContainer", messages().StartContainerRequest(container_id=cid), timeout=CHECKPOINT_TIMEOUT_S)

    def stop(self, cid: str, timeout_s: int = 0) -> None:
        self.call("StopContainer", messages().StopContainerRequest(container_id=cid, timeout=timeout_s))

    def remove(self, cid: str) -> None:
        """Stop and remove the container; a missing one is fine. Retried for a moment: a
        container killed just before (after a dump) can still be stopping inside the runtime,
        and containerd 2.1 then fails with ``failed to kill container ...: ttrpc: closed``."""
        deadline = time.monotonic() + REMOVE_RETRY_S
        while True:
            try:
                with contextlib.suppress(JobNotFound):
                    self.call("RemoveContainer", messages().RemoveContainerRequest(container_id=cid))
                return
            except StateError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def probe_checkpoint(self) -> None:
        """Whether CheckpointContainer is implemented, without checkpointing anything: asking
        for an unknown container gets NOT_FOUND where it is, UNIMPLEMENTED where it is not."""
        try:
            self.checkpoint("cedana-ray-probe-no-such-container", "/nonexistent/cedana-ray-probe.tar")
        except JobNotFound:
            return
