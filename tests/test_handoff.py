"""The handoff wire (cedana_ray.handoff): image files from a sender to a receiver over real
TCP, whole or not at all, and only from the holder of the one-time key."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from cedana_ray.chunking import DEFAULT_CHUNK
from cedana_ray.handoff import HEADER, TAG_BYTES, HandoffError, Receiver, Sender, _derived, _nonce, new_key

HOST = "127.0.0.1"


def images(tmp_path: Path) -> Path:
    """A dir as CRIU leaves it: a large file (several chunks and a tail), small ones, an empty one."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "pages-1.img").write_bytes(os.urandom(2 * DEFAULT_CHUNK + 12345))
    (src / "core-1.img").write_bytes(b"core" * 100)
    (src / "empty.img").write_bytes(b"")
    return src


def receiver(tmp_path: Path, key: bytes) -> Receiver:
    dest = tmp_path / "dest"
    dest.mkdir()
    return Receiver(dest, key, HOST)


def send(src: Path, address: tuple[str, int], key: bytes) -> int:
    with Sender.connect(src, address, key) as sender:
        pass
    return sender.finish()


def test_images_arrive_whole(tmp_path: Path) -> None:
    src, key = images(tmp_path), new_key()
    got = receiver(tmp_path, key)
    sent = send(src, got.address, key)
    dest = got.wait(10)
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in src.iterdir())
    for path in src.iterdir():
        assert (dest / path.name).read_bytes() == path.read_bytes(), path.name
        assert (dest / path.name).stat().st_mode & 0o777 == 0o600
    assert sent == sum(p.stat().st_size for p in src.iterdir())


def test_files_growing_while_sent_arrive_whole(tmp_path: Path) -> None:
    """As while CRIU writes: the sender sends full chunks as they appear, the rest at the end."""
    src, key = tmp_path / "src", new_key()
    src.mkdir()
    got = receiver(tmp_path, key)
    data = os.urandom(5 * DEFAULT_CHUNK + 7)
    with Sender.connect(src, got.address, key) as sender, open(src / "pages-1.img", "wb") as f:
        for i in range(0, len(data), DEFAULT_CHUNK // 3):
            f.write(data[i : i + DEFAULT_CHUNK // 3])
            f.flush()
    sender.finish()
    assert (got.wait(10) / "pages-1.img").read_bytes() == data


def test_a_wrong_key_is_not_heard_and_the_right_one_still_is(tmp_path: Path) -> None:
    src, key = images(tmp_path), new_key()
    got = receiver(tmp_path, key)
    with pytest.raises((HandoffError, OSError)):
        send(src, got.address, new_key())
    assert not any((tmp_path / "dest").iterdir()), "nothing written for an unproven peer"
    send(src, got.address, key)
    assert (got.wait(10) / "core-1.img").read_bytes() == b"core" * 100


def _proven(address: tuple[str, int], key: bytes) -> tuple[socket.socket, bytes]:
    """A raw connection that passed the handshake, and its session key."""
    conn = socket.create_connection(address)
    challenge = conn.recv(32, socket.MSG_WAITALL)
    conn.sendall(_derived(key, b"hello", challenge))
    return conn, _derived(key, b"session", challenge)


def _raw_frame(session: bytes, seq: int, name: bytes, offset: int, data: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    header = HEADER.pack(seq, len(name), offset, len(data) + TAG_BYTES)
    return header + name + AESGCM(session).encrypt(_nonce(seq), data, header + name)


@pytest.mark.parametrize(
    ("frames", "error"),
    [
        (lambda s: [_raw_frame(s, 0, b"a.img", 0, b"x")[:-1] + b"\0"], "does not authenticate"),
        (lambda s: [_raw_frame(s, 1, b"a.img", 0, b"x")], "out of order"),
        (lambda s: [_raw_frame(s, 0, b"../escape", 0, b"x")], "refusing image file name"),
        (lambda s: [_raw_frame(s, 0, b"a.img", 0, b"x"), _raw_frame(s, 1, b"", 0, b'{"a.img": 2}')], "1 bytes, not 2"),
        (lambda s: [_raw_frame(s, 0, b"a.img", 0, b"x"), _raw_frame(s, 1, b"", 0, b"{}")], "not in the file list"),
        (lambda s: [_raw_frame(s, 0, b"a.img", 0, b"x")], "closed the connection"),
    ],
    ids=["tampered", "replayed-or-reordered", "path-escape", "short-file", "unlisted-file", "cut-short"],
)
def test_what_does_not_arrive_whole_is_refused(tmp_path: Path, frames: object, error: str) -> None:
    key = new_key()
    got = receiver(tmp_path, key)
    conn, session = _proven(got.address, key)
    with conn:
        for frame in frames(session):  # type: ignore[operator]
            conn.sendall(frame)
    with pytest.raises(HandoffError, match=error):
        got.wait(10)
    assert not (tmp_path / "escape").exists()


def test_a_called_off_handoff_stops_listening(tmp_path: Path) -> None:
    key = new_key()
    got = receiver(tmp_path, key)
    closer = threading.Timer(0.2, got.close)
    closer.start()
    with pytest.raises(HandoffError, match="handoff failed"):
        got.wait(5)
    with pytest.raises(OSError):
        socket.create_connection(got.address, timeout=1).recv(1)
