"""Checkpoints on S3 (SeaweedFS) and GCS (fake-gcs-server): real servers, real CRIU jobs.

Each test runs on both backends through the ``remote`` fixture (a fresh bucket on
the session's servers) or ``own_remote`` (a server of its own, to kill).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from conftest import Remote
from s3fs.errors import translate_boto_error
from servers import ACCESS_KEY, SECRET_KEY
from test_cli import assert_one_error
from test_process_criu import COUNTER, WORKLOADS, counts_of, last_count, log_lines, wait_for

from cedana_ray.chunk_store import CHUNKS, chunk_name
from cedana_ray.chunking import hash_chunk
from cedana_ray.crypto import fingerprint
from cedana_ray.engine import Engine
from cedana_ray.errors import CorruptCheckpoint, DumpError, StorageError, UsageError
from cedana_ray.models import Compression, Digest, JobState, Layout
from cedana_ray.policy import prune
from cedana_ray.requests import DumpRequest, RestoreRequest, RunRequest
from cedana_ray.retry import retrying
from cedana_ray.store import CheckpointStore

pytestmark = pytest.mark.criu

KEY = bytes(range(32))
CLI = [sys.executable, "-m", "cedana_ray.cli"]


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env)


def start(engine: Engine, cmd: list[str], ready: str) -> None:
    """Run ``cmd`` as job j1 and wait for ``ready`` in its log (which may take a moment to appear)."""
    engine.run("process", RunRequest(cmd=cmd, jid="j1"))
    log = Path(engine.job("j1").log or "")
    wait_for(lambda: log.exists() and ready in log.read_text(), what="j1 output")


def assert_no_credentials(*texts: str) -> None:
    for text in texts:
        assert SECRET_KEY not in text and ACCESS_KEY not in text


def pages_chunk(engine: Engine, remote: Remote, ckpt: str) -> tuple[str, str]:
    """The first stored chunk of the checkpoint's largest pages image, and that image's name."""
    manifest = engine.inspect(ckpt)
    image = max((f for f in manifest.files if f.name.startswith("pages-")), key=lambda f: f.size)
    return f"{remote.bucket}/ckpts/{CHUNKS}/{chunk_name(image.chunks[0].digest, manifest.digest)}", image.name


def assert_stays_checkpointed(engine: Engine, jid: str) -> None:
    lines = len(log_lines(engine, jid))
    assert engine.job(jid).state is JobState.checkpointed
    time.sleep(0.3)
    assert len(log_lines(engine, jid)) == lines, "nothing ran"


def test_dump_restore_list_inspect_delete(engine: Engine, remote: Remote) -> None:
    start(engine, COUNTER, "count=5")
    result = engine.dump("j1", DumpRequest(storage=remote.url))
    assert result.path == f"{remote.url}/{result.checkpoint}"
    stopped_at = last_count(engine, "j1")

    engine.restore(RestoreRequest(), jid="j1")
    wait_for(lambda: last_count(engine, "j1") > stopped_at + 5, what="counting after restore")
    counts = counts_of(engine, "j1")
    assert counts == list(range(len(counts))), "counting went on without a restart or a gap"

    assert [c.checkpoint for c in engine.checkpoints("j1")] == [result.checkpoint]
    manifest = engine.inspect(result.checkpoint)
    assert manifest.layout is Layout.cas and manifest.encryption is None
    assert [m.checkpoint for m in engine.store(remote.url).list()] == [result.checkpoint]
    engine.delete_checkpoint(result.checkpoint)
    assert engine.checkpoints("j1") == []
    assert engine.store(remote.url).list() == []
    assert not [p for p in remote.raw().find(f"{remote.bucket}/ckpts") if result.checkpoint in p]


def test_encrypted_round_trip_and_wrong_key(engine: Engine, remote: Remote) -> None:
    start(engine, COUNTER, "count=3")
    result = engine.dump("j1", DumpRequest(storage=remote.url, encrypt=True, key=KEY))
    manifest = engine.inspect(result.checkpoint)
    assert manifest.encryption == "aes-256-gcm" and manifest.key_fingerprint == fingerprint(KEY)
    raw_manifest = remote.raw().cat_file(f"{remote.bucket}/ckpts/{result.checkpoint}/manifest.json")
    assert KEY.hex().encode() not in raw_manifest and KEY not in raw_manifest

    with pytest.raises(UsageError, match=f"checkpoint {result.checkpoint} is encrypted"):
        engine.restore(RestoreRequest(), jid="j1")
    with pytest.raises(UsageError, match=f"wrong key for checkpoint {result.checkpoint}"):
        engine.restore(RestoreRequest(key=bytes(32)), jid="j1")
    assert_stays_checkpointed(engine, "j1")

    at = last_count(engine, "j1")
    engine.restore(RestoreRequest(key=KEY), jid="j1")
    wait_for(lambda: last_count(engine, "j1") > at + 3, what="counting after an encrypted restore")


def test_corrupted_then_deleted_chunk_is_refused(engine: Engine, remote: Remote) -> None:
    start(engine, COUNTER, "count=2")
    result = engine.dump("j1", DumpRequest(storage=remote.url))
    chunk, image = pages_chunk(engine, remote, result.checkpoint)
    fs = remote.raw()
    data = bytearray(fs.cat_file(chunk))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(chunk, bytes(data))
    with pytest.raises(CorruptCheckpoint, match=f"chunk 0 of {image} is corrupted"):
        engine.restore(RestoreRequest(), jid="j1")
    fs.rm(chunk)
    with pytest.raises(CorruptCheckpoint, match=f"chunk 0 of {image} is missing"):
        engine.restore(RestoreRequest(), jid="j1")
    assert_stays_checkpointed(engine, "j1")


def test_missing_bucket_fails_cleanly(engine: Engine, remote: Remote) -> None:
    start(engine, COUNTER, "count=2")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        engine.dump("j1", DumpRequest(storage=f"{remote.scheme}://no-such-bucket/x"))
    assert engine.job("j1").state is JobState.running and engine.checkpoints("j1") == []
    assert not remote.raw().exists("no-such-bucket"), "a dump never creates a bucket"


def test_interrupted_upload_leaves_nothing(engine: Engine, remote: Remote) -> None:
    start(engine, [sys.executable, str(WORKLOADS / "buffer.py"), "32"], "ready")

    def interrupt(stage: str, done: int, total: int) -> None:
        if stage == "store" and done:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        engine.dump("j1", DumpRequest(storage=remote.url, compression=Compression.none), progress=interrupt)
    assert engine.job("j1").state is JobState.running and engine.checkpoints("j1") == []
    assert engine.store(remote.url).list() == []
    left = [p for p in remote.raw().find(f"{remote.bucket}/ckpts") if "/data/" in p or "/.pending/" in p]
    assert not left, "the upload was removed, its pending record too (its new chunks go at the next sweep)"


def test_full_staging_disk_fails_cleanly(
    engine: Engine, remote: Remote, small_disk: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CEDANA_RAY_STAGING", str(small_disk))  # 16 MiB for a 64 MiB image
    start(engine, [sys.executable, str(WORKLOADS / "buffer.py"), "64"], "ready")
    with pytest.raises((DumpError, StorageError), match=r"No space left|ENOSPC"):
        engine.dump("j1", DumpRequest(storage=remote.url))
    assert engine.job("j1").state is JobState.running and engine.checkpoints("j1") == []
    assert engine.store(remote.url).list() == []
    left = [p for p in remote.raw().find(f"{remote.bucket}/ckpts") if "/data/" in p or "/.pending/" in p]
    assert not left, "early uploads were removed, the pending record too"
    assert list(small_disk.rglob("*")) == [small_disk / f"cedana-ray-{os.geteuid()}"], "the staging area was cleaned up"


def test_keep_last_k_prunes_the_bucket_too(engine: Engine, remote: Remote) -> None:
    start(engine, COUNTER, "count=2")
    made = [engine.dump("j1", DumpRequest(storage=remote.url, leave_running=True)).checkpoint for _ in range(3)]
    prune(engine, "j1", keep=1)  # what `--checkpoint-every ... --keep 1` runs after each dump
    assert [c.checkpoint for c in engine.checkpoints("j1")] == made[-1:]
    assert [m.checkpoint for m in engine.store(remote.url).list()] == made[-1:]


def killer(remote: Remote, stage: str) -> Callable[[str, int, int], None]:
    """A progress callback that kills the server once the first file of ``stage`` is done."""

    def progress(at: str, done: int, total: int) -> None:
        if at == stage and done:
            remote.server.kill()

    return progress


def test_server_killed_mid_upload(engine: Engine, own_remote: Remote) -> None:
    start(engine, [sys.executable, str(WORKLOADS / "buffer.py"), "32"], "ready")
    request = DumpRequest(storage=own_remote.url, compression=Compression.none)
    with pytest.raises(StorageError, match="unreachable"):
        engine.dump("j1", request, progress=killer(own_remote, "store"))
    assert engine.job("j1").state is JobState.running and engine.checkpoints("j1") == []
    n = len(log_lines(engine, "j1"))
    wait_for(lambda: len(log_lines(engine, "j1")) > n, what="the job to go on")
    own_remote.server.start()  # same data dir: what the dump left behind
    assert engine.store(own_remote.url).list() == []


def test_server_killed_mid_restore(engine: Engine, own_remote: Remote) -> None:
    start(engine, COUNTER, "count=2")
    engine.dump("j1", DumpRequest(storage=own_remote.url))
    with pytest.raises(StorageError, match="unreachable"):
        engine.restore(RestoreRequest(), jid="j1", progress=killer(own_remote, "fetch"))
    assert_stays_checkpointed(engine, "j1")
    own_remote.server.start()
    at = last_count(engine, "j1")
    engine.restore(RestoreRequest(), jid="j1")
    wait_for(lambda: last_count(engine, "j1") > at + 2, what="counting once the server is back")


@pytest.mark.parametrize(("code", "status", "transient"), [
    ("InternalError", 500, True), ("SlowDown", 503, True), ("NoSuchKey", 404, False), ("AccessDenied", 403, False),
])  # fmt: skip
def test_s3_server_failures_are_tried_again(code: str, status: int, transient: bool) -> None:
    """s3fs hands S3's error codes on as plain OSErrors; one that says the server failed is tried again."""
    response = {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}
    error = translate_boto_error(ClientError(response, "GetObject"))  # type: ignore[arg-type]
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise error
        return "read"

    if transient:
        assert retrying(flaky, base_delay=0) == "read" and len(calls) == 3
    else:
        with pytest.raises(type(error)):
            retrying(flaky, base_delay=0)
        assert len(calls) == 1


