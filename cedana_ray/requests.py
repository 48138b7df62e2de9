"""What each pipeline is asked to do: the ``request`` of its :class:`Context`."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, SecretBytes, model_validator

from .crypto import KEY_BYTES
from .environment import workload_env
from .errors import UsageError
from .models import Compression, CriuOptions, Manifest, Metadata, Name
from .store_write import DEFAULT_STREAMS  # not .store: fsspec is slow to import
from .working_dir import Package


def _check_key(key: SecretBytes) -> SecretBytes:
    if len(key.get_secret_value()) != KEY_BYTES:
        raise UsageError(f"an encryption key has {KEY_BYTES} bytes", hint="load it with cedana_ray.crypto.load_key")
    return key


Key = Annotated[SecretBytes, AfterValidator(_check_key)]  # secret: never in a repr or a dump


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*$", re.IGNORECASE)


def parse_size(value: object) -> object:
    """``4GiB``, ``512M``, ``1.5G`` or a number of bytes (the units are binary, as Ray's memory)."""
    if not isinstance(value, str):
        return value
    found = _SIZE.match(value)
    if not found:
        raise UsageError(f"invalid size {value!r}", hint="e.g. 4GiB, 512MiB or a number of bytes")
    number, unit = float(found[1]), found[2].upper()
    return int(number * 1024 ** "_KMGT".index(unit or "_"))


class Resources(BaseModel):
    """What a cluster job reserves in Ray for its lifetime, on the node it runs on (nothing by default)."""

    cpus: float = Field(0, ge=0)
    gpus: float = Field(0, ge=0)
    memory: Annotated[int, BeforeValidator(parse_size)] = Field(0, ge=0)  # bytes

    def __bool__(self) -> bool:
        return bool(self.cpus or self.gpus or self.memory)

    def ray(self) -> dict[str, float]:
        """The same as Ray names them (resources left at 0 left out)."""
        named = {"CPU": self.cpus, "GPU": self.gpus, "memory": float(self.memory)}
        return {k: v for k, v in named.items() if v}

    def short_of(self, available: dict[str, float]) -> str | None:
        """What ``available`` lacks of these, as ``'1 GPU (0 free)'``, or None if they fit."""
        short = [f"{_amount(k, v)} ({_amount(k, available.get(k, 0))} free)"
                 for k, v in self.ray().items() if available.get(k, 0) < v]  # fmt: skip
        return ", ".join(short) or None

    def __str__(self) -> str:
        return ", ".join(_amount(k, v) for k, v in self.ray().items()) or "nothing"


def _amount(resource: str, value: float) -> str:
    return f"{value / 2**30:.1f} GiB memory" if resource == "memory" else f"{value:g} {resource}"


class RunRequest(BaseModel):
    cmd: list[str] = Field(min_length=1)
    jid: Name | None = None
    cwd: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    # the launcher's whole environment, less its secrets, instead of only PATH, HOME... (cedana_ray.environment)
    inherit_env: bool = False
    # what of its starter's environment the workload gets (see inherit_env), taken where the
    # request is made: on a cluster the caller's, not the node agent's
    base_env: dict[str, str] | None = None
    working_dir: Package | None = None  # packed here, unpacked where the job runs, its cwd there
    gpu_tracing: bool = False
    gpu: bool = False  # needs a GPU: placed where there is one, refused where there is none
    resources: Resources = Resources()  # with a cluster: reserved in Ray while the job runs
    checkpoint_every: float | None = Field(None, gt=0)  # seconds between leave-running dumps
    keep: int | None = Field(None, ge=1)  # how many of those checkpoints to keep
    node: str | None = None  # with a cluster: the node to run on (hostname, IP or id prefix); default: placed
    restore_on_loss: bool = False  # with a cluster: restore from the last checkpoint if the node dies
    encrypt: bool = False  # encrypt every checkpoint of the job (policy, migration, drain... too)
    key: Key | None = None  # with ``encrypt``: its key (default: CEDANA_RAY_KEY; a cluster's own)

    @model_validator(mode="after")
    def _callers_env(self) -> RunRequest:
        if self.working_dir and self.cwd:
            raise UsageError("a job runs in its --working-dir: --cwd cannot say otherwise")
        if self.base_env is None:
            self.base_env = workload_env({}, self.inherit_env)
        return self

    @property
    def needs_gpu(self) -> bool:
        return self.gpu or self.resources.gpus > 0


class ManageRequest(BaseModel):
    target: str  # a PID for `process`, a container id for container runtimes
    jid: Name | None = None
    node: str | None = None  # where the workload runs; default: where the request is made


class DumpRequest(BaseModel):
    leave_running: bool = False
    storage: str | None = None  # store URL; default: CEDANA_RAY_STORAGE or the state dir
    # None: the store's default (none on local disk, zstd where bytes cross a network)
    compression: Compression | None = None
    streams: int = Field(DEFAULT_STREAMS, ge=1, le=64)
    criu: CriuOptions = CriuOptions()
    encrypt: bool = False  # AES-256-GCM per chunk, with ``key``
    key: Key | None = None
    metadata: Metadata = Field(default_factory=dict)  # the user's, kept in the manifest

    @model_validator(mode="after")
    def _key_for_encrypt(self) -> DumpRequest:
        if self.encrypt and self.key is None:
            raise UsageError("--encrypt needs a key", hint="--key-file FILE or CEDANA_RAY_KEY")
        return self

    def encryption_key(self) -> bytes | None:
        """The key to encrypt with, or None for a plain dump."""
        return self.key.get_secret_value() if self.encrypt and self.key else None


class MigrateRequest(DumpRequest):
    """A migration's: its checkpoint's options, and how the job's images travel."""

    store: bool = True  # keep the images as a checkpoint, from the target, once the job runs there
    # dump into the store and restore from it (True), or send the images straight to the target
    # (False); None: whichever copies less (cedana_ray.actors.migration.through_store_by_default)
    through_store: bool | None = None


class RestoreRequest(BaseModel):
    checkpoint: str | None = None  # id in the catalog; default: the job's last
    path: str | None = None  # or a checkpoint URL
    jid: Name | None = None  # restore as a new job (a clone) under this id
    streams: int = Field(DEFAULT_STREAMS, ge=1, le=64)
    key: Key | None = None  # of an encrypted checkpoint
    gpu_map: dict[str, str] = Field(default_factory=dict)  # checkpointed GPU -> GPU here (UUIDs or indexes)
    working_dir: Package | None = None  # the job's, for a node that has not unpacked it yet
    # the manifest at ``path``, as the coordinator read it, so that an agent does not read it
    # again; still verified with the cluster's key (no I/O) before it is used
    manifest: Manifest | None = None

    def decryption_key(self) -> bytes | None:
        return self.key.get_secret_value() if self.key else None
