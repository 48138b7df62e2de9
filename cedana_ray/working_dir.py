"""``run --working-dir DIR``: a directory packed where the job is asked for, unpacked where it runs.

As Ray's ``runtime_env`` ``working_dir``: the caller's directory is zipped (symbolic links
and special files left out) and travels with the request; each node unpacks it once, in a
directory named by its digest at the same path on every node
(:attr:`cedana_ray.config.Paths.working_dirs`), where the job runs. On a cluster the
coordinator keeps the package, so that a node the job moves to later unpacks it too before
the job is restored there: CRIU restores the job's working directory by its path.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

from pydantic import BaseModel, Field, model_validator

from .errors import CorruptCheckpoint, UsageError

PACKAGES = "packages"  # the directory under the coordinator's base where it keeps them
MAX_PACKAGE = 100 << 20  # as Ray's: a working dir holds code and small files, not datasets


class Package(BaseModel):
    """A packed working directory: a zip and its sha256."""

    digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    data: bytes = Field(repr=False)

    @model_validator(mode="after")
    def _intact(self) -> Package:
        if hashlib.sha256(self.data).hexdigest() != self.digest:
            raise CorruptCheckpoint(f"working dir package {self.digest[:12]} does not match its digest")
        return self


def pack(directory: str) -> Package:
    """The regular files under ``directory``, zipped; refused in one line if it is missing or too big."""
    root = Path(directory)
    if not root.is_dir():
        raise UsageError(f"--working-dir {directory} is not a directory")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(_files(root)):
            archive.write(path, path.relative_to(root).as_posix())
            if buffer.tell() > MAX_PACKAGE:
                raise UsageError(
                    f"--working-dir {directory} packs to more than {MAX_PACKAGE >> 20} MiB",
                    hint="package code only; keep data in a bucket or a shared mount",
                )
    data = buffer.getvalue()
    return Package(digest=hashlib.sha256(data).hexdigest(), data=data)


def caller_cwd(cwd: str | None, working_dir: str | None) -> str | None:
    """The ``cwd`` of a job asked for here: the one given, else none with a working dir (the
    job runs in that), else this process's, wherever the job runs."""
    if cwd or not working_dir:
        return os.path.abspath(cwd or os.getcwd())
    return None


def _files(root: Path) -> list[Path]:
    found = []
    for top, dirs, names in os.walk(root):  # does not follow links to directories
        dirs[:] = [d for d in dirs if not (Path(top) / d).is_symlink()]
        found += [p for p in (Path(top) / n for n in names) if p.is_file() and not p.is_symlink()]
    return found


_SAFE_NAME = re.compile(r"^(?!/)(?!.*(^|/)\.\.(/|$))[^\0]+$")


def unpack(package: Package, into: Path) -> Path:
    """``package`` unpacked in ``into/DIGEST`` (once: a directory that exists is complete)."""
    target = into / package.digest
    if target.is_dir():
        return target
    into.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpacking-", dir=into))
    try:
        with zipfile.ZipFile(io.BytesIO(package.data)) as archive:
            for name in archive.namelist():
                if not _SAFE_NAME.match(name):
                    raise CorruptCheckpoint(f"working dir package {package.digest[:12]} holds a bad name {name!r}")
            archive.extractall(tmp)
        os.rename(tmp, target)  # atomic; another node on this machine may have won the race
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def keep(package: Package, base: Path) -> None:
    """Keep ``package`` under ``base`` (the coordinator's), for the nodes a job moves to."""
    directory = base / PACKAGES
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"{package.digest}.zip"
    if not path.exists():  # two runs of one package may keep it at once: each writes its own temp file
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        with os.fdopen(fd, "wb") as out:
            out.write(package.data)
        os.replace(tmp, path)


def kept(digest: str | None, base: Path) -> Package | None:
    """The package :func:`keep` kept under ``digest`` (None for a job without a working dir)."""
    if digest is None:
        return None
    return Package(digest=digest, data=(base / PACKAGES / f"{digest}.zip").read_bytes())


def discard(digest: str, base: Path) -> None:
    """Forget the package kept under ``digest`` (no job uses it any more)."""
    (base / PACKAGES / f"{digest}.zip").unlink(missing_ok=True)
