"""OCI checkpoint images, as Kubernetes restores them, and the registry they travel through.

The kubelet's checkpoint API writes a container's checkpoint archive (the runtime's
``CheckpointContainer`` tar: ``config.dump``, ``spec.dump``, ``checkpoint/``, the rw layer's
diff...); the image made from it (as CRI-O's docs and checkpointctl's ``build`` make it) has
that archive's contents as its one layer and names the container in the manifest's
annotation ``io.kubernetes.cri-o.annotations.checkpoint.name``, which is how CRI-O and
containerd >= 2.0 tell a checkpoint image from any other when it is the image of a
``CreateContainer``: CRI-O reads that name, containerd 2.x the one of checkpointctl's library
it is built with (``org.criu.checkpoint.container.name`` in 2.1), so both are set, with the
rest of each's annotations. We also record the pod's sandbox config there, so a restore can make
the pod again. Pushed and read with the registry's HTTP API (v2), anonymously: plain HTTP
for a registry on localhost, HTTPS elsewhere.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cedana_ray.errors import NotFoundError, PrerequisiteError, StateError, UsageError

CHECKPOINT_NAME = "io.kubernetes.cri-o.annotations.checkpoint.name"  # CRI-O's, Kubernetes' docs'
CRIU_NAME = "org.criu.checkpoint.container.name"  # checkpointctl's library's: containerd 2.1 reads it
CHECKPOINT_NAMES = (CHECKPOINT_NAME, CRIU_NAME)
POD_CONFIG = "dev.cedana-ray.k8s.pod-config"  # the pod's PodSandboxConfig, as protobuf's JSON
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar"
ACCEPT = f"{MANIFEST}, application/vnd.docker.distribution.manifest.v2+json"
LOCAL_HOSTS = ("localhost", "127.0.0.1", "[::1]")
CHUNK = 1 << 20
TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Ref:
    """``HOST[:PORT]/REPO[:TAG]``: an image in a registry (the host is required)."""

    host: str
    repo: str
    tag: str

    @classmethod
    def parse(cls, text: str) -> Ref:
        host, _, rest = text.partition("/")
        if not rest or not ("." in host or ":" in host or host == "localhost") or "@" in rest:
            raise UsageError(f"{text!r} is not an image reference HOST[:PORT]/REPO[:TAG]")
        repo, _, tag = rest.rpartition(":") if ":" in rest else (rest, "", "latest")
        return cls(host, repo.lower(), tag)

    def with_tag(self, tag: str) -> Ref:
        return Ref(self.host, self.repo, tag)

    @property
    def base(self) -> str:
        name = "[::1]" if self.host.startswith("[::1]") else self.host.split(":")[0]
        scheme = "http" if name in LOCAL_HOSTS else "https"
        return f"{scheme}://{self.host}/v2/{self.repo}"

    def __str__(self) -> str:
        return f"{self.host}/{self.repo}:{self.tag}"


def _request(url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None) -> Any:
    """One registry call; its response (the caller reads and closes it), errors as one line."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        return urllib.request.urlopen(req, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as exc:
        detail = exc.read(300).decode(errors="replace").strip()
        cls = NotFoundError if exc.code == 404 else StateError
        raise cls(f"registry {method} {url}: HTTP {exc.code} {detail}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PrerequisiteError(f"registry at {url.split('/v2/')[0]} is not reachable: {reason}") from exc


# -- building
@dataclass(frozen=True)
class Blob:
    """A content-addressed file: its digest, size and media type."""

    path: Path
    digest: str
    size: int
    media_type: str

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


def _sha256(path: Path, opener: Any = open) -> str:
    h = hashlib.sha256()
    with opener(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return f"sha256:{h.hexdigest()}"


def layer_of(archive: Path) -> tuple[Blob, str]:
    """The archive as the image's layer, and the layer's diff id (the digest of its tar)."""
    gzipped = _is_gzip(archive)
    digest = _sha256(archive)
    diff_id = _sha256(archive, gzip.open) if gzipped else digest
    return Blob(archive, digest, archive.stat().st_size, LAYER + ("+gzip" if gzipped else "")), diff_id


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def build(archive: Path, work: Path, annotations: dict[str, str]) -> tuple[list[Blob], bytes]:
    """The checkpoint image of ``archive`` in ``work``: its blobs (config, layer) and manifest."""
    layer, diff_id = layer_of(archive)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "config": {},
    }
    raw = json.dumps(config, sort_keys=True).encode()
    (work / "config.json").write_bytes(raw)
    cfg = Blob(work / "config.json", f"sha256:{hashlib.sha256(raw).hexdigest()}", len(raw), CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": cfg.descriptor(),
        "layers": [layer.descriptor()],
        "annotations": annotations,
    }
    return [cfg, layer], json.dumps(manifest, sort_keys=True).encode()


# -- pushing and reading
def push(ref: Ref, blobs: list[Blob], manifest: bytes) -> str:
    """Push the blobs (those the registry lacks) and the manifest under ``ref``'s tag; the manifest's digest."""
    for blob in blobs:
        _push_blob(ref, blob)
    _request(f"{ref.base}/manifests/{ref.tag}", "PUT", manifest, {"Content-Type": MANIFEST}).close()
    return f"sha256:{hashlib.sha256(manifest).hexdigest()}"


def _push_blob(ref: Ref, blob: Blob) -> None:
    try:
        _request(f"{ref.base}/blobs/{blob.digest}", "HEAD").close()
        return  # already there
    except NotFoundError:
        pass
    with _request(f"{ref.base}/blobs/uploads/", "POST", b"") as started:
        location = started.headers["Location"]
    if location.startswith("/"):
        location = ref.base.split("/v2/")[0] + location
    url = f"{location}{'&' if '?' in location else '?'}digest={blob.digest}"
    headers = {"Content-Type": "application/octet-stream", "Content-Length": str(blob.size)}
    with open(blob.path, "rb") as body:
        _request(url, "PUT", body, headers).close()


def manifest_of(ref: Ref) -> dict[str, Any]:
    """The image's manifest; a missing image is one line (NotFoundError)."""
    try:
        with _request(f"{ref.base}/manifests/{ref.tag}", headers={"Accept": ACCEPT}) as res:
            return json.loads(res.read())
    except NotFoundError as exc:
        raise NotFoundError(f"no image {ref} in its registry") from exc


def download_layer(ref: Ref, manifest: dict[str, Any], dest: Path) -> Path:
    """The checkpoint image's layer (the checkpoint archive) into file ``dest``."""
    (layer,) = manifest["layers"]
    with _request(f"{ref.base}/blobs/{layer['digest']}") as res, open(dest, "wb") as out:
        while chunk := res.read(CHUNK):
            out.write(chunk)
    return dest
