"""A containerd checkpoint image with its container spec edited.

``ctr c restore`` creates the container from the runtime spec stored in the checkpoint
image, so a restored container would keep the original's cgroup path and CRIU config
file: a clone restored beside its original would share its cgroup (pausing one pauses
both, deleting one kills both), and so would a copy migrated to a node on the same host.
ctr has no option to change the spec, so we edit it in the image: :func:`respec` writes
a small OCI archive holding only the edited spec, the checkpoint index that names it and
an ``index.json`` naming the result; imported after the original archive (whose blobs the
new index shares), it is a second checkpoint image to restore from. The original archive,
the stored checkpoint, is never changed.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from google.protobuf import any_pb2

SPEC = "application/vnd.containerd.container.checkpoint.config.v1+proto"  # an Any holding the spec JSON
Spec = dict[str, Any]


def _blob_name(descriptor: dict[str, Any]) -> str:
    algorithm, digest = descriptor["digest"].split(":", 1)
    return f"blobs/{algorithm}/{digest}"


def _read(tar: tarfile.TarFile, name: str) -> bytes:
    member = tar.extractfile(name)
    if member is None:
        raise KeyError(f"{name} is not a file in the checkpoint archive")
    return member.read()


def _add(blobs: dict[str, bytes], data: bytes) -> dict[str, Any]:
    """Add ``data`` as a blob; the digest and size of its descriptor."""
    descriptor = {"digest": f"sha256:{hashlib.sha256(data).hexdigest()}", "size": len(data)}
    blobs[_blob_name(descriptor)] = data
    return descriptor


def respec(archive: Path, dest: Path, name: str, edit: Callable[[Spec], None]) -> None:
    """Write to ``dest`` the checkpoint image ``name``: the one in ``archive`` with its spec
    changed by ``edit``. Import ``archive`` first: the new image refers to its blobs."""
    with tarfile.open(archive) as tar:
        index = json.loads(_read(tar, "index.json"))
        top = index["manifests"][0]
        checkpoint = json.loads(_read(tar, _blob_name(top)))
        config = next(d for d in checkpoint["manifests"] if d["mediaType"] == SPEC)
        spec_any = any_pb2.Any.FromString(_read(tar, _blob_name(config)))
    spec = json.loads(spec_any.value)
    edit(spec)
    spec_any.value = json.dumps(spec).encode()
    blobs: dict[str, bytes] = {}
    config.update(_add(blobs, spec_any.SerializeToString()))
    top.update(_add(blobs, json.dumps(checkpoint).encode()))
    top["annotations"] = {
        **top.get("annotations", {}),
        "io.containerd.image.name": name,
        "org.opencontainers.image.ref.name": name.rsplit(":", 1)[-1],
    }
    blobs["oci-layout"] = b'{"imageLayoutVersion":"1.0.0"}'
    blobs["index.json"] = json.dumps(index).encode()
    with tarfile.open(dest, "w") as out:
        for member, data in blobs.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))


def own_cgroup(path: str, namespace: str, cid: str) -> str:
    """The cgroup path container ``cid`` gets in its own right: ctr's ``/NAMESPACE/ID``, or,
    for runc's systemd driver (``SLICE:PREFIX:NAME``), the same slice and prefix."""
    if ":" in path:
        return ":".join([*path.split(":")[:-1], cid])
    return f"/{namespace}/{cid}"
