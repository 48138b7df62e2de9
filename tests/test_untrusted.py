"""Checkpoints are untrusted input: crafted, planted or altered ones are refused in one line,
and nothing a manifest names is ever created outside the restore's own staging directory."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cedana_ray.plugins.containerd.checkpoint import RestoreFacts as ContainerdFacts
from cedana_ray.plugins.crio.plugin import RestoreFacts as CrioFacts
from cedana_ray.plugins.runc.plugin import RestoreFacts as RuncFacts
from conftest import kill_jobs
from test_cli import assert_one_error, cedana
from test_process_criu import COUNTER, last_count, start, wait_for

from cedana_ray.chunk_store import DEDUP_ENV
from cedana_ray.config import Paths
from cedana_ray.engine import Engine
from cedana_ray.errors import PermissionDenied, UntrustedCheckpoint
from cedana_ray.models import Compression, Manifest
from cedana_ray.requests import DumpRequest
from cedana_ray.signing import Signer
from cedana_ray.staging import staging_area
from cedana_ray.store import MANIFEST, CheckpointStore

pytestmark = [pytest.mark.criu, pytest.mark.usefixtures("own_staging")]
Body = dict[str, Any]


@pytest.fixture(autouse=True)
def per_checkpoint_layouts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checkpoints crafted here are copies of a per-checkpoint layout's files (``data``):
    the refusals of crafted cas manifests (chunks missing or corrupted, addresses changed)
    are tested in tests/test_incremental.py."""
    monkeypatch.setenv(DEDUP_ENV, "0")


@pytest.fixture
def dumped(engine: Engine) -> tuple[CheckpointStore, Manifest]:
    """A real checkpoint of a counter, compressed (so a restore writes its images itself)."""
    start(engine, COUNTER, ready="count=2")
    result = engine.dump("j1", DumpRequest(compression=Compression.zstd))
    store = engine.store(engine.paths.storage)
    return store, store.manifest(result.checkpoint)


def plant(store: CheckpointStore, original: Manifest, ckpt: str, change: Callable[[Body], object]) -> str:
    """A copy of ``original``'s checkpoint as ``ckpt``, its manifest changed by ``change``
    (and not signed again, unless ``change`` does it); its URL."""
    shutil.copytree(Path(store.path(original.checkpoint)) / "data", Path(store.path(ckpt)) / "data")
    body = original.model_dump(mode="json")
    body["checkpoint"] = ckpt
    change(body)
    (Path(store.path(ckpt)) / MANIFEST).write_text(json.dumps(body))
    return store.url_of(ckpt)


def first_file(body: Body) -> Body:
    return max(body["files"], key=lambda f: f["size"])  # the pages: several chunks


OUTSIDE = Path("/tmp/cedana-ray-untrusted-outside")

# (what is crafted, how, what the refusal says)
CRAFTED: list[tuple[str, Callable[[Body], object], str]] = [
    ("absolute name", lambda b: first_file(b).update(name=str(OUTSIDE / "pwned")), "invalid name"),
    ("dot-dot name", lambda b: first_file(b).update(name="../../../../../../tmp/pwned"), "invalid name"),
    ("name with a slash", lambda b: first_file(b).update(name="sub/pwned"), "invalid name"),
    ("NUL in a name", lambda b: first_file(b).update(name="pages\0.img"), "invalid name"),
    ("duplicated name", lambda b: b["files"][1].update(name=b["files"][0]["name"]), "listed twice"),
    ("chunks short of the file", lambda b: first_file(b)["chunks"][-1].update(size=1), "chunks hold"),
    ("no chunks", lambda b: first_file(b).update(chunks=[]), "at least 1 item"),
    ("negative size", lambda b: first_file(b).update(size=-1), "greater than or equal to 0"),
    ("huge size", lambda b: first_file(b).update(size=1 << 62), "chunks hold"),
    ("chunk past chunk_size", lambda b: b.update(chunk_size=1), "larger than chunk_size"),
    ("huge chunk_size", lambda b: b.update(chunk_size=1 << 40), "chunk_size"),
    ("negative stored size", lambda b: first_file(b)["chunks"][0].update(stored_size=-5), "stored_size"),
    ("misplaced stored chunk", lambda b: first_file(b)["chunks"][0].update(stored_offset=7), "wrong offset"),
    ("bad digest", lambda b: first_file(b)["chunks"][0].update(blake3="../../x"), "blake3"),
    ("two digests", lambda b: first_file(b)["chunks"][0].update(sha256="0" * 64), "exactly one digest"),
    ("unknown digest", lambda b: b.update(digest="md5"), "digest: Input should be 'sha256' or 'blake3'"),
    ("digest the chunks lack", lambda b: b.pop("digest"), "lacks the manifest's sha256 digest"),
    ("newline in a CRIU option", lambda b: b["criu"].update(external=["mnt[]:m\naction-script /x"]), "line break"),
    ("dot-dot job id", lambda b: b.update(jid="../../etc"), "invalid name"),
    ("another checkpoint's manifest", lambda b: b.update(checkpoint="j1-other"), "names another checkpoint"),
]


