"""CheckpointStore on a local directory: round trips, integrity checks, ids, failures."""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import json
import mmap
import os
import re
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import blake3
import pytest
from test_process_criu import wait_for

from cedana_ray.cdc import PAGE
from cedana_ray.chunk_store import DEDUP_ENV
from cedana_ray.chunking import DEFAULT_CHUNK, EarlyChunks, bounded_map, hash_chunk, hash_in_place
from cedana_ray.codec import EXTENSIONS
from cedana_ray.errors import CheckpointNotFound, CorruptCheckpoint, StorageError, UntrustedCheckpoint, UsageError
from cedana_ray.models import Compression, CriuOptions, Digest, Manifest
from cedana_ray.registry import filesystem
from cedana_ray.signing import Signer
from cedana_ray.store import MANIFEST, CheckpointStore

CHUNK = 4096
SIGNER = Signer(bytes(range(32)))  # the key of the state dir these stores belong to
# name -> size: empty, exactly one chunk, several chunks with a partial last one, one byte past a chunk
SIZES = {"empty.img": 0, "one-chunk.img": CHUNK, "pages-1.img": 3 * CHUNK + 123, "core-1.img": CHUNK + 1}


def image_bytes(name: str, size: int) -> bytes:
    """Deterministic, partly compressible, partly random content."""
    seed = hashlib.sha256(name.encode()).digest()
    noise = b"".join(hashlib.sha256(seed + i.to_bytes(4, "big")).digest() for i in range(size // 32 + 1))
    pattern = (name.encode() + b"\0") * (size // (len(name) + 1) + 1)
    mixed = bytes(n if i % 128 < 64 else p for i, (n, p) in enumerate(zip(noise, pattern, strict=False)))
    assert len(mixed) >= size
    return mixed[:size]


def manifest_fields(ckpt: str) -> dict[str, Any]:
    return {
        "checkpoint": ckpt,
        "jid": "job-1",
        "type": "process",
        "node": "local",
        "created": datetime.now(UTC),
        "criu_version": "4.2",
        "criu": CriuOptions(),
    }


@pytest.fixture(autouse=True)
def per_checkpoint_layouts(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests are of the per-checkpoint layouts (``file``, ``chunks``), which stay
    readable and are still written on request; tests/test_incremental.py tests ``cas``."""
    monkeypatch.setenv(DEDUP_ENV, "0")


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    return CheckpointStore(f"file://{tmp_path / 'store'}", SIGNER)


@pytest.fixture
def staging(tmp_path: Path) -> Path:
    path = tmp_path / "staging"
    path.mkdir()
    return path


def write_images(images: Path, sizes: dict[str, int] = SIZES) -> dict[str, bytes]:
    contents = {name: image_bytes(name, size) for name, size in sizes.items()}
    for name, data in contents.items():
        (images / name).write_bytes(data)
    return contents


def commit(
    store: CheckpointStore, staging: Path, ckpt: str, compression: Compression, sizes: dict[str, int] = SIZES
) -> tuple[Manifest, dict[str, bytes], Path]:
    images = store.dump_dir(ckpt, compression, staging)
    contents = write_images(images, sizes)
    manifest = store.commit(images, manifest_fields(ckpt), compression=compression, chunk_size=CHUNK, streams=3)
    return manifest, contents, images


def stored_file(store: CheckpointStore, ckpt: str, name: str, compression: Compression) -> Path:
    return Path(store.path(ckpt)) / "data" / f"{name}{EXTENSIONS[compression]}"


# -- round trips


@pytest.mark.parametrize("compression", list(Compression))
def test_commit_fetch_round_trip(
    store: CheckpointStore, staging: Path, tmp_path: Path, compression: Compression
) -> None:
    committed, contents, _ = commit(store, staging, "ckpt-1", compression)
    manifest, restored = store.fetch("ckpt-1", tmp_path / "out", streams=3)
    assert manifest == committed
    assert restored == tmp_path / "out"
    assert sorted(p.name for p in restored.iterdir()) == sorted(contents)
    for name, data in contents.items():
        assert (restored / name).read_bytes() == data, name


@pytest.mark.parametrize("compression", list(Compression))
def test_manifest_describes_the_files(store: CheckpointStore, staging: Path, compression: Compression) -> None:
    manifest, contents, _ = commit(store, staging, "ckpt-1", compression)
    assert manifest.compression is compression and manifest.digest is Digest.blake3
    assert manifest.chunk_size == CHUNK
    assert {f.name: f.size for f in manifest.files} == {n: len(d) for n, d in contents.items()}
    assert manifest.image_bytes == sum(SIZES.values())
    for image in manifest.files:
        stored = stored_file(store, "ckpt-1", image.name, compression).read_bytes()
        expected_chunks = max(1, -(-image.size // CHUNK))
        assert len(image.chunks) == expected_chunks, image.name
        offset = stored_offset = 0
        for chunk in image.chunks:
            assert (chunk.offset, chunk.stored_offset) == (offset, stored_offset)
            assert chunk.size == min(CHUNK, image.size - offset)
            piece = stored[chunk.stored_offset : chunk.stored_offset + chunk.stored_size]
            assert len(piece) == chunk.stored_size
            assert blake3.blake3(piece).hexdigest() == chunk.blake3 and chunk.sha256 is None
            offset += chunk.size
            stored_offset += chunk.stored_size
        assert offset == image.size
        assert stored_offset == len(stored)
    assert manifest.size_bytes == sum(
        stored_file(store, "ckpt-1", f.name, compression).stat().st_size for f in manifest.files
    )
    assert store.manifest("ckpt-1") == manifest


def test_none_hashes_in_place_and_fetch_links(store: CheckpointStore, staging: Path, tmp_path: Path) -> None:
    manifest, contents, images = commit(store, staging, "ckpt-1", Compression.none)
    data_dir = Path(store.path("ckpt-1")) / "data"
    assert images == data_dir
    assert not any(staging.iterdir())
    for image in manifest.files:  # chunks hash the original bytes at their own offsets
        for chunk in image.chunks:
            assert chunk.stored_offset == chunk.offset and chunk.stored_size == chunk.size
    _, restored = store.fetch("ckpt-1", tmp_path / "out")
    for name, data in contents.items():
        link = restored / name
        assert link.is_symlink(), name
        assert Path(os.readlink(link)) == data_dir / name
        assert link.read_bytes() == data


@pytest.mark.parametrize("compression", [Compression.zstd, Compression.lz4, Compression.gzip])
def test_compressed_commit_stages_outside_the_store(
    store: CheckpointStore, staging: Path, compression: Compression
) -> None:
    _, contents, images = commit(store, staging, "ckpt-1", compression)
    assert images == staging / "ckpt-1"
    stored = sorted(p.name for p in (Path(store.path("ckpt-1")) / "data").iterdir())
    assert stored == sorted(f"{n}{EXTENSIONS[compression]}" for n in contents)


def test_progress_reports_bytes(store: CheckpointStore, staging: Path, tmp_path: Path) -> None:
    seen: list[tuple[str, int, int]] = []
    images = store.dump_dir("ckpt-1", Compression.zstd, staging)
    write_images(images)
    store.commit(
        images,
        manifest_fields("ckpt-1"),
        compression=Compression.zstd,
        chunk_size=CHUNK,
        progress=lambda *a: seen.append(a),
    )
    store.fetch("ckpt-1", tmp_path / "out", progress=lambda *a: seen.append(a))
    total = sum(SIZES.values())
    assert [s for s, _, _ in seen] == ["store"] * len(SIZES) + ["fetch"] * len(SIZES)
    assert seen[len(SIZES) - 1][1:] == (total, total)
    assert seen[-1][1:] == (total, total)
    assert all(a[1] <= b[1] for a, b in itertools.pairwise(seen[: len(SIZES)]))


# -- integrity


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("compression", list(Compression))
def test_corrupt_chunk_is_named(
    store: CheckpointStore, staging: Path, tmp_path: Path, compression: Compression
) -> None:
    manifest, _, _ = commit(store, staging, "ckpt-1", compression)
    image = next(f for f in manifest.files if f.name == "pages-1.img")
    chunk = image.chunks[2]
    flip_byte(stored_file(store, "ckpt-1", image.name, compression), chunk.stored_offset + chunk.stored_size // 2)
    with pytest.raises(CorruptCheckpoint) as info:
        store.fetch("ckpt-1", tmp_path / "out")
    assert "pages-1.img" in str(info.value)
    assert "chunk 2 " in str(info.value)


@pytest.mark.parametrize(
    "data",
    [
        bytes(DEFAULT_CHUNK),
        bytes(DEFAULT_CHUNK - 1) + b"\1",
        b"\1" + bytes(DEFAULT_CHUNK - 1),
        bytes(DEFAULT_CHUNK - 1),
        bytes(DEFAULT_CHUNK + 1),
        b"",
        os.urandom(DEFAULT_CHUNK),
    ],
    ids=["zeros", "last-byte-set", "first-byte-set", "short-zeros", "long-zeros", "empty", "random"],
)
def test_zero_chunk_shortcut_is_exact(data: bytes) -> None:
    assert hash_chunk(data, Digest.sha256) == hashlib.sha256(data).hexdigest()
    assert hash_chunk(data, Digest.blake3) == hash_chunk(data) == blake3.blake3(data).hexdigest()


def test_corrupt_zero_chunk_is_named(store: CheckpointStore, staging: Path, tmp_path: Path) -> None:
    """A chunk of zeros takes the precomputed digest, and a flipped byte in it is still caught."""
    images = store.dump_dir("ckpt-1", Compression.none, staging)
    (images / "pages-1.img").write_bytes(os.urandom(DEFAULT_CHUNK) + bytes(2 * DEFAULT_CHUNK))
    manifest = store.commit(images, manifest_fields("ckpt-1"), compression=Compression.none)
    chunk = manifest.files[0].chunks[1]
    assert chunk.blake3 == blake3.blake3(bytes(DEFAULT_CHUNK)).hexdigest()
    flip_byte(stored_file(store, "ckpt-1", "pages-1.img", Compression.none), chunk.stored_offset + 4096)
    with pytest.raises(CorruptCheckpoint, match=r"chunk 1 of pages-1\.img"):
        store.fetch("ckpt-1", tmp_path / "out")


@pytest.mark.parametrize("compression", list(Compression))
def test_a_sha256_checkpoint_made_before_blake3_stays_readable(
    store: CheckpointStore, staging: Path, tmp_path: Path, compression: Compression
) -> None:
    """Checkpoints made before BLAKE3 list sha256 digests. Written here the old way (by a
    store that hashes with sha256), today's store reads, verifies and refuses them as before."""
    old = CheckpointStore(store.url, SIGNER, digest=Digest.sha256)
    manifest, contents, _ = commit(old, staging, "old", compression)
    raw = json.loads((Path(store.path("old")) / MANIFEST).read_text())
    assert "digest" not in raw, "a sha256 manifest has the form of before (what its signature covers)"
    keys = {frozenset(c) for f in raw["files"] for c in f["chunks"]}
    assert keys == {frozenset({"offset", "size", "stored_offset", "stored_size", "sha256"})}
    read, restored = store.fetch("old", tmp_path / "out")
    assert read == manifest and read.digest is Digest.sha256
    assert {p.name: p.read_bytes() for p in restored.iterdir()} == contents
    chunk = next(f for f in manifest.files if f.name == "pages-1.img").chunks[1]
    assert (
        chunk.sha256
        == hashlib.sha256(
            stored_file(store, "old", "pages-1.img", compression).read_bytes()[
                chunk.stored_offset : chunk.stored_offset + chunk.stored_size
            ]
        ).hexdigest()
    )
    flip_byte(stored_file(store, "old", "pages-1.img", compression), chunk.stored_offset + 1)
    with pytest.raises(CorruptCheckpoint, match=r"chunk 1 of pages-1\.img is corrupted \(sha256 mismatch\)"):
        store.fetch("old", tmp_path / "out2")
    commit(store, staging, "new", compression)
    raw = json.loads((Path(store.path("new")) / MANIFEST).read_text())
    assert raw["digest"] == "blake3" and all("sha256" not in c for f in raw["files"] for c in f["chunks"])


def test_a_dump_without_compression_gets_its_stores_default(store: CheckpointStore, staging: Path) -> None:
    """None on local disk (CRIU writes into the store, a restore reads in place), zstd where
    bytes cross a network; an explicit compression always wins."""
    assert store.compression_for(None) is Compression.none
    assert CheckpointStore("memory://bucket/ckpts", SIGNER).compression_for(None) is Compression.zstd
    assert all(store.compression_for(c) is c for c in Compression)
    images = store.dump_dir("ckpt-1", None, staging)
    assert images == Path(store.path("ckpt-1")) / "data", "CRIU writes straight into the store"
    write_images(images)
    assert store.commit(images, manifest_fields("ckpt-1"), compression=None).compression is Compression.none


@pytest.mark.parametrize("compression", list(Compression))
def test_truncated_file_is_corrupt(
    store: CheckpointStore, staging: Path, tmp_path: Path, compression: Compression
) -> None:
    commit(store, staging, "ckpt-1", compression)
    path = stored_file(store, "ckpt-1", "pages-1.img", compression)
    os.truncate(path, path.stat().st_size - 10)
    with pytest.raises(CorruptCheckpoint, match=re.escape("pages-1.img")):
        store.fetch("ckpt-1", tmp_path / "out")


@pytest.mark.parametrize("compression", list(Compression))
@pytest.mark.parametrize("name", ["pages-1.img", "empty.img"])
def test_missing_data_file_is_corrupt(
    store: CheckpointStore, staging: Path, tmp_path: Path, compression: Compression, name: str
) -> None:
    commit(store, staging, "ckpt-1", compression)
    stored_file(store, "ckpt-1", name, compression).unlink()
    with pytest.raises(CorruptCheckpoint, match=re.escape(name)):
        store.fetch("ckpt-1", tmp_path / "out")


def test_unreadable_manifest_is_refused(store: CheckpointStore, staging: Path) -> None:
    commit(store, staging, "ckpt-1", Compression.lz4)
    (Path(store.path("ckpt-1")) / MANIFEST).write_text("{not json")
    with pytest.raises(UntrustedCheckpoint, match="ckpt-1: invalid manifest"):
        store.manifest("ckpt-1")
    assert store.list() == []


# -- listing and deleting


def test_list_needs_a_manifest(store: CheckpointStore, staging: Path) -> None:
    commit(store, staging, "ckpt-1", Compression.zstd)
    (Path(store.path("ckpt-2")) / "data").mkdir(parents=True)  # images but no manifest
    assert [m.checkpoint for m in store.list()] == ["ckpt-1"]
    with pytest.raises(CheckpointNotFound, match="ckpt-2"):
        store.manifest("ckpt-2")


def test_list_is_sorted_by_creation(store: CheckpointStore, staging: Path) -> None:
    for ckpt in ("ckpt-b", "ckpt-a", "ckpt-c"):
        commit(store, staging, ckpt, Compression.lz4, {"core-1.img": 10})
    assert [m.checkpoint for m in store.list()] == ["ckpt-b", "ckpt-a", "ckpt-c"]


def test_list_of_a_missing_store_is_empty(tmp_path: Path) -> None:
    assert CheckpointStore(f"file://{tmp_path / 'nowhere'}", SIGNER).list() == []


@pytest.mark.parametrize("stray", [".hidden", "notes.txt"])
def test_list_skips_stray_entries(store: CheckpointStore, staging: Path, stray: str) -> None:
    commit(store, staging, "ckpt-1", Compression.zstd)
    if stray.startswith("."):
        (Path(store.root) / stray).mkdir()
    else:
        (Path(store.root) / stray).write_text("not a checkpoint")
    assert [m.checkpoint for m in store.list()] == ["ckpt-1"]


def test_manifest_of_a_stray_file_is_not_found(store: CheckpointStore) -> None:
    Path(store.root).mkdir(parents=True)
    (Path(store.root) / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointNotFound):
        store.manifest("notes.txt")


@pytest.mark.parametrize("compression", [Compression.zstd, Compression.none])
def test_discard_removes_everything(store: CheckpointStore, staging: Path, compression: Compression) -> None:
    commit(store, staging, "ckpt-1", compression)
    store.discard("ckpt-1")
    assert not Path(store.path("ckpt-1")).exists()
    assert store.list() == []
    store.discard("ckpt-1")  # nothing left: still fine


def test_delete(store: CheckpointStore, staging: Path) -> None:
    commit(store, staging, "ckpt-1", Compression.gzip)
    commit(store, staging, "ckpt-2", Compression.gzip)
    store.delete("ckpt-1")
    assert not Path(store.path("ckpt-1")).exists()
    assert [m.checkpoint for m in store.list()] == ["ckpt-2"]
    with pytest.raises(CheckpointNotFound):
        store.delete("ckpt-1")


def test_delete_unknown(store: CheckpointStore) -> None:
    with pytest.raises(CheckpointNotFound, match="nope"):
        store.delete("nope")


@pytest.mark.parametrize("ckpt", ["../x", "a/b", ".hidden", "", "..", "x/../../y"])
@pytest.mark.parametrize("method", ["path", "manifest", "delete", "discard"])
def test_invalid_ids_are_refused(store: CheckpointStore, ckpt: str, method: str) -> None:
    with pytest.raises(UsageError, match="invalid checkpoint id"):
        getattr(store, method)(ckpt)


def test_invalid_id_in_fetch(store: CheckpointStore, tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        store.fetch("../x", tmp_path / "out")


def test_unknown_scheme(tmp_path: Path) -> None:
    with pytest.raises(StorageError) as info:
        CheckpointStore("nosuchscheme://bucket/ckpts")
    assert "nosuchscheme" in str(info.value)
    assert info.value.hint is not None
    assert "file" in info.value.hint.split(", ")


# -- failed commits


@pytest.mark.parametrize("compression", [Compression.zstd, Compression.none])
def test_commit_with_bad_manifest_leaves_nothing(
    store: CheckpointStore, staging: Path, compression: Compression
) -> None:
    images = store.dump_dir("ckpt-1", compression, staging)
    write_images(images)
    fields = manifest_fields("ckpt-1")
    del fields["criu_version"]
    with pytest.raises(ValueError, match="criu_version"):
        store.commit(images, fields, compression=compression, chunk_size=CHUNK)
    assert store.list() == []
    assert not Path(store.path("ckpt-1")).exists()
    with pytest.raises(CheckpointNotFound):
        store.manifest("ckpt-1")


def test_commit_with_image_vanishing_midway_leaves_nothing(store: CheckpointStore, staging: Path) -> None:
    images = store.dump_dir("ckpt-1", Compression.zstd, staging)
    write_images(images)
    names = sorted(SIZES)

    def remove_the_next(stage: str, done: int, total: int) -> None:
        (images / names[1]).unlink(missing_ok=True)

    with pytest.raises(StorageError, match="ckpt-1"):
        store.commit(images, manifest_fields("ckpt-1"), compression=Compression.zstd, progress=remove_the_next)
    assert store.list() == []
    assert not Path(store.path("ckpt-1")).exists()


def test_dump_dir_refuses_an_existing_checkpoint(store: CheckpointStore, staging: Path) -> None:
    commit(store, staging, "ckpt-1", Compression.none)
    with pytest.raises(FileExistsError):
        store.dump_dir("ckpt-1", Compression.none, staging)


# -- bounded_map


def test_bounded_map_keeps_order_and_window() -> None:
    window = 3
    lock = threading.Lock()
    outstanding = peak = 0

    def items() -> Any:
        nonlocal outstanding, peak
        for i in range(40):
            with lock:
                outstanding += 1  # submitted, result not yet consumed
                peak = max(peak, outstanding)
            yield i

    def work(i: int) -> int:
        time.sleep(0.001 * ((i * 7) % 5))  # finish out of order
        return i * i

    results = []
    with ThreadPoolExecutor(8) as pool:
        for r in bounded_map(pool, work, items(), window):
            with lock:
                outstanding -= 1
            results.append(r)
    assert results == [i * i for i in range(40)]
    assert 1 <= peak <= window


def test_bounded_map_is_lazy() -> None:
    consumed: list[int] = []

    def items() -> Any:
        for i in range(100):
            consumed.append(i)
            yield i

    with ThreadPoolExecutor(2) as pool:
        gen = bounded_map(pool, lambda i: i, items(), 4)
        assert next(gen) == 0
        assert len(consumed) <= 4
        assert list(gen) == list(range(1, 100))


def test_bounded_map_reraises_in_order() -> None:
    def work(i: int) -> int:
        if i == 5:
            raise KeyError(i)
        return i

    got = []
    with ThreadPoolExecutor(4) as pool, pytest.raises(KeyError):
        for r in bounded_map(pool, work, range(10), 3):
            got.append(r)
    assert got == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("remote", [False, True], ids=["hashed in place", "uploaded to an object store"])
def test_chunks_are_handled_while_a_file_grows(tmp_path: Path, remote: bool) -> None:
    """Chunks hashed (in place) or uploaded (object store) while CRIU was still writing the
    file are those of the final file; commit() only handles the rest."""
    url = f"memory://early-{tmp_path.name}" if remote else f"file://{tmp_path / 'store'}"
    compression = Compression.zstd if remote else Compression.none
    store = CheckpointStore(url, SIGNER)
    images = store.dump_dir("ckpt-p", compression, tmp_path / "staging")
    data = os.urandom(10 * 4096 + 123)
    with (
        store.early_chunks(images, "ckpt-p", compression, chunk_size=4096) as early,
        (images / "pages-1.img").open("wb") as f,
    ):
        for off in range(0, len(data), 1000):  # a slow, sequential writer, like CRIU
            f.write(data[off : off + 1000])
            f.flush()
            time.sleep(0.002)
        time.sleep(0.05)
    assert early is not None and len(early.chunks["pages-1.img"]) == 10, "full chunks were done during the write"
    manifest = {
        "checkpoint": "ckpt-p",
        "jid": "j",
        "type": "process",
        "node": "local",
        "created": datetime.now(UTC),
        "criu_version": "4.2",
        "criu": CriuOptions(),
    }
    got = store.commit(images, manifest, compression=compression, chunk_size=4096, prehashed=early)
    assert [c.offset for c in got.files[0].chunks] == [i * 4096 for i in range(11)]
    _, fetched = store.fetch("ckpt-p", tmp_path / "out")  # verifies every chunk
    assert (fetched / "pages-1.img").read_bytes() == data


def test_stopping_early_chunks_keeps_the_chunks_in_flight(tmp_path: Path) -> None:
    """CRIU ends while chunks are still uploading: those finish and count, none is done twice."""
    (tmp_path / "pages-1.img").write_bytes(os.urandom(256 * 4096))
    calls: list[int] = []

    def slow(path: Path, index: int, off: int, size: int) -> Any:
        calls.append(index)
        time.sleep(0.02)
        return hash_in_place(path, index, off, size)

    with EarlyChunks(tmp_path, slow, chunk_size=4096, streams=4) as early:
        wait_for(lambda: len(calls) >= 6, what="some chunks started")
    done = early.chunks["pages-1.img"]
    assert 6 <= len(done) < 256, "stopped before the end"
    assert sorted(calls) == [c.offset // 4096 for c in done], "every chunk started was kept, in order, once"


KPF_DIRTY, KPF_WRITEBACK = 1 << 4, 1 << 8  # linux/kernel-page-flags.h


def unwritten(path: Path) -> float:
    """The share of ``path``'s pages in the page cache that are dirty or being written back,
    from the kernel's own page flags: /proc/self/pagemap gives the frames (to root) of a
    mapping of the file, /proc/kpageflags their flags."""
    pages = path.stat().st_size // PAGE
    with path.open("r+b") as f, mmap.mmap(f.fileno(), pages * PAGE) as mapped:
        start = ctypes.c_char.from_buffer(mapped)
        try:
            base = ctypes.addressof(start) // PAGE
            touched = [mapped[i * PAGE] for i in range(pages)]  # read: the cached pages mapped, none dirtied
            with open("/proc/self/pagemap", "rb") as pagemap, open("/proc/kpageflags", "rb") as kpageflags:
                entries = struct.unpack(f"{pages}Q", os.pread(pagemap.fileno(), pages * 8, base * 8))
                frames = [e & ((1 << 55) - 1) for e in entries if e >> 63]  # present pages
                flags = [struct.unpack("Q", os.pread(kpageflags.fileno(), 8, pfn * 8))[0] for pfn in frames]
        finally:
            del start
    assert len(touched) == pages and len(frames) == pages, "every page of the file was mapped"
    return sum(1 for f in flags if f & (KPF_DIRTY | KPF_WRITEBACK)) / pages


@pytest.mark.parametrize("write_back", [False, True], ids=["left running", "stopping"])
def test_an_in_place_dump_of_a_stopping_job_writes_back_as_it_hashes(tmp_path: Path, write_back: bool) -> None:
    """Its commit's fsync then has only the tail to wait for. The kernel by itself writes
    back no page younger than 30 s while little of memory is dirty."""
    if filesystem(tmp_path) == "tmpfs":
        pytest.skip("the temporary directory is on tmpfs, whose pages are never written back")
    store = CheckpointStore(f"file://{tmp_path / 'store'}", SIGNER)
    images = store.dump_dir("a", Compression.none, tmp_path / "staging")
    image, size = images / "pages-1.img", 64 << 20
    with store.early_chunks(images, "a", write_back=write_back) as early:
        image.write_bytes(os.urandom(size))  # as CRIU writes it
        wait_for(lambda: early and len(early.chunks.get(image.name, [])) == size // DEFAULT_CHUNK, what="hashed")
        if write_back:
            wait_for(lambda: unwritten(image) == 0, timeout=10, what="the image written back")
        else:
            assert unwritten(image) > 0.9, "left for the commit's fsync"


def test_early_chunks_only_for_in_place_and_object_store_dumps(tmp_path: Path) -> None:
    store = CheckpointStore(f"file://{tmp_path / 'store'}", SIGNER)
    in_place = store.dump_dir("a", Compression.none, tmp_path / "staging")
    staged = store.dump_dir("b", Compression.zstd, tmp_path / "staging")
    with store.early_chunks(in_place, "a") as p, store.early_chunks(staged, "b", Compression.zstd) as q:
        assert isinstance(p, EarlyChunks) and q is None
