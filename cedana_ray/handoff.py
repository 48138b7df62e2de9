"""Handoff: a dumped job's images sent straight from its node to the node that restores it.

A migration need not pass through the store while the job is down: the target listens on a
fresh TCP port (:class:`Receiver`), the source connects and sends each image file's chunks as
CRIU writes them (:class:`Sender`), and the target restores from what arrived.

Nobody else may feed a restore running as root, nor read a job's memory on the wire: the
sender first proves it holds the migration's one-time key (handed to both sides by the
coordinator, never on a command line) by answering the receiver's fresh challenge; every
frame is then encrypted with AES-256-GCM under a key derived from both, its sequence number
the nonce, its header authenticated with it. So images arrive whole, from that sender, in
order, unread by others, or the restore does not happen.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import re
import secrets
import socket
import struct
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Self

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .backend import Progress
from .chunking import DEFAULT_CHUNK, WhileCriuWrites
from .errors import CedanaError

KEY_BYTES = 32
PROOF_BYTES = 32
TAG_BYTES = 16  # AES-GCM's
HEADER = struct.Struct("!QHQI")  # sequence number, name length, offset, length of the sealed data
MAX_SEALED = DEFAULT_CHUNK + TAG_BYTES  # a frame's sealed bytes at most; a larger claim is refused unread
MAX_FILES = 100_000
ACCEPT_TIMEOUT_S = 60.0  # for the source to connect: it does so right after the job freezes
HELLO_TIMEOUT_S = 5.0  # for a connection to prove itself: a silent one does not hold the port
RECV_TIMEOUT_S = 300.0  # between frames: CRIU may take a while over a large non-memory image
ACK = b"cedana-ray handoff received"
WRITES_IN_FLIGHT = 4  # frames received but not yet written: memory held, at most this many chunks
SOCKET_BUFFER = 4 << 20
_NAME = re.compile(r"^[A-Za-z0-9._+-]{1,255}$")


class HandoffError(CedanaError):
    """The images did not arrive whole: the restore does not happen, the source resumes."""


def new_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def _derived(key: bytes, purpose: bytes, challenge: bytes) -> bytes:
    return hmac.digest(key, b"cedana-ray handoff " + purpose + b"\0" + challenge, "sha256")


def _nonce(seq: int) -> bytes:
    return seq.to_bytes(12, "big")  # unique: one key per connection, one sequence number per frame


def _recv_exactly(conn: socket.socket, view: memoryview) -> None:
    while view:
        n = conn.recv_into(view)
        if not n:
            raise HandoffError("the source closed the connection before all images arrived")
        view = view[n:]


class Receiver:
    """Listens on ``host`` for the one sender that holds ``key`` and writes what it sends
    into ``dest``; :meth:`wait` returns once every file arrived whole."""

    def __init__(self, dest: Path, key: bytes, host: str) -> None:
        self.dest = dest
        self._key = key
        self._server = socket.create_server((host, 0))
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        self._server.settimeout(ACCEPT_TIMEOUT_S)
        self.address = (host, self._server.getsockname()[1])
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._conn: socket.socket | None = None
        threading.Thread(target=self._serve, name="handoff-receiver", daemon=True).start()

    def wait(self, timeout: float | None = None) -> Path:
        if not self._done.wait(timeout):
            raise HandoffError(f"the images did not arrive within {timeout:.0f} s")
        if self._error is not None:
            raise HandoffError(f"handoff failed: {self._error}") from self._error
        return self.dest

    def close(self) -> None:
        """Stop listening and drop a connection in progress (a migration called off)."""
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)  # wakes the accept() under way; close() would not
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.shutdown(socket.SHUT_RDWR)

    def _serve(self) -> None:
        try:
            while True:  # until one connection proves itself
                conn, _ = self._server.accept()
                with conn:
                    cipher = self._hello(conn)
                    if cipher is None:
                        continue
                    self._conn = conn
                    conn.settimeout(RECV_TIMEOUT_S)
                    self._receive(conn, cipher)
                    conn.sendall(ACK)
                    return
        except BaseException as exc:  # reported by wait()
            self._error = exc
        finally:
            self._server.close()
            self._done.set()

    def _hello(self, conn: socket.socket) -> AESGCM | None:
        """The session's cipher, once the peer answered a fresh challenge with ``key``; else None."""
        challenge = secrets.token_bytes(32)
        try:
            conn.settimeout(HELLO_TIMEOUT_S)
            conn.sendall(challenge)
            answer = bytearray(PROOF_BYTES)
            _recv_exactly(conn, memoryview(answer))
        except (OSError, HandoffError):
            return None
        if not hmac.compare_digest(bytes(answer), _derived(self._key, b"hello", challenge)):
            return None
        return AESGCM(_derived(self._key, b"session", challenge))

    def _receive(self, conn: socket.socket, cipher: AESGCM) -> None:
        """Frames until the file list, each written by a thread while the next one arrives."""
        header = bytearray(HEADER.size)
        files: dict[str, int] = {}
        writes: deque[Future[int]] = deque()
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="handoff-writer") as writer:
                for expected in range(1 << 62):
                    _recv_exactly(conn, memoryview(header))
                    seq, name_len, offset, sealed = HEADER.unpack(header)
                    if seq != expected or name_len > 255 or not TAG_BYTES <= sealed <= MAX_SEALED:
                        raise HandoffError(f"frame {expected}: out of order or oversized")
                    body = bytearray(name_len + sealed)
                    _recv_exactly(conn, memoryview(body))
                    name = bytes(body[:name_len])
                    try:
                        data = cipher.decrypt(_nonce(seq), memoryview(body)[name_len:], bytes(header) + name)
                    except InvalidTag:
                        raise HandoffError(f"frame {seq} does not authenticate") from None
                    if not name:
                        for write in writes:
                            write.result()
                        self._check_complete(files, data)
                        return
                    fd = files.get(file := _file_name(name))
                    if fd is None:
                        if len(files) >= MAX_FILES:
                            raise HandoffError("too many image files")
                        fd = files[file] = self._create(file)
                    writes.append(writer.submit(os.pwrite, fd, data, offset))
                    if len(writes) > WRITES_IN_FLIGHT:
                        writes.popleft().result()
        finally:
            for fd in files.values():
                os.close(fd)

    def _create(self, name: str) -> int:
        return os.open(self.dest / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)

    def _check_complete(self, files: dict[str, int], listing: bytes) -> None:
        """The last frame lists every file with its size: all of them, nothing else, each whole."""
        sizes = json.loads(listing)
        if not isinstance(sizes, dict) or len(sizes) > MAX_FILES:
            raise HandoffError("the file list is not one")
        for name, size in sizes.items():
            if name not in files:  # an empty file: no frame carried it
                files[name] = os.open(
                    self.dest / _file_name(name.encode()), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600
                )
            if (arrived := os.fstat(files[name]).st_size) != size:
                raise HandoffError(f"image {name} arrived with {arrived} bytes, not {size}")
        if set(files) != set(sizes):
            raise HandoffError("an image file was sent but is not in the file list")