@pytest.mark.parametrize("remote", ["s3"], indirect=True)
def test_wrong_credentials_one_line_no_secret(engine: Engine, remote: Remote) -> None:
    start(engine, COUNTER, "count=2")
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": "wrong-secret-for-the-test"}
    res = cli("dump", "job", "j1", "--dir", remote.url, "--json", env=env)
    assert res.returncode == StorageError.exit_code and res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1
    assert f"access to bucket {remote.bucket!r} denied" in res.stderr
    assert "wrong-secret-for-the-test" not in res.stderr
    assert_no_credentials(res.stderr)
    assert engine.job("j1").state is JobState.running and engine.checkpoints("j1") == []


@pytest.mark.parametrize("remote", ["gs"], indirect=True)
def test_unusable_gcs_key_file_one_line_no_secret(engine: Engine, remote: Remote, tmp_path: Path) -> None:
    """fake-gcs-server accepts any credentials, so this is the GCS credential failure that can
    be shown here: a key file that cannot be used fails at once, not as anonymous access later."""
    secret = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7-not-a-real-key"
    key = tmp_path / "key.json"
    key.write_text(json.dumps({"type": "service_account", "client_email": "ci@example.iam.gserviceaccount.com",
                               "private_key": f"-----BEGIN PRIVATE KEY-----\n{secret}\n-----END PRIVATE KEY-----\n",
                               "token_uri": "http://127.0.0.1:9/token"}))  # fmt: skip
    start(engine, COUNTER, "count=2")
    env = {k: v for k, v in os.environ.items() if k != "STORAGE_EMULATOR_HOST"}
    res = cli("dump", "job", "j1", "--dir", remote.url, env={**env, "GOOGLE_APPLICATION_CREDENTIALS": str(key)})
    assert "GCS credentials in GOOGLE_APPLICATION_CREDENTIALS cannot be used" in assert_one_error(res, StorageError)
    assert secret not in res.stderr
    assert engine.job("j1").state is JobState.running and engine.checkpoints("j1") == []


