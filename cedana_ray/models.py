"""Pydantic models shared by the registry, the manifest, the API and ``--json``."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)

from .errors import CedanaError, UntrustedCheckpoint, UsageError
from .listing import LIVE, row

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(value: str, what: str = "name") -> str:
    """Refuse ids that could escape a directory (``/``, ``..``) or are empty."""
    if not _NAME.match(value) or ".." in value:
        raise UsageError(
            f"invalid {what} {value!r}",
            hint="use letters, digits, '.', '_' and '-', not starting with '.'",
        )
    return value


Name = Annotated[str, AfterValidator(check_name)]
MAX_CHUNK = 1 << 30  # the largest chunk a manifest may declare (the default is 8 MiB)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _one_line(value: str) -> str:
    """Refuse values that would break a line-based file (a CRIU config) or a C string."""
    if any(c in value for c in "\n\r\0"):
        raise ValueError(f"{value!r} holds a line break or NUL")
    return value


OneLine = Annotated[str, AfterValidator(_one_line)]
MAX_METADATA = 4096  # bytes of JSON: a checkpoint's metadata labels it (step, loss), it carries no payload


def _small(metadata: dict[str, Any]) -> dict[str, Any]:
    if len(json.dumps(metadata)) > MAX_METADATA:
        raise ValueError(f"checkpoint metadata takes at most {MAX_METADATA} bytes of JSON")
    return metadata


# a checkpoint's user metadata (`dump --metadata step=1200`, `cedana_ray.checkpoint(metadata=...)`)
Metadata = Annotated[
    # keys travel as `--metadata K=V` (a job's own request, through its supervisor): no `=`, no blanks
    dict[Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^=\s]+$")], str | int | float | bool | None],
    AfterValidator(_small),
]


def _absolute(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f"{path!r} is not an absolute path")
    return path


AbsolutePath = Annotated[OneLine, AfterValidator(_absolute)]
Facts = TypeVar("Facts", bound=BaseModel)


def untrusted(what: str, exc: ValidationError | UsageError) -> UntrustedCheckpoint:
    """One line on why ``what`` (from a checkpoint) is refused."""
    if isinstance(exc, UsageError):  # a name that could escape a directory
        return UntrustedCheckpoint(f"{what}: {exc.message}")
    first = exc.errors()[0]
    return UntrustedCheckpoint(f"{what}: {'.'.join(map(str, first['loc']))}: {first['msg']}")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Compression(StrEnum):
    zstd = "zstd"
    lz4 = "lz4"
    gzip = "gzip"
    none = "none"


class Digest(StrEnum):
    """The hash of a checkpoint's chunks (and, in the cas layout, of their addresses)."""

    sha256 = "sha256"  # checkpoints made before BLAKE3: still read and verified
    blake3 = "blake3"  # new checkpoints: several times sha256's speed per core


class Layout(StrEnum):
    """How a checkpoint's image files are stored."""

    file = "file"  # one file per image, chunks at stored offsets (local stores)
    chunks = "chunks"  # one object per chunk, uploaded and fetched in parallel (object stores)
    cas = "cas"  # content-addressed: chunks named by their digest, shared by checkpoints (cedana_ray.chunk_store)


class JobState(StrEnum):
    running = "running"
    frozen = "frozen"
    checkpointed = "checkpointed"  # dumped and stopped; restorable
    exited = "exited"
    killed = "killed"
    lost = "lost"  # gone without an exit record


LIVE_STATES = tuple(map(JobState, LIVE))


class EventKind(StrEnum):
    started = "started"
    adopted = "adopted"  # `manage`
    checkpointed = "checkpointed"
    restored = "restored"
    migrated = "migrated"
    drained = "drained"  # migrated off a node being drained
    killed = "killed"
    exited = "exited"
    lost = "lost"
    failed = "failed"  # a dump, restore or migration that did not happen; the job is as it was
    deleted = "deleted"


class Event(BaseModel):
    """One entry of a job's history (``cedana-ray events``)."""

    id: int = 0  # its place in the history, from 1
    jid: str
    kind: EventKind
    at: datetime = Field(default_factory=utcnow)
    detail: dict[str, Any] = Field(default_factory=dict)  # checkpoint, size_bytes, node, source, target, error...


