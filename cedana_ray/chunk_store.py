"""Content-addressed chunks (``Layout.cas``): stored once per store, shared by checkpoints.

Layout under a store URL::

    URL/.chunks/blake3/<digest>                one object per distinct chunk, never rewritten,
                                               named by the BLAKE3 of the stored bytes
    URL/.chunks/<digest>                       the same, sha256, of checkpoints made before BLAKE3
    URL/.pending/<ID>                          a dump of ID under way (see chunk_gc)
    URL/ID/manifest.json                       lists every chunk of ID, reused or new

Images are cut at content-defined page boundaries (:mod:`cedana_ray.cdc`). Each chunk has an
*address*, the hash of its original bytes (with a key: a keyed hash of them under a key derived
from it, so equal plaintext dedups without the store learning plaintext hashes). A dump first
reads the manifest of its parent (the job's last checkpoint) where it is in the same store,
made with the same compression, key and digest: a chunk whose address it lists is referenced, not
compressed nor uploaded again. A new chunk is compressed, encrypted (AES-256-GCM, with a nonce
derived from the bytes it encrypts, so equal chunks encrypt equally and still never share a
nonce with other bytes) and stored under the hash of what is stored: the name is the
content, so a write can only ever put the same bytes there again, and a reader checks what it
got against the name the signed manifest gives.

The hash is the manifest's ``digest``: BLAKE3 for new checkpoints (plain, or keyed with the
derived key for addresses and nonces), sha256 (and HMAC-SHA256) for those made before, which
stay readable. BLAKE3 chunks lie in a folder of their own, ``.chunks/blake3``: sweeps of
versions that predate it free only the top-level objects that no manifest they can parse
lists, and cannot parse a BLAKE3 manifest. A dump reuses only the chunks of a parent with its
own digest, so the first BLAKE3 dump after a sha256 one stores all of its chunks again.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import failpoint
from .cdc import MAX_SIZE, Cutter
from .chunking import WhileCriuWrites, bounded_map, hash_chunk
from .codec import codec
from .crypto import NONCE_BYTES, fingerprint
from .errors import CheckpointError, CheckpointNotFound, CorruptCheckpoint, UsageError
from .models import Chunk, Compression, Digest, ImageFile, Layout, Manifest
from .retry import retrying
from .staging import give_back

if TYPE_CHECKING:
    from .store import CheckpointStore

CHUNKS = ".chunks"  # checkpoint ids never start with '.': no checkpoint can be named so
CAS_CHUNK = MAX_SIZE  # what a cas manifest's chunk_size says: the largest chunk it may hold
ANCESTORS = 4  # of a dump's parents, how far back one whose chunks it may reuse is looked for
DEDUP_ENV = "CEDANA_RAY_DEDUP"  # "0" or "off": new checkpoints use the per-checkpoint layouts


def dedup_enabled() -> bool:
    return os.environ.get(DEDUP_ENV, "1").lower() not in ("0", "off", "no", "false")


def chunk_name(digest: str, algorithm: Digest) -> str:
    """Where under ``.chunks`` the chunk stored as ``digest`` lies (see the module docstring)."""
    return digest if algorithm is Digest.sha256 else f"{algorithm.value}/{digest}"


class ContentCipher:
    """Keyed addresses and deterministic AES-256-GCM for the chunks of one key."""

    def __init__(self, key: bytes, algorithm: Digest = Digest.blake3) -> None:
        self._aead = AESGCM(key)
        # separate keys, derived one-way: an address reveals nothing usable about the others
        address_key = hmac.digest(key, b"cedana-ray chunk address", "sha256")
        nonce_key = hmac.digest(key, b"cedana-ray chunk nonce", "sha256")
        if algorithm is Digest.sha256:  # as checkpoints made before BLAKE3 were
            self._address = lambda raw: hmac.digest(address_key, raw, "sha256")
            self._nonce = lambda data: hmac.digest(nonce_key, data, "sha256")
        else:  # keyed BLAKE3 is a PRF as HMAC-SHA256 is, at several times its speed
            self._address = lambda raw: blake3.blake3(raw, key=address_key).digest()
            self._nonce = lambda data: blake3.blake3(data, key=nonce_key).digest()

    def address(self, raw: bytes) -> str:
        return self._address(raw).hex()

    def encrypt(self, data: bytes, address: str) -> bytes:
        # The nonce is a MAC of the exact bytes encrypted: equal chunks give equal objects
        # (dedup), and two different messages never share a nonce (GCM's one requirement).
        nonce = self._nonce(data)[:NONCE_BYTES]
        return nonce + self._aead.encrypt(nonce, data, address.encode())

    def decrypt(self, data: bytes, address: str, where: str) -> bytes:
        try:
            return self._aead.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], address.encode())
        except InvalidTag as exc:
            raise CorruptCheckpoint(f"{where} does not decrypt with the given key") from exc


class ContentWriter:
    """Stores the chunks of one dump: referenced when the store has them, else written."""

    def __init__(
        self, store: CheckpointStore, ckpt: str, compression: Compression, key: bytes | None, parent: str | None
    ) -> None:
        self.store, self.ckpt, self.compression, self.algorithm = store, ckpt, compression, store.digest
        self.cipher = ContentCipher(key, self.algorithm) if key else None
        self._compress, _ = codec(compression)
        self.written = 0  # chunks this dump stored (the rest were in the store already)
        self.written_bytes = 0
        with store._errors(f"storing checkpoint {ckpt} in"):
            try:
                store.begin_dump(ckpt)  # before reading what to reuse: a sweep now leaves it alone
            except FileNotFoundError as exc:  # S3 says so of a missing bucket
                store._require_bucket(exc)
                raise
            store.wait_for_sweeps()
            self.index = store.chunk_index(parent, compression, fingerprint(key) if key else None, self.algorithm)
        self._lock = threading.Lock()

    def address(self, raw: bytes) -> str:
        return self.cipher.address(raw) if self.cipher else hash_chunk(raw, self.algorithm)

    def put(self, path: Path, off: int, size: int) -> Chunk:
        """The chunk of ``path`` at ``off``: its known twin, or encoded and stored now."""
        fd = os.open(path, os.O_RDONLY)
        try:
            raw = os.pread(fd, size, off)
        finally:
            os.close(fd)
        address = self.address(raw)
        if (known := self.index.get(address)) is not None:
            return known.model_copy(update={"offset": off, "size": size})
        data = self._compress(raw)
        if self.cipher:
            data = self.cipher.encrypt(data, address)
        # stored as read (no codec, no key): its address is the hash of the stored bytes
        digest = address if data is raw else hash_chunk(data, self.algorithm)
        self.store.put_chunk(digest, data, self.algorithm)
        chunk = Chunk.hashed(
            self.algorithm, digest, offset=off, size=size, stored_offset=0, stored_size=len(data), address=address
        )
        with self._lock:
            self.index[address] = chunk  # a chunk that repeats in this dump is stored once too
            self.written += 1
            self.written_bytes += len(data)
        return chunk


class ContentChunks(WhileCriuWrites):
    """Cuts image files into content-defined chunks and stores them while CRIU writes them;
    :meth:`finish` stores the rest of a file once it is complete. With ``release``, the
    staged bytes of each chunk stored are given back at once (nothing else reads them: a
    VM's state), so the staging area holds what is not yet stored, not a full copy."""

    def __init__(self, images: Path, writer: ContentWriter, streams: int, release: bool = False) -> None:
        super().__init__(images, streams)
        self.writer = writer
        self.release = release
        self.cutters: dict[str, Cutter] = {}
        self.released: dict[str, int] = {}  # by file: the offset below which its staged bytes are gone
        self.error: Exception | None = None  # what failed once a file could not be started over

    def _failed(self, path: Path, exc: Exception) -> bool:
        """finish() starts this file over and meets the error again; or, where part of the
        file was given back and cannot be read again, reports it."""
        if path.name in self.released:
            self.error = exc
        else:
            self.cutters.pop(path.name, None)
            self.chunks.pop(path.name, None)
        return True

    def _catch_up(self, pool: ThreadPoolExecutor, path: Path, final: bool = False) -> None:
        cutter = self.cutters.setdefault(path.name, Cutter())
        done = self.chunks.setdefault(path.name, [])
        fd = os.open(path, os.O_RDONLY)
        try:
            spans = cutter.cuts(fd, os.fstat(fd).st_size, final)
        finally:
            os.close(fd)
        done.extend(bounded_map(pool, lambda span: self.writer.put(path, *span), spans, self.streams * 2))
        if self.release and not final:
            self._give_back(path, cutter.start)  # every byte below it is in a chunk stored now or before

    def _give_back(self, path: Path, stored: int) -> None:
        """Free the staged bytes of ``path`` below ``stored`` not freed yet."""
        start = self.released.get(path.name, 0)
        if stored > start and give_back(path, start, stored):
            self.released[path.name] = stored

    def finish(self, pool: ThreadPoolExecutor, path: Path) -> ImageFile:
        """Every chunk of the complete file ``path``, stored."""
        if self.error:
            raise self.error
        self._catch_up(pool, path, final=True)
        return ImageFile(name=path.name, size=path.stat().st_size, chunks=tuple(self.chunks[path.name]))


class ContentStore:
    """The chunk objects of a store (mixed into CheckpointStore: uses its fs, root, paths)."""

    def chunk_path(self: CheckpointStore, digest: str, algorithm: Digest) -> str:
        return f"{self.root}/{CHUNKS}/{chunk_name(digest, algorithm)}"

    def content_addressed(self: CheckpointStore, compression: Compression, encrypted: bool) -> bool:
        """Whether a new checkpoint goes to the cas layout. Not a local uncompressed one in
        the clear: CRIU writes those straight into the store and a restore reads them where
        they lie, which a copy into chunk files would only slow down."""
        in_place = self.local and compression is Compression.none and not encrypted
        return dedup_enabled() and not in_place

    def put_chunk(self: CheckpointStore, digest: str, data: bytes, algorithm: Digest) -> None:
        """Store ``data`` as chunk ``digest`` (its hash under ``algorithm``): whole or not at
        all, even across a crash."""
        target = self.chunk_path(digest, algorithm)
        if not self.local:  # a PUT is atomic; the server checks a checksum where it can
            checksum = getattr(self.fs, "put_checksum", lambda data, sha256=None: {})
            sha256 = digest if algorithm is Digest.sha256 else None
            retrying(lambda: self.fs.pipe_file(target, data, **checksum(data, sha256)))
            return
        folder = Path(target).parent
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = folder / f".tmp-{digest}-{secrets.token_hex(4)}"  # swept if a crash leaves it
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)  # the same bytes as any chunk already there: it is their name

    def chunk_index(
        self: CheckpointStore,
        parent: str | None,
        compression: Compression,
        key_fingerprint: str | None,
        algorithm: Digest = Digest.blake3,
    ) -> dict[str, Chunk]:
        """The chunks a dump with ``compression``, a key of ``key_fingerprint`` and chunk
        digests by ``algorithm`` may reuse, by address: those of its ``parent`` (the job's
        last checkpoint), or of the nearest of that one's own parents, that is a trusted cas
        checkpoint of this store made alike. It lists every chunk of the job's state then,
        reused or new, so a dump reads a few manifests whatever the store holds."""
        for _ in range(ANCESTORS):
            if parent is None:
                break
            try:
                manifest = self.manifest(parent)
            except (CheckpointNotFound, CheckpointError, UsageError):  # elsewhere, deleted, or not ours
                break
            if (manifest.layout, manifest.compression, manifest.key_fingerprint, manifest.digest) == (
                Layout.cas,
                compression,
                key_fingerprint,
                algorithm,
            ):
                return {c.address: c for f in manifest.files for c in f.chunks if c.address}
            parent = manifest.parent
        return {}

    def manifests_here(self: CheckpointStore, trusted: bool = True) -> list[Manifest]:
        """The manifests in this store, read in parallel: those that verify (``trusted``), or
        every one that parses (a sweep must not free what an untrusted checkpoint uses)."""
        with self._errors("listing"):
            try:
                entries = retrying(lambda: self.fs.ls(self.root, detail=False, refresh=True))
            except FileNotFoundError as exc:
                self._require_bucket(exc)
                return []
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
        with ThreadPoolExecutor(8) as pool:
            found = pool.map(lambda name: self._manifest_or_none(name, trusted), names)
            return [m for m in found if m is not None]

    def _manifest_or_none(self: CheckpointStore, name: str, trusted: bool) -> Manifest | None:
        if name.startswith("."):
            return None  # our own folders (.chunks, .pending, .sweeps)
        try:
            return self.manifest(name, verify=trusted)
        except (CheckpointNotFound, CheckpointError, UsageError):
            return None

    def store_content(
        self: CheckpointStore,
        images: Path,
        chunks: ContentChunks,
        progress: Callable[[str, int, int], None] | None,
    ) -> list[ImageFile]:
        """The image files of a cas dump, their chunks stored (most of them, often, already)."""
        names = sorted(p.name for p in images.iterdir() if p.is_file())
        total, done, files = sum((images / n).stat().st_size for n in names), 0, []
        with ThreadPoolExecutor(chunks.streams) as pool:
            for name in names:
                files.append(chunks.finish(pool, images / name))
                failpoint.reached("dump:store")
                done += files[-1].size
                if progress:
                    progress("store", done, total)
        if self.local:
            from .store_write import fsync_dir  # here: store_write imports this module

            # the new chunks' folder, and the one that lists it (made by this dump, maybe)
            for folder in dict.fromkeys((self.chunk_path("", self.digest).rstrip("/"), f"{self.root}/{CHUNKS}")):
                with contextlib.suppress(FileNotFoundError):  # no chunk was new: none was written
                    fsync_dir(folder)
        return files