@pytest.mark.parametrize(("crafted", "change", "says"), CRAFTED, ids=[c[0] for c in CRAFTED])
def test_a_crafted_manifest_is_refused_and_writes_nothing(
    dumped: tuple[CheckpointStore, Manifest], home: Path, crafted: str, change: Callable[[Body], object], says: str
) -> None:
    store, original = dumped
    url = plant(store, original, "j1-crafted", change)
    error = assert_one_error(restore_clone(url), UntrustedCheckpoint)
    assert says in error
    assert_nothing_escaped(home)


def restore_clone(url: str, *options: str) -> subprocess.CompletedProcess[str]:
    return cedana("restore", "process", "--path", url, "--local", "--jid", "clone", *options)


def assert_nothing_escaped(home: Path) -> None:
    """No file a crafted manifest named exists, and every restore staging dir is gone."""
    staging = home.parent / "staging"
    # where the names above lead: this test's own dirs, or the top of /tmp and /dev/shm (not
    # below: other processes create and remove dirs there while this looks)
    planted = [*home.parent.rglob("pwned*"), *Path("/tmp").glob("pwned*"), *Path("/dev/shm").glob("pwned*")]
    assert not planted and not OUTSIDE.exists(), planted
    assert not [p for p in staging.rglob("*") if p.is_file()], "a restore's staging is removed"


def tamper(store: CheckpointStore, manifest: Manifest, change: Callable[[Body], object]) -> str:
    """Edit the stored manifest of ``manifest``'s checkpoint in place; its URL."""
    path = Path(store.path(manifest.checkpoint)) / MANIFEST
    body = json.loads(path.read_text())
    change(body)
    path.write_text(json.dumps(body))
    return store.url_of(manifest.checkpoint)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda b: b.update(signatures={}), "not signed by this cluster's key"),
        (lambda b: b.update(created=(datetime.now(UTC) + timedelta(days=365)).isoformat()), "altered"),
        (lambda b: b["details"].update(command=["sh", "-c", "evil"]), "altered"),
        (lambda b: b["criu"].update(tcp_established=True), "altered"),
        (lambda b: first_file(b)["chunks"][0].update(blake3="0" * 64), "altered"),
    ],
    ids=["unsigned", "dated in the future", "details changed", "CRIU options changed", "chunk digest changed"],
)
def test_an_unsigned_or_altered_manifest_is_refused(
    dumped: tuple[CheckpointStore, Manifest], home: Path, change: Callable[[Body], object], says: str
) -> None:
    store, original = dumped
    url = tamper(store, original, change)
    assert says in assert_one_error(cedana("restore", "process", "--path", url, "--local"), UntrustedCheckpoint)
    assert_nothing_escaped(home)


def test_dropping_a_checkpoints_encryption_is_refused(engine: Engine, home: Path, tmp_path: Path) -> None:
    key = os.urandom(32)
    (tmp_path / "key").write_text(key.hex())
    start(engine, COUNTER, ready="count=2")
    made = engine.dump("j1", DumpRequest(encrypt=True, key=key))
    store = engine.store(engine.paths.storage)
    url = tamper(store, store.manifest(made.checkpoint), lambda b: b.update(encryption=None, key_fingerprint=None))
    for key_args in ([], ["--key-file", str(tmp_path / "key")]):
        result = cedana("restore", "process", "--path", url, "--local", *key_args)
        assert "altered" in assert_one_error(result, UntrustedCheckpoint)
    assert_nothing_escaped(home)


def signed(signer: Signer, change: Callable[[Body], object]) -> Callable[[Body], object]:
    """``change``, then a valid signature: the manifest is ours, its content is not sane."""

    def sign(body: Body) -> None:
        change(body)
        manifest = Manifest.model_validate({**body, "signatures": {}})
        body["signatures"] = signer.sign(manifest).signatures

    return sign


def test_a_signed_manifest_with_bad_plugin_details_is_refused(
    dumped: tuple[CheckpointStore, Manifest], engine: Engine, home: Path
) -> None:
    store, original = dumped
    inject = signed(engine.signer, lambda b: b["details"].update(pipes=["pipe:[1]\n--action-script=/x"]))
    url = plant(store, original, "j1-pipes", inject)
    error = assert_one_error(restore_clone(url), UntrustedCheckpoint)
    assert "invalid details: pipes.0" in error
    assert_nothing_escaped(home)