class Job(BaseModel):
    """A workload under cedana-ray."""

    jid: Name
    type: str
    state: JobState
    pid: int | None = None
    node: str = "local"
    last_checkpoint: str | None = None
    exit_code: int | None = None
    command: list[str] = Field(default_factory=list)
    managed: bool = False  # adopted with `manage`, not started by us
    log: str | None = None
    created: datetime = Field(default_factory=utcnow)
    details: dict[str, Any] = Field(default_factory=dict)  # plugin-owned facts

    @property
    def target(self) -> str:
        """What users name the workload by in ``<verb> <type> TARGET``: the id a plugin
        recorded in ``details["target"]`` (a container id), else the PID."""
        return str(self.details.get("target", self.pid))

    def summary(self) -> dict[str, Any]:
        """The keys of ``run``/``manage``/``restore`` ``--json``."""
        return self.model_dump(mode="json", include={"jid", "type", "pid", "node", "state"})

    def row(self) -> dict[str, Any]:
        """The keys of ``ps --json``."""
        return row(self.model_dump(mode="json"))


class CriuOptions(BaseModel):
    """CRIU options a dump was made with; restore must use the same."""

    model_config = ConfigDict(frozen=True)

    tcp_established: bool = False
    file_locks: bool = False
    shell_job: bool = False
    external: tuple[OneLine, ...] = ()


class Chunk(BaseModel):
    model_config = ConfigDict(frozen=True)

    offset: int = Field(ge=0)  # in the original file
    size: int = Field(ge=0, le=MAX_CHUNK)  # original bytes
    stored_offset: int = Field(ge=0)  # in the stored object
    stored_size: int = Field(ge=0, le=2 * MAX_CHUNK)
    # Of the stored bytes, under the manifest's digest: exactly one of the two is set.
    sha256: str | None = Field(default=None, pattern=_SHA256.pattern)
    blake3: str | None = Field(default=None, pattern=_SHA256.pattern)
    # Layout.cas: what dedups, the same hash of the original bytes (keyed when encrypted)
    address: str | None = Field(default=None, pattern=_SHA256.pattern)

    @classmethod
    def hashed(cls, algorithm: Digest, digest: str, **fields: Any) -> Chunk:
        """A chunk whose stored bytes hash to ``digest`` under ``algorithm``."""
        return cls(**fields, **{algorithm.value: digest})

    @property
    def digest(self) -> str:
        """The hash of the stored bytes, under the one algorithm this chunk names."""
        return self.blake3 or self.sha256 or ""

    @model_validator(mode="after")
    def _one_digest(self) -> Chunk:
        if (self.sha256 is None) == (self.blake3 is None):
            raise ValueError("a chunk has exactly one digest: sha256 or blake3")
        return self

    @model_serializer(mode="wrap")
    def _without_absent_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # A manifest's signature covers its JSON form: the chunks of checkpoints made before
        # addresses and blake3 existed must serialize as they did, or their signatures stop
        # verifying.
        data: dict[str, Any] = handler(self)
        for name in ("address", "sha256", "blake3"):
            if data.get(name, "") is None:
                del data[name]
        return data


