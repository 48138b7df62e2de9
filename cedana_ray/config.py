"""Where cedana-ray keeps its state, from the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

RAY_AUTH_MODE = "RAY_AUTH_MODE"  # Ray's own switch of its token authentication (see cedana_ray.auth)


@dataclass(frozen=True)
class Paths:
    """The state directory (``CEDANA_RAY_HOME``) and what lives in it."""

    home: Path
    # A directory at the same path on every node of a cluster (its base; default: home): jobs'
    # control dirs (see cedana_ray.inside) and working dirs live there, so that a job finds
    # its own after a migration.
    shared: Path | None = None

    @property
    def db(self) -> Path:
        return self.home / "state.db"

    @property
    def jobs(self) -> Path:
        return self.home / "jobs"

    @property
    def staging(self) -> Path:
        return self.home / "staging"

    @property
    def locks(self) -> Path:
        return self.home / "locks"

    @property
    def signing_key(self) -> Path:
        """The key that signs this state dir's checkpoints (cedana_ray.signing)."""
        return self.home / "signing.key"

    @property
    def checkpoints(self) -> Path:
        return self.home / "checkpoints"

    @property
    def storage(self) -> str:
        """Default checkpoint store URL: ``CEDANA_RAY_STORAGE`` or ``checkpoints`` here."""
        return os.environ.get("CEDANA_RAY_STORAGE") or f"file://{self.checkpoints}"

    def job_dir(self, jid: str) -> Path:
        return self.jobs / jid

    def control(self, jid: str) -> Path:
        return (self.shared or self.home) / "control" / jid

    @property
    def working_dirs(self) -> Path:
        """Where ``--working-dir`` packages are unpacked, each in a directory named by its digest."""
        return (self.shared or self.home) / "working_dirs"

    def ensure(self) -> Paths:
        """Create the state dirs, private (0700): they hold process memory and keys."""
        for d in (self.home, self.jobs, self.staging, self.locks, self.checkpoints):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = d.stat()
            if st.st_uid == os.geteuid() and st.st_mode & 0o077:
                d.chmod(0o700)  # made by an earlier version, or under a looser umask
        return self


def paths() -> Paths:
    default = Path.home() / ".local" / "state" / "cedana-ray"
    return Paths(Path(os.environ.get("CEDANA_RAY_HOME", default)).absolute())
