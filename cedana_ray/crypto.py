"""Encryption at rest: AES-256-GCM per stored chunk.

Each chunk is stored as ``nonce (12 bytes) || ciphertext || tag`` with a fresh
random nonce. The associated data binds the chunk to its checkpoint, image file
and index, so chunks cannot be swapped or replayed between places unnoticed. The
manifest records the algorithm and a fingerprint of the key, never the key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import CorruptCheckpoint, PermissionDenied, StorageError, UntrustedCheckpoint, UsageError
from .models import Manifest

ALGORITHM = "aes-256-gcm"
KEY_ENV = "CEDANA_RAY_KEY"
KEY_FILE = "encryption.key"  # a job's key in its job dir, a cluster's in its state dir
KEY_BYTES = 32
NONCE_BYTES = 12


def parse_key(raw: bytes, source: str) -> bytes:
    """A 32-byte key from 32 raw bytes, 64 hex digits or base64 (``source`` names it in errors)."""
    text = raw.strip()
    if len(raw) == KEY_BYTES:
        return raw
    if len(text) == 2 * KEY_BYTES:
        try:
            return binascii.unhexlify(text)
        except binascii.Error:
            pass
    try:
        decoded = base64.b64decode(text, validate=True)
    except binascii.Error:
        decoded = b""
    if len(decoded) == KEY_BYTES:
        return decoded
    raise UsageError(
        f"the key in {source} is not a 256-bit key",
        hint="give 32 raw bytes, 64 hex digits or 32 bytes in base64 (e.g. `openssl rand -hex 32`)",
    )


def load_key(key_file: str | None) -> bytes | None:
    """The key from ``key_file``, else from ``CEDANA_RAY_KEY``, else None."""
    if key_file:
        try:
            return parse_key(Path(key_file).read_bytes(), f"key file {key_file}")
        except OSError as exc:
            raise UsageError(f"cannot read key file {key_file}: {exc.strerror}") from exc
    if value := os.environ.get(KEY_ENV):
        return parse_key(value.encode(), KEY_ENV)
    return None


def write_private(path: Path, data: bytes) -> None:
    """A new file ``path`` (never one that exists, nor through a link) holding ``data``,
    readable by us alone and on disk before we return: for keys and tokens."""
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_private(path: Path) -> bytes:
    """The bytes of ``path``, refused unless it is a regular file of ours (not a link) that
    only we can read: a key others could read or replace is no key. FileNotFoundError if absent."""
    refusal = f"refusing key file {path}: it must be a regular file owned by uid {os.geteuid()}, mode 0600"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise
    except OSError as exc:  # a symlink (ELOOP), or unreadable
        raise PermissionDenied(f"{refusal} ({exc.strerror})") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
            raise PermissionDenied(refusal, hint=f"chmod 600 {path}")
        return os.read(fd, 1 << 16)
    finally:
        os.close(fd)


def save_key(path: Path, key: bytes) -> None:
    """Keep ``key`` in ``path``, readable by us alone (a new file: a key is never replaced)."""
    write_private(path, key)


def saved_key(path: Path) -> bytes | None:
    """The key :func:`save_key` kept in ``path``, if there is one."""
    try:
        return parse_key(read_private(path), str(path))
    except FileNotFoundError:
        return None


def fingerprint(key: bytes) -> str:
    """A short, one-way name of ``key`` that tells keys apart without revealing them."""
    return hashlib.sha256(b"cedana-ray key fingerprint\0" + key).hexdigest()[:16]


class ChunkCipher:
    """Encrypts and decrypts the chunks of one checkpoint."""

    def __init__(self, key: bytes, checkpoint: str) -> None:
        self._aead = AESGCM(key)
        self.checkpoint = checkpoint

    def _aad(self, image: str, index: int) -> bytes:
        return f"{self.checkpoint}/{image}/{index}".encode()

    def encrypt(self, data: bytes, image: str, index: int) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, data, self._aad(image, index))

    def decrypt(self, data: bytes, image: str, index: int) -> bytes:
        try:
            return self._aead.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], self._aad(image, index))
        except InvalidTag as exc:
            raise CorruptCheckpoint(
                f"checkpoint {self.checkpoint}: chunk {index} of {image} does not decrypt with the given key"
            ) from exc


def cipher_for(manifest: Manifest, key: bytes | None) -> ChunkCipher | None:
    """The cipher of an encrypted checkpoint, once ``key`` is known to be its key.

    With a key, a checkpoint in the clear is refused: where encryption is configured, an
    unencrypted image is not what we wrote.
    """
    ckpt = manifest.checkpoint
    if not manifest.encryption:
        if key is not None:
            raise UntrustedCheckpoint(
                f"checkpoint {ckpt} is not encrypted, but a key is configured: refusing it",
                hint="unset CEDANA_RAY_KEY (or drop --key-file) to restore a checkpoint made in the clear",
            )
        return None
    if manifest.encryption != ALGORITHM:
        raise StorageError(f"checkpoint {ckpt} is encrypted with {manifest.encryption}, which is not supported")
    if key is None:
        raise UsageError(f"checkpoint {ckpt} is encrypted", hint="give its key with --key-file FILE or CEDANA_RAY_KEY")
    if fingerprint(key) != manifest.key_fingerprint:
        raise UsageError(
            f"wrong key for checkpoint {ckpt}: it was encrypted with key {manifest.key_fingerprint}, "
            f"the given key is {fingerprint(key)}"
        )
    return ChunkCipher(key, ckpt)
