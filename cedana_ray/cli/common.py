"""What every command has: ``--json``, ``--local``, and the engine it works with. Light to
import: ``ps`` and ``--help`` import this and no model."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from ..backend import Backend

F = Callable[..., Any]


def common(fn: F) -> F:
    """``--json`` and ``--local`` for every command."""
    fn = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")(fn)
    return click.option("--local", is_flag=True, help="Run on this machine without a cluster.")(fn)


def engine() -> Backend:
    """What this invocation works with, created on first use: the cluster when one is
    known (``up`` was run here, or ``CEDANA_RAY_ADDRESS``/``RAY_ADDRESS`` is set) and
    ``--local`` was not given, else this machine alone."""
    from ..backend import open_backend

    ctx = click.get_current_context()
    root = ctx.find_root()
    if root.obj is None:
        root.obj = open_backend(local=bool(ctx.params.get("local")))
    return root.obj
