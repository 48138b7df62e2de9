"""The one exception hierarchy of cedana-ray.

Every error a user can see is a :class:`CedanaError`; it carries the process exit
code the CLI uses and, where useful, a hint. Errors from subprocesses, CRIU,
fsspec and SQLite are translated at the boundary (``raise ... from exc``)::

    CedanaError (1)
     +-- UsageError (2)                 bad option value, bad name
     +-- NotFoundError (3)
     |    +-- JobNotFound
     |    +-- CheckpointNotFound        unknown id, or no manifest
     |    +-- PluginNotFound
     +-- StateError (4)                 job not running, frozen, dump in progress
     |    +-- Unreachable               a cluster actor (agent, coordinator) is gone or silent
     +-- PermissionDenied (5)           a PID you may not touch
     +-- PrerequisiteError (6)          missing or too old CRIU, missing binary
     +-- CheckpointError (7)
     |    +-- DumpError                 CRIU dump failed (CRIU's own first error line)
     |    +-- RestoreError              CRIU restore failed
     |    +-- CorruptCheckpoint         checksum mismatch, truncated or missing chunk
     |    +-- UntrustedCheckpoint       unsigned or altered manifest, a field that could escape
     |    +-- MigrationError            a live migration's stream failed (the job runs on where it was)
     +-- StorageError (8)               unknown scheme, missing backend, full disk
"""

from __future__ import annotations


class CedanaError(Exception):
    """Base of every cedana-ray error."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def __reduce__(self) -> tuple[object, ...]:
        # keeps the hint when an error crosses a process boundary (a Ray actor call)
        return (type(self), (self.message,), {"hint": self.hint})


class UsageError(CedanaError):
    exit_code = 2


class NotFoundError(CedanaError):
    exit_code = 3


class JobNotFound(NotFoundError):
    pass


class CheckpointNotFound(NotFoundError):
    pass


class PluginNotFound(NotFoundError):
    pass


class StateError(CedanaError):
    exit_code = 4


class Unreachable(StateError):
    pass


class PermissionDenied(CedanaError):
    exit_code = 5


class PrerequisiteError(CedanaError):
    exit_code = 6


class CheckpointError(CedanaError):
    exit_code = 7


class DumpError(CheckpointError):
    pass


class RestoreError(CheckpointError):
    pass


class CorruptCheckpoint(CheckpointError):
    pass


class UntrustedCheckpoint(CheckpointError):
    """A checkpoint that is not ours to restore: unsigned, altered, or crafted to escape."""


class MigrationError(CheckpointError):
    """A live migration failed: the hypervisor's stream, or the target's side of it."""


class StorageError(CedanaError):
    exit_code = 8