@pytest.mark.parametrize(
    ("facts", "details", "field"),
    [
        (RuncFacts, {"container": "../../etc", "bundle": "/b"}, "invalid name"),
        (RuncFacts, {"container": "c1", "bundle": "relative/bundle"}, "bundle"),
        (RuncFacts, {"container": "c1", "bundle": "/b\n--x"}, "line break"),
        (ContainerdFacts, {"container": "../x", "image": "i", "checkpoint_ref": "r"}, "invalid name"),
        (ContainerdFacts, {"container": "c1", "image": "i\nx", "checkpoint_ref": "r"}, "image"),
        (CrioFacts, {"name": "n", "pod": "p", "log": "../../etc/passwd"}, "invalid name"),
    ],
)
def test_container_details_that_could_escape_are_refused(
    dumped: tuple[CheckpointStore, Manifest], facts: type, details: dict[str, str], field: str
) -> None:
    _, original = dumped
    with pytest.raises(UntrustedCheckpoint, match=field):
        original.model_copy(update={"details": details}).facts(facts)


def test_encryption_downgrade_is_refused(dumped: tuple[CheckpointStore, Manifest], tmp_path: Path) -> None:
    """With a key configured, a checkpoint in the clear is not what we wrote."""
    store, original = dumped
    key = tmp_path / "key"
    key.write_text(os.urandom(32).hex())
    url = store.url_of(original.checkpoint)
    result = restore_clone(url, "--key-file", str(key))
    assert "is not encrypted, but a key is configured" in assert_one_error(result, UntrustedCheckpoint)


def test_planted_checkpoints_are_never_catalogued(engine: Engine) -> None:
    """A manifest naming a known job, planted in its store (even dated in the future, which
    would make it the job's latest), is ignored by recovery, so keep-K never prunes the real
    checkpoints for it and a restore never starts from it."""
    start(engine, COUNTER, ready="count=2")
    real = engine.dump("j1", DumpRequest(leave_running=True, compression=Compression.lz4))
    store = engine.store(engine.paths.storage)
    original = store.manifest(real.checkpoint)
    future = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    plant(store, original, "j1-planted", lambda b: b.update(created=future))
    other = Signer(os.urandom(32))
    plant(store, original, "j1-elsewhere", signed(other, lambda b: b.update(created=future)))
    assert engine.records.recover(store.url) == []
    assert [c.checkpoint for c in engine.checkpoints("j1")] == [real.checkpoint]
    assert [m.checkpoint for m in store.list()] == [real.checkpoint]


def test_a_checkpoint_from_elsewhere_restores_once_imported(engine: Engine, home: Path, tmp_path: Path) -> None:
    """Moving a checkpoint between state dirs (or clusters) is an explicit import."""
    elsewhere = Engine(Paths(tmp_path / "elsewhere"))
    try:
        start(elsewhere, COUNTER, ready="count=3")
        made = elsewhere.dump("j1", DumpRequest(compression=Compression.lz4))
    finally:
        kill_jobs(elsewhere.paths.home)
    refused = cedana("restore", "process", "--path", made.path, "--local", "--jid", "moved")
    assert "checkpoint import" in assert_one_error(refused, UntrustedCheckpoint)
    imported = cedana("checkpoint", "import", made.path, "--local", "--json")
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout)["checkpoint"] == made.checkpoint
    restored = cedana("restore", "process", "--path", made.path, "--local", "--jid", "moved", "--json")
    assert restored.returncode == 0, restored.stderr
    wait_for(lambda: last_count(engine, "moved") > 5, what="the imported job counting on")
    store = elsewhere.store(made.path.rsplit("/", 1)[0])
    assert store.manifest(made.checkpoint).checkpoint == made.checkpoint, "still trusted where it was made"


@pytest.mark.parametrize("planted", ["symlink", "another owner", "open to all"])
def test_staging_refuses_a_directory_someone_else_controls(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, planted: str
) -> None:
    base = tmp_path / "shared"
    base.mkdir()
    mine = base / f"cedana-ray-{os.geteuid()}"
    if planted == "symlink":
        (tmp_path / "theirs").mkdir(mode=0o700)
        mine.symlink_to(tmp_path / "theirs")
    else:
        mine.mkdir(mode=0o700)
        if planted == "another owner":
            os.chown(mine, 65534, 65534)
        else:
            mine.chmod(0o777)
    monkeypatch.setenv("CEDANA_RAY_STAGING", str(base))
    with pytest.raises(PermissionDenied, match="refusing to stage images"):
        staging_area(tmp_path / "unused")


def test_staging_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CEDANA_RAY_STAGING", str(tmp_path))
    area = staging_area(tmp_path / "unused")
    for path in (area, area.parent):
        assert stat.S_IMODE(path.lstat().st_mode) == 0o700 and path.lstat().st_uid == os.geteuid()
