"""`run --working-dir`: what is packed, what is refused, and unpacking once per digest.
(A cluster job that runs in one and is restored elsewhere: tests/test_cluster.py.)"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path

import pytest

from cedana_ray import working_dir
from cedana_ray.errors import CorruptCheckpoint, UsageError
from cedana_ray.requests import RunRequest
from cedana_ray.working_dir import Package, pack, unpack


def zipped(names: dict[str, bytes]) -> Package:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in names.items():
            archive.writestr(name, data)
    data = buffer.getvalue()
    return Package(digest=hashlib.sha256(data).hexdigest(), data=data)


def test_regular_files_travel_links_do_not(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "main.py").write_text("print(1)\n")
    (src / "pkg" / "mod.py").write_text("X = 1\n")
    (src / "passwd").symlink_to("/etc/passwd")
    (src / "etc").symlink_to("/etc")
    copy = unpack(pack(str(src)), tmp_path / "unpacked")
    assert copy.name == pack(str(src)).digest, "the same directory packs the same"
    found = sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file())
    assert found == ["main.py", "pkg/mod.py"]


def test_unpacking_twice_keeps_the_first(tmp_path: Path) -> None:
    package = zipped({"a.txt": b"one"})
    first = unpack(package, tmp_path)
    (first / "made-by-the-job").write_text("")
    assert unpack(package, tmp_path) == first and (first / "made-by-the-job").exists()
    assert [p.name for p in tmp_path.iterdir()] == [package.digest], "no temp dir left"


@pytest.mark.parametrize("name", ["../escape.txt", "/abs.txt", "a/../../escape.txt"])
def test_a_name_outside_the_directory_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(CorruptCheckpoint, match="bad name"):
        unpack(zipped({name: b"x"}), tmp_path / "into")
    assert not (tmp_path / "escape.txt").exists() and os.listdir(tmp_path / "into") == []


def test_a_package_that_does_not_match_its_digest_is_refused() -> None:
    good = zipped({"a": b"1"})
    with pytest.raises(CorruptCheckpoint, match="does not match its digest"):
        Package(digest=good.digest, data=good.data + b"tampered")


def test_too_big_or_missing_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "big.bin").write_bytes(os.urandom(4096))
    monkeypatch.setattr(working_dir, "MAX_PACKAGE", 1024)
    with pytest.raises(UsageError, match="packs to more than"):
        pack(str(tmp_path))
    with pytest.raises(UsageError, match="is not a directory"):
        pack(str(tmp_path / "nowhere"))


def test_a_job_runs_in_its_working_dir_not_another(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="--cwd cannot say otherwise"):
        RunRequest(cmd=["true"], cwd="/tmp", working_dir=zipped({"a": b""}))
