"""A private per-user cache of what this installation holds (its plugins, its commands), so
that a command does not scan every installed distribution or import every plugin to start.

An entry is kept with what it was built from: the environment (sys.prefix), sys.path but its
first entry, the mtime of those directories (installing or removing a distribution changes
its site-packages), and the mtime and size of each file the builder says it read. Any
difference rebuilds it. A cache file that is not ours alone is not read: what it holds
names modules to import. Each environment has its own file, so that two installations used
in turn (a virtualenv and the system's) do not rebuild each other's.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from . import __version__

FORMAT = 1


def directory() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "cedana-ray"


def path(name: str) -> Path:
    """The file of entry ``name`` for this environment."""
    return directory() / f"{name}-{zlib.crc32(sys.prefix.encode()):08x}.json"


def _stat(path: str) -> list[int]:
    try:
        st = os.stat(path)
    except OSError:
        return []
    return [st.st_mtime_ns, st.st_size]


def _built_from() -> list[Any]:
    # not sys.path[0], the script's directory or the working directory: it differs from one
    # way of starting to the next (`cedana-ray`, `python -m cedana_ray.cli`) and files come
    # and go there, while distributions are installed in the others
    rest = sys.path[1:]
    return [FORMAT, __version__, sys.prefix, rest, [_stat(p) for p in rest]]


def _current(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and entry.get("built_from") == _built_from()
        and all(_stat(path) == stat for path, stat in entry.get("files", {}).items())
    )


def _read(path: Path) -> Any:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if st.st_uid != os.getuid() or st.st_mode & 0o022:
                return None
            entry = json.loads(f.read())
    except (OSError, ValueError):
        return None
    return entry["value"] if _current(entry) else None


def _write(path: Path, entry: dict[str, Any]) -> None:
    """Atomically, private; a cache that cannot be written is built again next time."""
    import tempfile  # only here: it imports random, hashlib...

    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(entry, f)
            os.replace(tmp, path)
        except OSError:
            os.unlink(tmp)


def cached(name: str, build: Callable[[], tuple[Any, Iterable[str]]]) -> Any:
    """What ``build`` returns (a JSON value, and the files it was made from), from the cache
    while nothing it was built from changed."""
    file = path(name)
    value = _read(file)
    if value is None:
        built_from = _built_from()  # before building: a change made meanwhile rebuilds next time
        value, files = build()
        _write(file, {"built_from": built_from, "files": {f: _stat(f) for f in sorted(set(files))}, "value": value})
    return value
