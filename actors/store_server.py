"""StoreServer: the cluster's own checkpoint store (``cedana://``), on the head node.

A detached, named actor that keeps files under ``BASE/store`` on the head's disk and
serves them whole or by byte range through Ray, so a cluster with no bucket and no
shared filesystem can still migrate jobs and recover them after a node loss. The
client side is the ``storage/cedana`` plugin's fsspec filesystem.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from cedana_ray.store import fsync_dir

STORE = "cedana-ray-store"


class StoreServer:
    def __init__(self, base: str) -> None:
        os.umask(0o077)  # checkpoints hold process memory: the store's files are its own
        self.root = (Path(base) / "store").resolve()
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _path(self, path: str) -> Path:
        found = (self.root / path.strip("/")).resolve()
        if found != self.root and self.root not in found.parents:
            raise PermissionError(f"{path!r} is outside the store")
        return found

    def cat_file(self, path: str, start: int | None = None, end: int | None = None) -> bytes:
        with open(self._path(path), "rb") as f:
            f.seek(start or 0)
            return f.read() if end is None else f.read(end - (start or 0))

    def pipe_file(self, path: str, data: bytes) -> None:
        """Write a whole file atomically and durably: readers, even after a crash of the
        head, see all of it or none."""
        target = self._path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)

    def ls(self, path: str) -> list[dict[str, object]]:
        folder = self._path(path)
        if not folder.is_dir():
            raise FileNotFoundError(path)
        return [self._info(path.rstrip("/") + "/" + e.name, e) for e in sorted(folder.iterdir())]

    def info(self, path: str) -> dict[str, object]:
        target = self._path(path)
        if not target.exists():
            raise FileNotFoundError(path)
        return self._info(path, target)

    @staticmethod
    def _info(name: str, target: Path) -> dict[str, object]:
        kind = "directory" if target.is_dir() else "file"
        return {"name": name.strip("/"), "type": kind, "size": target.stat().st_size if kind == "file" else 0}

    def makedirs(self, path: str) -> None:
        self._path(path).mkdir(parents=True, exist_ok=True)

    def rm(self, path: str, recursive: bool = False) -> None:
        target = self._path(path)
        if not target.exists():
            raise FileNotFoundError(path)
        if target.is_dir():
            if not recursive:
                raise IsADirectoryError(path)
            shutil.rmtree(target)
        else:
            target.unlink()
