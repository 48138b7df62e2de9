"""Signed manifests: a checkpoint is trusted only if its manifest carries our MAC.

Write access to a store must not give root on restore, so every manifest is signed
with HMAC-SHA256 under a key that cedana-ray keeps private: one per state dir in local
mode (``signing.key``), one per cluster (the coordinator's, handed to its agents).
The MAC covers every field of the manifest (chunk digests included, so the image
bytes too) in a canonical JSON form. A manifest holds one signature per key that
vouches for it: ``checkpoint import`` adds this cluster's to a checkpoint made
elsewhere, after checking every chunk, without invalidating the others.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import secrets
from pathlib import Path

from .crypto import read_private, write_private
from .errors import PermissionDenied, UntrustedCheckpoint
from .models import Manifest

KEY_BYTES = 32
KEY_FILE = "signing.key"


def _canonical(manifest: Manifest) -> bytes:
    """The signed form: every field but the signatures, sorted, without whitespace."""
    body = manifest.model_dump(mode="json", exclude={"signatures"})
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


class Signer:
    """Signs and verifies manifests with one key."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a signing key has {KEY_BYTES} bytes")
        self._key = key
        self.key_id = hashlib.sha256(b"cedana-ray signing key\0" + key).hexdigest()[:16]

    def __repr__(self) -> str:  # never the key
        return f"Signer({self.key_id})"

    def __reduce__(self) -> tuple[object, ...]:
        return (Signer, (self._key,))

    @classmethod
    def load(cls, path: Path) -> Signer:
        """The key in ``path``, created (0600, random) when there is none."""
        with contextlib.suppress(FileExistsError):
            write_private(path, secrets.token_bytes(KEY_BYTES))
        key = read_private(path)
        if len(key) != KEY_BYTES:
            raise PermissionDenied(f"refusing signing key {path}: it must hold {KEY_BYTES} bytes")
        return cls(key)

    def mac(self, manifest: Manifest) -> str:
        return hmac.new(self._key, _canonical(manifest), hashlib.sha256).hexdigest()

    def sign(self, manifest: Manifest) -> Manifest:
        """``manifest`` with this key's signature added (others it holds are kept)."""
        return manifest.model_copy(update={"signatures": {**manifest.signatures, self.key_id: self.mac(manifest)}})

    def verify(self, manifest: Manifest) -> Manifest:
        """``manifest``, once its signature under this key checks out."""
        found = manifest.signatures.get(self.key_id)
        if found is None:
            raise UntrustedCheckpoint(
                f"checkpoint {manifest.checkpoint} is not signed by this cluster's key",
                hint="a checkpoint made elsewhere needs `cedana-ray checkpoint import URL` first",
            )
        if not hmac.compare_digest(found, self.mac(manifest)):
            raise UntrustedCheckpoint(f"checkpoint {manifest.checkpoint}: its manifest was altered (bad signature)")
        return manifest
