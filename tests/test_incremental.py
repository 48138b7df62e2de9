"""Incremental checkpoints by content (Layout.cas): chunk boundaries that survive shifted pages,
chunks stored once per store, freed only when no checkpoint uses them, on file:// and on S3
(SeaweedFS), with real CRIU dumps of real processes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3
import pytest
from conftest import Remote, _remote
from servers import Server
from test_cli import cedana
from test_process_criu import COUNTER, WORKLOADS, last_count, wait_for
from test_store import SIGNER, manifest_fields

from cedana_ray.cdc import MAX_SIZE, MIN_SIZE, PAGE, Cutter, spans_of
from cedana_ray.chunk_gc import GRACE_ENV, PENDING, SWEEP_EVERY_ENV, SWEEPS
from cedana_ray.chunk_store import CHUNKS, DEDUP_ENV, chunk_name
from cedana_ray.config import Paths
from cedana_ray.engine import Engine
from cedana_ray.errors import CorruptCheckpoint, StorageError, UntrustedCheckpoint, UsageError
from cedana_ray.failpoint import ENV as FAILPOINT
from cedana_ray.models import Compression, Digest, JobState, Layout, Manifest
from cedana_ray.policy import prune
from cedana_ray.requests import DumpRequest, RestoreRequest, RunRequest
from cedana_ray.store import MANIFEST, CheckpointStore

KEY = bytes(range(32, 64))
MiB = 1 << 20
RNG = random.Random()


@pytest.fixture(autouse=True)
def _seeded(request: pytest.FixtureRequest) -> None:
    """Each test's data is the same in every run: how many chunks a change touches depends
    on where the content puts boundaries, so random data would fail a bound now and then."""
    RNG.seed(request.node.nodeid)


def noise(size: int) -> bytes:
    return RNG.randbytes(size)


# -- the chunker, on synthetic pages
def chunk_digests(data: bytes, cutter: Cutter | None = None) -> list[bytes]:
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        spans = spans_of(f.fileno(), len(data), cutter)
    assert sum(size for _, size in spans) == len(data) and spans[0][0] == 0
    return [hashlib.sha256(data[off : off + size]).digest() for off, size in spans]


def shared(a: list[bytes], b: list[bytes]) -> float:
    return len(set(a) & set(b)) / len(a)


@pytest.mark.parametrize("change", ["page inserted", "page removed", "page zeroed"])
def test_shifted_pages_keep_most_chunks_shared(change: str) -> None:
    data = noise(48 * MiB)
    at = 5 * PAGE  # near the start: everything after it moves
    edited = {
        "page inserted": data[:at] + noise(PAGE) + data[at:],
        "page removed": data[:at] + data[at + PAGE :],  # CRIU leaves out a page that turned to zero
        "page zeroed": data[:at] + bytes(PAGE) + data[at + PAGE :],
    }[change]
    before, after = chunk_digests(data), chunk_digests(edited)
    assert len(before) >= 6
    assert shared(before, after) >= (len(before) - 2) / len(before), "only the chunks around the change differ"
    fixed = [hashlib.sha256(data[i : i + 4 * MiB]).digest() for i in range(0, len(data), 4 * MiB)]
    moved = [hashlib.sha256(edited[i : i + 4 * MiB]).digest() for i in range(0, len(edited), 4 * MiB)]
    if change != "page zeroed":  # what fixed offsets would have kept: nothing past the change
        assert shared(fixed, moved) == 0


def test_chunk_sizes_stay_within_bounds() -> None:
    spans_random = chunk_digests(noise(40 * MiB))
    assert 40 * MiB / MAX_SIZE <= len(spans_random) <= 40 * MiB / MIN_SIZE
    zeros = bytes(40 * MiB)  # one fingerprint everywhere: cut at the maximum, or at every minimum
    with tempfile.TemporaryFile() as f:
        f.write(zeros)
        f.flush()
        sizes = [size for _, size in spans_of(f.fileno(), len(zeros))]
    assert all(MIN_SIZE <= s <= MAX_SIZE for s in sizes[:-1]) and len(set(sizes[:-1])) == 1


def test_cutting_a_growing_file_gives_the_chunks_of_the_whole(tmp_path: Path) -> None:
    data = noise(30 * MiB + 1234)
    path = tmp_path / "pages-1.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        cutter, spans = Cutter(), []
        for off in range(0, len(data), 3_000_017):  # writes that end mid-page, as CRIU's may
            os.pwrite(fd, data[off : off + 3_000_017], off)
            spans += cutter.cuts(fd, min(len(data), off + 3_000_017))
        spans += cutter.cuts(fd, len(data), final=True)
        assert spans == spans_of(fd, len(data))
    finally:
        os.close(fd)


# -- the store, on file:// and S3
@dataclass
class Place:
    """A cas store and a raw view of its chunk objects: name (as ``chunk_name`` gives it,
    under ``.chunks``) -> how it was last written."""

    store: CheckpointStore
    objects: Callable[[], dict[str, tuple[int, object]]]
    raw_chunk: Callable[[str], Path | str]


@pytest.fixture(params=["file", "s3"])
def place(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Place]:
    monkeypatch.setenv(GRACE_ENV, "0")  # the grace period is tested on its own
    monkeypatch.setenv(SWEEP_EVERY_ENV, "0")  # so is how often a delete sweeps
    if request.param == "file":
        root = tmp_path / "store"
        store = CheckpointStore(f"file://{root}", SIGNER)

        def local() -> dict[str, tuple[int, object]]:
            folder = root / CHUNKS
            if not folder.exists():
                return {}
            files = (p for p in folder.rglob("*") if p.is_file())
            return {
                str(p.relative_to(folder)): (p.stat().st_size, (p.stat().st_ino, p.stat().st_mtime_ns)) for p in files
            }

        yield Place(store, local, lambda name: root / CHUNKS / name)
        return
    servers: dict[str, Server] = request.getfixturevalue("servers")
    remote: Remote = _remote("s3", servers["s3"], f"b-{os.urandom(4).hex()}")
    for var, value in remote.env.items():
        monkeypatch.setenv(var, value)
    raw = remote.raw()

    def s3() -> dict[str, tuple[int, object]]:
        folder = f"{remote.bucket}/ckpts/{CHUNKS}/"
        found = raw.find(folder, detail=True)
        files = {p: e for p, e in found.items() if e.get("type") == "file"}
        return {p.removeprefix(folder): (e["size"], e["LastModified"]) for p, e in files.items()}

    yield Place(CheckpointStore(remote.url, SIGNER), s3, lambda name: f"{remote.bucket}/ckpts/{CHUNKS}/{name}")


def images_of(size: int = 24 * MiB) -> dict[str, bytes]:
    return {"pages-1.img": noise(size), "core-1.img": noise(1000), "empty.img": b""}


def changed(images: dict[str, bytes], at: int, size: int) -> dict[str, bytes]:
    pages = images["pages-1.img"]
    return {**images, "pages-1.img": pages[:at] + noise(size) + pages[at + size :]}


def commit(
    store: CheckpointStore,
    staging: Path,
    ckpt: str,
    images: dict[str, bytes],
    key: bytes | None = None,
    parent: str | None = None,
) -> Manifest:
    """Checkpoint ``ckpt`` of ``images``, after ``parent`` (the job's last checkpoint: what it may reuse)."""
    folder = store.dump_dir(ckpt, Compression.zstd, staging, encrypted=key is not None)
    for name, data in images.items():
        (folder / name).write_bytes(data)
    fields = manifest_fields(ckpt) | {"parent": parent}
    return store.commit(folder, fields, compression=Compression.zstd, streams=2, key=key)


def fetched(store: CheckpointStore, ckpt: str, dest: Path, key: bytes | None = None) -> dict[str, bytes]:
    _, folder = store.fetch(ckpt, dest, key=key)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def stored(manifest: Manifest) -> set[str]:
    """The chunk objects ``manifest`` uses, by name under ``.chunks``."""
    return {chunk_name(c.digest, manifest.digest) for f in manifest.files for c in f.chunks}


def addresses(manifest: Manifest) -> set[str]:
    return {c.address or "" for f in manifest.files for c in f.chunks}


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    (tmp_path / "staging").mkdir()
    return tmp_path / "staging"


def test_a_second_checkpoint_writes_only_new_chunks(place: Place, staging: Path, tmp_path: Path) -> None:
    first = images_of()
    m1 = commit(place.store, staging, "c1", first)
    assert m1.layout is Layout.cas and stored(m1) == set(place.objects())
    before = place.objects()
    time.sleep(1.1)  # S3's LastModified has whole seconds: a rewrite would show
    second = changed(first, 10 * MiB, 2 * MiB)  # about 10% of the pages
    m2 = commit(place.store, staging, "c2", second, parent="c1")
    after = place.objects()
    new = {chunk_name(c.digest, m2.digest) for f in m2.files for c in f.chunks if c.address not in addresses(m1)}
    assert set(after) - set(before) == new and 1 <= len(new) <= 3
    assert {name: after[name] for name in before} == before, "no chunk already stored was written again"
    pages = next(f for f in m2.files if f.name == "pages-1.img")
    for c in pages.chunks:  # new: the chunks holding the change, or right after it (its cut may move)
        is_new = chunk_name(c.digest, m2.digest) in new
        assert is_new <= (c.offset + c.size > 10 * MiB and c.offset < 12 * MiB + MAX_SIZE)
        assert is_new >= (10 * MiB <= c.offset < 12 * MiB or c.offset < 10 * MiB < c.offset + c.size)
    assert m2.size_bytes >= 24 * MiB, "a manifest lists every chunk of its checkpoint, reused or new"
    assert fetched(place.store, "c2", tmp_path / "r2") == second
    assert fetched(place.store, "c1", tmp_path / "r1") == first


def test_delete_frees_only_chunks_nobody_uses(place: Place, staging: Path, tmp_path: Path) -> None:
    first = images_of()
    m1 = commit(place.store, staging, "c1", first)
    m2 = commit(place.store, staging, "c2", second := changed(first, 4 * MiB, 3 * MiB), parent="c1")
    assert stored(m1) - stored(m2) and stored(m1) & stored(m2)
    place.store.delete("c1")
    assert set(place.objects()) == stored(m2)
    assert fetched(place.store, "c2", tmp_path / "r2") == second
    place.store.delete("c2")
    assert place.objects() == {}


def test_a_sweep_during_a_dump_frees_none_of_its_chunks(place: Place, staging: Path, tmp_path: Path) -> None:
    first = images_of()
    m1 = commit(place.store, staging, "c1", first)
    commit(place.store, staging, "c2", changed(first, 8 * MiB, 4 * MiB), parent="c1")
    folder = place.store.dump_dir("c3", Compression.zstd, staging)
    with place.store.early_chunks(folder, "c3", Compression.zstd, None, 2, parent="c1") as early:
        for name, data in first.items():  # c3 is c1 again: it reuses chunks only c1 has
            (folder / name).write_bytes(data)
        objects = place.objects()
        place.store.delete("c1")  # its chunks are unused now by any manifest, but c3's dump is under way
        assert place.objects() == objects
    m3 = place.store.commit(folder, manifest_fields("c3"), compression=Compression.zstd, prehashed=early)
    assert stored(m3) == stored(m1)
    assert fetched(place.store, "c3", tmp_path / "r3") == first
    place.store.delete("c2")  # no dump under way: what c2 alone used goes
    assert set(place.objects()) == stored(m3)


def test_a_dump_waits_for_a_sweep_to_end(place: Place, staging: Path) -> None:
    place.store._put_record(SWEEPS, "other")
    folder = place.store.dump_dir("c1", Compression.zstd, staging)
    threading.Timer(0.5, lambda: place.store.fs.rm(f"{place.store.root}/{SWEEPS}/other")).start()
    start = time.monotonic()
    with place.store.early_chunks(folder, "c1", Compression.zstd, None, 2):
        assert time.monotonic() - start >= 0.4, "it read what to reuse only once the sweep was over"


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def test_a_released_dump_gives_back_each_stored_part(place: Place, staging: Path, tmp_path: Path) -> None:
    """A VM's dump (``release``): each stored part of the staged state is given back at once
    (a hole), so staging holds what is not stored yet; the checkpoint is whole."""
    data = noise(32 * MiB)
    folder = place.store.dump_dir("c1", Compression.zstd, staging)
    staged = folder / "vm.state"
    with place.store.early_chunks(folder, "c1", Compression.zstd, None, 2, release=True) as early:
        with staged.open("wb") as f:
            for off in range(0, len(data), MiB):  # in order, as QEMU writes its migration stream
                f.write(data[off : off + MiB])
                f.flush()
        # all but the last chunk, which only the file's end settles (at most MAX_SIZE)
        wait_for(lambda: early.released.get("vm.state", 0) >= len(data) - MAX_SIZE, 60, "the stored parts freed")
    assert allocated(staged) <= len(data) - early.released["vm.state"] + PAGE
    place.store.commit(folder, manifest_fields("c1"), compression=Compression.zstd, prehashed=early)
    assert fetched(place.store, "c1", tmp_path / "r1")["vm.state"] == data


def pages(count: int, tag: int) -> bytes:
    """``count`` distinct pages that compress to almost nothing."""
    return b"".join((tag << 32 | i).to_bytes(8, "big") * (PAGE // 8) for i in range(count))


def fill(folder: Path) -> None:
    """Fill the filesystem of ``folder`` up, with a file named filler."""
    with (folder / "filler").open("wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(bytes(MiB))
            f.flush()


def test_a_released_dump_that_failed_is_not_started_over(small_disk: Path, staging: Path) -> None:
    """The store fills up after part of the state was stored and given back, then has room
    again before the commit. The commit fails: starting the file over would store zeros."""
    store = CheckpointStore(f"file://{small_disk / 'store'}", SIGNER)
    folder = store.dump_dir("c1", Compression.zstd, staging)
    with (
        store.early_chunks(folder, "c1", Compression.zstd, None, 2, release=True) as early,
        (folder / "vm.state").open("wb") as f,
    ):
        f.write(pages(MAX_SIZE // PAGE + 256, 1))  # past MAX_SIZE: a chunk ends in it
        f.flush()
        wait_for(lambda: early.released.get("vm.state"), 60, "a part stored and freed")
        fill(small_disk)
        f.write(pages(MAX_SIZE // PAGE + 256, 2))
        f.flush()
        wait_for(lambda: early.failure, 60, "the full store to fail a chunk")
    (small_disk / "filler").unlink()
    with pytest.raises(StorageError, match="No space left"):
        store.commit(folder, manifest_fields("c1"), compression=Compression.zstd, prehashed=early)
    assert store.list() == []


CRASH = """
import sys
from pathlib import Path
from test_store import SIGNER, manifest_fields
from cedana_ray.models import Compression
from cedana_ray.store import CheckpointStore
store = CheckpointStore(sys.argv[1], SIGNER)
folder = Path(sys.argv[2])
store.commit(folder, manifest_fields("c2"), compression=Compression.zstd, streams=2)
"""


def test_a_crash_before_the_manifest_leaves_earlier_checkpoints_whole(
    place: Place, staging: Path, tmp_path: Path
) -> None:
    first = images_of()
    m1 = commit(place.store, staging, "c1", first)
    folder = place.store.dump_dir("c2", Compression.zstd, staging)
    for name, data in {**changed(first, 0, 24 * MiB), "core-1.img": noise(1000)}.items():  # core-1 first
        (folder / name).write_bytes(data)
    env = {**os.environ, FAILPOINT: "dump:store", "PYTHONPATH": str(Path(__file__).parent)}
    crashed = subprocess.run([sys.executable, "-c", CRASH, place.store.url, str(folder)], env=env, check=False)
    assert crashed.returncode == -9  # killed once the first image's chunks were stored, before the manifest
    orphans = set(place.objects()) - stored(m1)
    assert orphans, "the crash left chunks that nothing lists"
    assert [m.checkpoint for m in place.store.list()] == ["c1"]
    assert fetched(place.store, "c1", tmp_path / "r1") == first
    assert place.store.sweep() == 0, "the dead dump's pending record still holds"
    assert place.store.discard("c2")  # what recovery does for a dump whose process died
    assert place.store.sweep() == len(orphans)
    assert set(place.objects()) == stored(m1)
    assert fetched(place.store, "c1", tmp_path / "r1b") == first


def test_a_corrupted_or_missing_chunk_is_refused(place: Place, staging: Path, tmp_path: Path) -> None:
    m1 = commit(place.store, staging, "c1", images_of())
    image = next(f for f in m1.files if f.name == "pages-1.img")
    index, chunk = 1, image.chunks[1]
    fs, path = place.store.fs, str(place.raw_chunk(chunk_name(chunk.digest, m1.digest)))
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(path, bytes(data))
    with pytest.raises(CorruptCheckpoint, match=f"chunk {index} of pages-1.img is corrupted"):
        place.store.fetch("c1", tmp_path / "r1")
    fs.rm(path)
    with pytest.raises(CorruptCheckpoint, match=f"chunk {index} of pages-1.img is missing"):
        place.store.fetch("c1", tmp_path / "r2")


def test_encrypted_chunks_dedup_under_keyed_addresses(place: Place, staging: Path, tmp_path: Path) -> None:
    first = images_of()
    m1 = commit(place.store, staging, "c1", first, key=KEY)
    second = changed(first, 12 * MiB, 2 * MiB)
    m2 = commit(place.store, staging, "c2", second, key=KEY, parent="c1")
    assert m2.encryption == "aes-256-gcm" and 1 <= len(stored(m2) - stored(m1)) <= 3
    pieces = [first["pages-1.img"][c.offset : c.offset + c.size] for c in m1.files[2].chunks]
    plain = {h(p).hexdigest() for p in pieces for h in (hashlib.sha256, blake3.blake3)}
    raw_manifest = place.store.fs.cat_file(f"{place.store.path('c1')}/{MANIFEST}").decode()
    assert m1.files[2].name == "pages-1.img" and not any(h in raw_manifest for h in plain), "no plaintext hash"
    assert fetched(place.store, "c2", tmp_path / "r2", key=KEY) == second
    with pytest.raises(UsageError, match="wrong key"):
        place.store.fetch("c2", tmp_path / "r3", key=bytes(32))
    m3 = commit(place.store, staging, "c3", first, parent="c1")  # in the clear: it shares nothing with them
    assert not stored(m3) & (stored(m1) | stored(m2))
    place.store.delete("c1")
    assert fetched(place.store, "c2", tmp_path / "r4", key=KEY) == second


def test_the_signature_covers_every_chunk_address(place: Place, staging: Path) -> None:
    commit(place.store, staging, "c1", images_of(4 * MiB))
    path = f"{place.store.path('c1')}/{MANIFEST}"
    body = json.loads(place.store.fs.cat_file(path))
    body["files"][0]["chunks"][0]["address"] = "0" * 64
    place.store.fs.pipe_file(path, json.dumps(body).encode())
    with pytest.raises(UntrustedCheckpoint, match="altered"):
        place.store.manifest("c1")


def test_checkpoints_of_the_per_checkpoint_layouts_stay_readable(
    place: Place, staging: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = images_of(6 * MiB)
    monkeypatch.setenv(DEDUP_ENV, "0")  # as this store's checkpoints were written before
    m_old = commit(place.store, staging, "old", old)
    monkeypatch.delenv(DEDUP_ENV)
    assert m_old.layout in (Layout.file, Layout.chunks) and place.objects() == {}
    m_new = commit(place.store, staging, "new", old, parent="old")  # an old layout: nothing to reuse
    assert m_new.layout is Layout.cas
    assert fetched(place.store, "old", tmp_path / "r1") == old
    place.store.delete("new")
    assert place.objects() == {} and fetched(place.store, "old", tmp_path / "r2") == old


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
def test_sha256_checkpoints_stay_readable_and_keep_their_chunks(
    place: Place, staging: Path, tmp_path: Path, key: bytes | None
) -> None:
    """cas checkpoints made before BLAKE3 (written here the old way: a store that hashes with
    sha256) keep their chunks at the top of .chunks; BLAKE3 ones, in .chunks/blake3, do not
    reuse them (the first BLAKE3 dump stores everything again), and sweeps keep both."""
    first, second = images_of(), changed(images_of(), 0, 2 * MiB)
    old_store = CheckpointStore(place.store.url, SIGNER, digest=Digest.sha256)
    m1 = commit(old_store, staging, "c1", first, key=key)
    assert m1.digest is Digest.sha256 and all("/" not in name for name in stored(m1))
    m2 = commit(place.store, staging, "c2", second, key=key, parent="c1")
    assert m2.digest is Digest.blake3 and all(name.startswith("blake3/") for name in stored(m2))
    assert not addresses(m1) & addresses(m2), "no reuse across digests"
    assert set(place.objects()) == stored(m1) | stored(m2)
    assert place.store.sweep() == 0, "every chunk is in use"
    assert fetched(place.store, "c1", tmp_path / "r1", key=key) == first
    place.store.delete("c2")
    assert set(place.objects()) == stored(m1), "the sha256 chunks stay while c1 uses them"
    assert fetched(place.store, "c1", tmp_path / "r2", key=key) == first
    m3 = commit(place.store, staging, "c3", first, key=key, parent="c1")
    place.store.delete("c1")
    assert set(place.objects()) == stored(m3) and fetched(place.store, "c3", tmp_path / "r3", key=key) == first
    m4 = commit(old_store, staging, "c4", first, key=key)
    chunk = m4.files[2].chunks[1]
    path = str(place.raw_chunk(chunk_name(chunk.digest, m4.digest)))
    place.store.fs.pipe_file(path, b"x" * chunk.stored_size)
    with pytest.raises(CorruptCheckpoint, match=r"chunk 1 of pages-1\.img is corrupted \(sha256 mismatch\)"):
        place.store.fetch("c4", tmp_path / "r4", key=key)


def test_young_chunks_outlive_a_sweep(place: Place, staging: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m1 = commit(place.store, staging, "c1", images_of(4 * MiB))
    monkeypatch.setenv(GRACE_ENV, "3600")
    place.store.delete("c1")
    assert set(place.objects()) == stored(m1), "within the grace period nothing is freed"
    assert place.store.sweep(grace=0) == len(stored(m1))


def test_a_stale_pending_record_does_not_block_sweeps_forever(place: Place, staging: Path) -> None:
    commit(place.store, staging, "c1", images_of(4 * MiB))
    fs = place.store.fs
    fs.pipe_file(f"{place.store.root}/{PENDING}/dead", json.dumps({"at": time.time() - 7 * 3600}).encode())
    place.store.delete("c1")
    assert place.objects() == {} and not fs.exists(f"{place.store.root}/{PENDING}/dead")


# -- real CRIU dumps of a real process
CHURN = WORKLOADS / "churn.py"


@pytest.fixture(params=["file", "s3"])
def store_url(request: pytest.FixtureRequest, home: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(GRACE_ENV, "0")
    monkeypatch.setenv(SWEEP_EVERY_ENV, "0")
    if request.param == "file":
        return f"file://{home / 'ckpts'}"
    servers: dict[str, Server] = request.getfixturevalue("servers")
    remote = _remote("s3", servers["s3"], f"b-{os.urandom(4).hex()}")
    for var, value in remote.env.items():
        monkeypatch.setenv(var, value)
    return remote.url


def run_churn(engine: Engine, mib: int) -> str:
    engine.run("process", RunRequest(cmd=[sys.executable, str(CHURN), str(mib)], jid="j1"))
    log = Path(engine.job("j1").log or "")
    wait_for(lambda: log.exists() and "ready" in log.read_text(), what="j1 to fill its memory")
    return log.read_text().split("ready ")[1].split()[0]


@pytest.mark.criu
@pytest.mark.parametrize("encrypt", [False, True])
def test_a_process_dumped_twice_uploads_only_what_changed(engine: Engine, store_url: str, encrypt: bool) -> None:
    run_churn(engine, 128)
    key = {"encrypt": True, "key": KEY} if encrypt else {}
    zstd = Compression.zstd  # a local store's default (none) is not content-addressed
    first = engine.dump("j1", DumpRequest(storage=store_url, leave_running=True, compression=zstd, **key))
    store = engine.store(store_url)
    objects = set(store._chunk_objects())
    m1 = store.manifest(first.checkpoint)
    assert m1.layout is Layout.cas and objects == stored(m1)
    os.kill(engine.job("j1").pid or 0, 10)  # SIGUSR1: the workload rewrites 10% of its buffer
    log = Path(engine.job("j1").log or "")
    wait_for(lambda: "changed " in log.read_text(), what="the workload to change its memory")
    time.sleep(0.5)  # a signal the init forwards may arrive twice: the span is the same, the digest the last
    digest = log.read_text().split("changed ")[-1].split()[0]
    second = engine.dump("j1", DumpRequest(storage=store_url, compression=zstd, **key))
    lines = len(log.read_text().splitlines())
    m2 = store.manifest(second.checkpoint)
    new = set(store._chunk_objects()) - objects
    engine.restore(RestoreRequest(key=KEY if encrypt else None), jid="j1")
    wait_for(lambda: f"check {digest}" in log.read_text().splitlines()[lines:], what="the restored memory")
    assert engine.job("j1").state is JobState.running
    assert new == stored(m2) - stored(m1), "only chunks the store lacked were written"
    is_new = {c: chunk_name(c.digest, m2.digest) in new for f in m2.files for c in f.chunks}
    new_bytes = sum(c.stored_size for c in is_new if is_new[c])
    # 10% of the buffer changed, plus the chunks around it and the interpreter's own: 30% with this content
    where = [(f.name, [(c.offset >> 20, c.size >> 10, is_new[c]) for c in f.chunks]) for f in m2.files]
    assert new_bytes <= 0.35 * m2.size_bytes, f"{new_bytes} of {m2.size_bytes} bytes new: {where}"


@pytest.mark.criu
def test_a_dump_killed_before_its_manifest_leaves_the_last_checkpoint_restorable(
    home: Path, monkeypatch: pytest.MonkeyPatch, own_staging: Path
) -> None:
    monkeypatch.setenv(GRACE_ENV, "0")
    monkeypatch.setenv(SWEEP_EVERY_ENV, "0")
    assert cedana("run", "process", "--jid", "c1", "--local", "--", *COUNTER).returncode == 0
    engine = Engine(Paths(home))
    wait_for(lambda: last_count(engine, "c1") >= 2, what="counting")
    zstd = ("--compression", "zstd")  # a local store's default (none) is not content-addressed
    first = json.loads(cedana("dump", "job", "c1", "--local", "--leave-running", *zstd, "--json").stdout)["checkpoint"]
    monkeypatch.setenv(FAILPOINT, "dump:store")
    killed = cedana("dump", "job", "c1", "--local", *zstd)
    monkeypatch.delenv(FAILPOINT)
    assert killed.returncode == -9, killed.stderr
    wait_for(lambda: cedana("ps", "--local").returncode == 0 and engine.job("c1").state is JobState.running)
    store = engine.store(f"file://{home / 'checkpoints'}")
    assert [m.checkpoint for m in store.list()] == [first]
    store.sweep()  # recovery removed the dead dump's pending record: its chunks go
    assert set(store._chunk_objects()) == stored(store.manifest(first))
    engine.restore(RestoreRequest(checkpoint=first, jid="c2"))
    wait_for(lambda: last_count(engine, "c2") > 0, what="the clone counting")


@pytest.mark.criu
def test_an_old_layout_checkpoint_restores_and_the_next_dump_is_content_addressed(
    engine: Engine, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"file://{home / 'ckpts'}"
    engine.run("process", RunRequest(cmd=COUNTER, jid="j1"))
    wait_for(lambda: last_count(engine, "j1") >= 2, what="counting")
    monkeypatch.setenv(DEDUP_ENV, "0")
    old = engine.dump("j1", DumpRequest(storage=url))
    monkeypatch.delenv(DEDUP_ENV)
    assert engine.store(url).manifest(old.checkpoint).layout is Layout.file
    at = last_count(engine, "j1")
    engine.restore(RestoreRequest(), jid="j1")
    wait_for(lambda: last_count(engine, "j1") > at + 2, what="counting after restoring the old layout")
    new = engine.dump("j1", DumpRequest(storage=url, leave_running=True, compression=Compression.zstd))
    assert engine.store(url).manifest(new.checkpoint).layout is Layout.cas


@pytest.mark.criu
def test_keep_k_frees_the_chunks_only_pruned_checkpoints_used(engine: Engine, store_url: str) -> None:
    run_churn(engine, 32)
    made = []
    for _ in range(3):
        os.kill(engine.job("j1").pid or 0, 10)  # each checkpoint differs from the one before
        request = DumpRequest(storage=store_url, leave_running=True, compression=Compression.zstd)
        made.append(engine.dump("j1", request).checkpoint)
    store = engine.store(store_url)
    everything = set(store._chunk_objects())
    prune(engine, "j1", keep=1)  # what `--checkpoint-every ... --keep 1` runs after each dump
    assert [m.checkpoint for m in store.list()] == made[-1:]
    kept = stored(store.manifest(made[-1]))
    assert set(store._chunk_objects()) == kept and kept < everything


def test_deletes_sweep_at_most_once_a_period(place: Place, staging: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """keep-K deletes one checkpoint per dump; each sweep reads every manifest of the store."""
    monkeypatch.setenv(SWEEP_EVERY_ENV, "3600")
    for ckpt in ("c1", "c2", "c3"):
        commit(place.store, staging, ckpt, images_of(4 * MiB))
    place.store.delete("c1")  # this process's first delete in the store sweeps
    left = place.objects()
    place.store.delete("c2")  # within the period: its chunks stay until a sweep
    assert place.objects() == left
    assert place.store.sweep() > 0 and len(place.objects()) < len(left)


def test_a_dump_reuses_the_nearest_cas_ancestor(
    place: Place, staging: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its parent in another layout (a dump with CEDANA_RAY_DEDUP=0 between): the chunks of
    the parent's own parent are reused."""
    first = images_of()
    m1 = commit(place.store, staging, "c1", first)
    monkeypatch.setenv(DEDUP_ENV, "0")
    assert commit(place.store, staging, "c2", first, parent="c1").layout is not Layout.cas
    monkeypatch.delenv(DEDUP_ENV)
    before = set(place.objects())
    m3 = commit(place.store, staging, "c3", third := changed(first, 6 * MiB, 2 * MiB), parent="c2")
    assert 1 <= len(set(place.objects()) - before) <= 3 and len(stored(m3) & stored(m1)) >= 2
    assert fetched(place.store, "c3", tmp_path / "r3") == third
