"""The batch template (``cedana_ray/jobs/slurm/cedana-ray.sbatch.tmpl``) and its rendering."""

from __future__ import annotations

import re
import shlex
import sys
from importlib.resources import files
from pathlib import Path

from pydantic import BaseModel, Field

from cedana_ray.errors import UsageError

TEMPLATE = "cedana-ray.sbatch.tmpl"
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")  # not $VAR or {}: the template is bash


class BatchSpec(BaseModel):
    """What ``cedana-ray slurm sbatch`` puts into a batch script."""

    command: list[str] = Field(min_length=1)
    state_root: Path
    nodes: int = Field(1, ge=1)
    warning_s: int = Field(120, ge=1)
    storage: str | None = None
    checkpoint_every: str | None = None
    compression: str | None = None  # None: the store's default (zstd to object stores, none locally)
    object_store_mb: int = Field(256, ge=64)
    job_name: str = "cedana-ray"


def template_text() -> str:
    return (files("cedana_ray.jobs") / "slurm" / TEMPLATE).read_text()


def _values(spec: BatchSpec) -> dict[str, str]:
    up = f" --storage {shlex.quote(spec.storage)}" if spec.storage else ""
    run = f" --checkpoint-every {shlex.quote(spec.checkpoint_every)}" if spec.checkpoint_every else ""
    return {
        "job_name": spec.job_name,
        "nodes": str(spec.nodes),
        "warning": str(spec.warning_s),
        "state_root": str(spec.state_root),
        "storage_text": spec.storage or "the allocation's state dir",
        "command": shlex.join(spec.command),
        "command_text": shlex.join(spec.command).replace("\n", " "),
        "bin_dir": str(Path(sys.executable).parent),  # this cedana-ray and its Python, on every node
        "python": sys.executable,
        "object_store_mb": str(spec.object_store_mb),
        "dump_options": f" --compression {shlex.quote(spec.compression)}" if spec.compression else "",
        "up_options": up,
        "run_options": run,
    }


def render(spec: BatchSpec, text: str | None = None) -> str:
    """The batch script for ``spec`` from ``text`` (default: the installed template)."""
    values = _values(spec)

    def fill(match: re.Match[str]) -> str:
        if match.group(1) not in values:
            raise UsageError(f"the template uses an unknown placeholder {match.group(0)}")
        return values[match.group(1)]

    return _PLACEHOLDER.sub(fill, template_text() if text is None else text)