class ImageFile(BaseModel):
    """One image file: its chunks cover it exactly, in order."""

    model_config = ConfigDict(frozen=True)

    name: Name  # a plain file name: nothing absolute, no '/' or '..'
    size: int = Field(ge=0)
    chunks: tuple[Chunk, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _chunks_cover_the_file(self) -> ImageFile:
        offset = 0
        for chunk in self.chunks:
            if chunk.offset != offset:
                raise ValueError(f"image {self.name}: chunk at offset {chunk.offset}, expected {offset}")
            offset += chunk.size
        if offset != self.size:
            raise ValueError(f"image {self.name}: chunks hold {offset} bytes, the file {self.size}")
        return self


class Manifest(BaseModel):
    """What makes a directory of images a checkpoint; written last."""

    model_config = ConfigDict(frozen=True)

    format: int = 1
    checkpoint: Name
    jid: Name
    type: Name
    node: Name
    created: datetime
    compression: Compression
    chunk_size: int = Field(ge=1, le=MAX_CHUNK)
    criu_version: OneLine
    criu: CriuOptions
    files: tuple[ImageFile, ...]
    parent: Name | None = None
    details: dict[str, Any] = Field(default_factory=dict)  # plugin facts for restore; each plugin checks its own
    metadata: Metadata = Field(default_factory=dict)  # the user's
    layout: Layout = Layout.file
    encryption: str | None = None  # "aes-256-gcm" when the chunks are encrypted
    key_fingerprint: str | None = None  # of the key they were encrypted with; never the key
    digest: Digest = Digest.sha256  # of the chunks; absent from manifests made before blake3
    signatures: dict[str, str] = Field(default_factory=dict)  # signing key id -> MAC (cedana_ray.signing)

    @model_serializer(mode="wrap")
    def _as_before_blake3(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # sha256 manifests serialize as they did before the field existed (their signatures)
        data: dict[str, Any] = handler(self)
        if data.get("digest") == Digest.sha256:
            del data["digest"]
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        names = [f.name for f in self.files]
        if len(set(names)) != len(names):
            raise ValueError("an image file is listed twice")
        stored_at_offsets = self.layout is Layout.file
        for image in self.files:
            stored = 0
            for chunk in image.chunks:
                if getattr(chunk, self.digest.value) is None:
                    raise ValueError(f"image {image.name}: a chunk lacks the manifest's {self.digest} digest")
                if (chunk.address is None) == (self.layout is Layout.cas):
                    raise ValueError(f"image {image.name}: chunk addresses belong to the cas layout alone")
                if chunk.size > self.chunk_size:
                    raise ValueError(f"image {image.name}: a chunk is larger than chunk_size")
                if chunk.stored_offset != (stored if stored_at_offsets else 0):
                    raise ValueError(f"image {image.name}: a chunk is stored at the wrong offset")
                stored += chunk.stored_size
        return self

    def facts(self, model: type[Facts]) -> Facts:
        """The plugin facts in ``details`` that ``model`` describes, checked: a plugin reads
        its details through this, never raw, since a checkpoint is untrusted input."""
        try:
            return model.model_validate(self.details)
        except (ValidationError, UsageError) as exc:
            raise untrusted(f"checkpoint {self.checkpoint}: invalid details", exc) from exc

    @property
    def size_bytes(self) -> int:
        return sum(c.stored_size for f in self.files for c in f.chunks)

    @property
    def image_bytes(self) -> int:
        return sum(f.size for f in self.files)


class CheckpointInfo(BaseModel):
    """One row of ``checkpoint list``."""

    checkpoint: str
    jid: str
    path: str
    size_bytes: int
    created: datetime
    metadata: Metadata = Field(default_factory=dict)

    @classmethod
    def of(cls, manifest: Manifest, path: str) -> CheckpointInfo:
        """The catalog entry of the checkpoint ``manifest`` describes, stored at ``path``."""
        return cls(
            checkpoint=manifest.checkpoint,
            jid=manifest.jid,
            path=path,
            size_bytes=manifest.size_bytes,
            created=manifest.created,
            metadata=manifest.metadata,
        )


class DumpResult(BaseModel):
    jid: str
    checkpoint: str
    path: str
    size_bytes: int
    image_bytes: int
    created: datetime  # the manifest's
    metadata: Metadata = Field(default_factory=dict)
    duration_s: float
    timings: dict[str, float] = Field(default_factory=dict)

    def info(self) -> CheckpointInfo:
        """The catalog entry of the checkpoint made."""
        return CheckpointInfo(
            checkpoint=self.checkpoint,
            jid=self.jid,
            path=self.path,
            size_bytes=self.size_bytes,
            created=self.created,
            metadata=self.metadata,
        )


class RestoreResult(BaseModel):
    """A restore: the job now running, and what it took."""

    job: Job
    checkpoint: str
    duration_s: float
    timings: dict[str, float] = Field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The keys of ``restore --json``: the job's, plus the checkpoint and timings."""
        return {**self.job.summary(), **self.model_dump(mode="json", exclude={"job"})}


class NodeStatus(BaseModel):
    """A node of the cluster as its agent reports it (``nodes --json``)."""

    node: str
    hostname: str = ""
    alive: bool = True
    draining: bool = False
    pid: int | None = None  # the agent's
    types: list[str] = Field(default_factory=list)  # job types it can restore
    live_jobs: int = 0
    cpus: int = 0
    memory_available: int = 0
    gpus: float = 0  # Ray's GPU resource of the node (detected, or declared with --num-gpus)
    error: str | None = None  # why the agent did not answer


class MigrateResult(BaseModel):
    """A migration (``migrate --json``): where the job went and what each step took."""

    jid: str
    source: str
    target: str
    checkpoint: str | None  # the checkpoint kept of the migration, if one was (``migrate --no-store``: none)
    # how the job went: its images "direct" from node to node, or through the "store"; or
    # "live", by its hypervisor's own migration while it ran (a VM; no checkpoint)
    route: str = "store"
    dump_s: float
    restore_s: float
    duration_s: float
    downtime_s: float  # from the job's freeze (or stop) on the source to its resume on the target
    job: Job


class HealthCheck(BaseModel):
    """One prerequisite of a plugin, as `check` shows it."""

    name: str
    ok: bool
    detail: str = ""
    # A failed fatal check fails `cedana-ray check`; any failed check makes the plugin's
    # features incompatible. Optional hardware (a GPU) is checked with fatal=False.
    fatal: bool = True

    @classmethod
    def probe(cls, name: str, detail: Callable[[], str], fatal: bool = True) -> HealthCheck:
        """Passed with ``detail()``, or failed with the error it raised."""
        try:
            return cls(name=name, ok=True, detail=detail(), fatal=fatal)
        except CedanaError as exc:
            return cls(name=name, ok=False, detail=str(exc), fatal=fatal)