def _file_name(raw: bytes) -> str:
    name = raw.decode("ascii", errors="replace")
    if not _NAME.match(name) or name in (".", ".."):
        raise HandoffError(f"refusing image file name {name!r}")
    return name


class Sender(WhileCriuWrites):
    """Sends the image files in ``images`` to a :class:`Receiver` at ``address``: each file's
    full chunks as CRIU writes them, the rest once it is done (:meth:`finish`)."""

    def __init__(self, images: Path, address: tuple[str, int], key: bytes, progress: Progress | None = None) -> None:
        super().__init__(images, streams=1)
        self._progress = progress
        self._sent: dict[str, int] = {}
        self._seq = 0
        self._bytes = 0
        self._conn = socket.create_connection(address, timeout=HELLO_TIMEOUT_S)
        self._conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        try:
            challenge = bytearray(32)
            _recv_exactly(self._conn, memoryview(challenge))
            self._conn.sendall(_derived(key, b"hello", bytes(challenge)))
            self._cipher = AESGCM(_derived(key, b"session", bytes(challenge)))
            self._conn.settimeout(RECV_TIMEOUT_S)
        except BaseException:
            self._conn.close()
            raise

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        if exc[0] is not None:
            self._conn.close()

    def finish(self) -> int:
        """Send what is left and the file list, and wait for the receiver's word that all
        arrived; the bytes sent."""
        try:
            sizes = {}
            for path in sorted(self.images.iterdir()):
                sizes[path.name] = self._send_file(path, final=True)
            self._frame(b"", 0, json.dumps(sizes).encode())
            ack = bytearray(len(ACK))
            _recv_exactly(self._conn, memoryview(ack))
            if ack != ACK:
                raise HandoffError("the target did not confirm the images")
            return self._bytes
        except OSError as exc:
            raise HandoffError(f"sending the images failed: {exc}") from exc
        finally:
            self._conn.close()

    def _catch_up(self, pool: ThreadPoolExecutor, path: Path) -> None:
        self._send_file(path, final=False)

    def _send_file(self, path: Path, final: bool) -> int:
        """Send ``path`` from where its last frame ended: all of it when ``final``, else its
        full chunks (CRIU writes files in order: what lies below a full chunk is final)."""
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            end = size if final else size - size % DEFAULT_CHUNK
            offset = self._sent.get(path.name, 0)
            while offset < end:
                data = os.pread(fd, min(DEFAULT_CHUNK, end - offset), offset)
                self._frame(path.name.encode(), offset, data)
                offset += len(data)
            self._sent[path.name] = offset
            return size
        finally:
            os.close(fd)

    def _frame(self, name: bytes, offset: int, data: bytes) -> None:
        header = HEADER.pack(self._seq, len(name), offset, len(data) + TAG_BYTES)
        sealed = self._cipher.encrypt(_nonce(self._seq), data, header + name)
        self._conn.sendall(header + name)
        self._conn.sendall(sealed)
        self._seq += 1
        if name:  # not the file list
            self._bytes += len(data)
            if self._progress:
                self._progress("send", self._bytes, 0)

    @classmethod
    def connect(cls, images: Path, address: tuple[str, int], key: bytes, progress: Progress | None = None) -> Self:
        try:
            return cls(images, address, key, progress)
        except OSError as exc:
            raise HandoffError(f"cannot reach the target node at {address[0]}:{address[1]}: {exc}") from exc
