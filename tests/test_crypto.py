"""Encryption keys and chunk ciphers, and the CLI's answers to bad keys."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from click.testing import CliRunner

from cedana_ray.cli.main import cli
from cedana_ray.crypto import ChunkCipher, fingerprint, load_key, parse_key
from cedana_ray.errors import CorruptCheckpoint, UsageError
from cedana_ray.requests import DumpRequest

KEY = bytes(range(32))


@pytest.mark.parametrize("raw", [KEY, KEY.hex().encode(), KEY.hex().encode() + b"\n", base64.b64encode(KEY)])
def test_key_forms(raw: bytes) -> None:
    assert parse_key(raw, "test") == KEY


@pytest.mark.parametrize("raw", [b"", b"short", KEY[:31], b"z" * 64])
def test_bad_keys_are_refused(raw: bytes) -> None:
    with pytest.raises(UsageError, match="not a 256-bit key"):
        parse_key(raw, "test")


def test_key_from_env_and_missing_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CEDANA_RAY_KEY", KEY.hex())
    assert load_key(None) == KEY
    with pytest.raises(UsageError, match="cannot read key file"):
        load_key(str(tmp_path / "nope"))


def test_chunks_are_bound_to_their_place() -> None:
    cipher = ChunkCipher(KEY, "ckpt-1")
    sealed = cipher.encrypt(b"pages", "pages-1.img", 3)
    assert cipher.decrypt(sealed, "pages-1.img", 3) == b"pages"
    assert cipher.encrypt(b"pages", "pages-1.img", 3) != sealed, "a fresh nonce per chunk"
    for image, index, other in (("pages-1.img", 4, cipher), ("core-1.img", 3, cipher)):
        with pytest.raises(CorruptCheckpoint, match="does not decrypt"):
            other.decrypt(sealed, image, index)
    with pytest.raises(CorruptCheckpoint, match=r"chunk 3 of pages-1\.img"):
        ChunkCipher(KEY, "ckpt-2").decrypt(sealed, "pages-1.img", 3)


def test_fingerprint_names_a_key_without_revealing_it() -> None:
    assert fingerprint(KEY) == fingerprint(KEY) != fingerprint(bytes(32))
    assert KEY.hex()[:16] not in fingerprint(KEY)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--encrypt"], "--encrypt needs a key"),
        (["--key-file", "k"], "--key-file is for encrypted dumps"),
        (["--encrypt", "--key-file", "/nonexistent/key"], "cannot read key file"),
    ],
)
def test_dump_key_errors(home: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str) -> None:
    monkeypatch.delenv("CEDANA_RAY_KEY", raising=False)
    result = CliRunner().invoke(cli, ["dump", "job", "j1", *args], standalone_mode=False)
    assert isinstance(result.exception, UsageError) and message in str(result.exception)


def test_requests_check_and_hide_the_key() -> None:
    with pytest.raises(UsageError, match="32 bytes"):
        DumpRequest(encrypt=True, key=b"short")
    request = DumpRequest(encrypt=True, key=KEY)
    assert request.encryption_key() == KEY
    assert repr(KEY)[2:-1] not in repr(request) and KEY.hex() not in request.model_dump_json()
    assert DumpRequest(key=KEY).encryption_key() is None, "a key alone does not encrypt"