@pytest.mark.parametrize("remote", ["s3"], indirect=True)  # the one backend with credentials
def test_cli_json_never_shows_credentials(engine: Engine, remote: Remote, tmp_path: Path) -> None:
    start(engine, COUNTER, "count=2")
    key_file = tmp_path / "key"
    key_file.write_text(KEY.hex())
    dump = cli("dump", "job", "j1", "--dir", remote.url, "--encrypt", "--key-file", str(key_file), "--json")
    assert dump.returncode == 0, dump.stderr
    ckpt = json.loads(dump.stdout)["checkpoint"]
    outputs = [dump.stdout, dump.stderr]
    for args in (["checkpoint", "list"], ["checkpoint", "inspect", ckpt], ["check"]):
        res = cli(*args, "--json")
        outputs += [res.stdout, res.stderr]
    checks = {(c["component"], c["name"]): c for c in json.loads(outputs[-2])["checks"]}
    assert checks["plugin storage/s3", "endpoint"]["ok"] and checks["plugin storage/s3", "credentials"]["ok"]
    assert_no_credentials(*outputs)
    assert KEY.hex() not in "".join(outputs)
    wrong = tmp_path / "wrong"
    wrong.write_text(bytes(32).hex())
    res = cli("restore", "job", "j1", "--key-file", str(wrong), "--json")
    assert res.returncode == UsageError.exit_code and f"wrong key for checkpoint {ckpt}" in res.stderr
    res = cli("restore", "job", "j1", "--key-file", str(key_file), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["state"] == "running"


@pytest.mark.parametrize("remote", ["s3"], indirect=True)
@pytest.mark.parametrize("digest", [Digest.sha256, Digest.blake3])
def test_s3_checks_each_chunk_against_our_checksum(remote: Remote, digest: Digest) -> None:
    """Chunks go up unsigned, with a checksum in the signed checksum header (our sha256 where
    the checkpoint is hashed so, else a CRC32: S3 knows no BLAKE3): the server refuses bytes
    that do not match it, as a signed payload would be refused."""
    fs = CheckpointStore(remote.url).fs
    checksum = fs.put_checksum(b"chunk", hash_chunk(b"chunk", digest) if digest is Digest.sha256 else None)
    assert list(checksum) == ["ChecksumSHA256" if digest is Digest.sha256 else "ChecksumCRC32"]
    fs.pipe_file(f"{remote.bucket}/good", b"chunk", **checksum)
    with pytest.raises(OSError):
        fs.pipe_file(f"{remote.bucket}/bad", b"chunk, altered on the way", **checksum)
    assert remote.raw().cat_file(f"{remote.bucket}/good") == b"chunk"
    assert not remote.raw().exists(f"{remote.bucket}/bad")


def test_the_private_gcsfs_internal_we_use_is_still_there() -> None:
    """The gs:// store calls gcsfs's request without its retry decorator, which would hold a
    dump for a minute on a dead server; a gcsfs that no longer exposes the undecorated request
    (``__wrapped__``) fails here instead of quietly retrying again."""
    import gcsfs
    from cedana_ray.plugins import _gcsfs

    assert hasattr(gcsfs.GCSFileSystem._request, "__wrapped__"), f"gcsfs {gcsfs.__version__} changed _request"
    assert _gcsfs.GCSStore._request is gcsfs.GCSFileSystem._request.__wrapped__
