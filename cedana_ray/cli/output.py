"""Everything the CLI prints: JSON documents, rich tables, progress, errors."""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from rich.console import Console

# rich is imported where it prints: JSON output and commands that print nothing need none of it


@functools.cache
def console() -> Console:
    """People's output, on stdout."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 200)


@functools.cache
def err_console() -> Console:
    """Progress and errors, on stderr."""
    from rich.console import Console

    return Console(stderr=True)


def _plain(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):  # a model: asking pydantic which would cost `ps` its import
        return obj.model_dump(mode="json")
    if isinstance(obj, (list, tuple)):
        return [_plain(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def emit_json(obj: Any) -> None:
    """One JSON document on stdout."""
    sys.stdout.write(json.dumps(_plain(obj), indent=2, default=str) + "\n")


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]], title: str | None = None) -> None:
    from rich.table import Table
    from rich.text import Text

    t = Table(*columns, title=title, box=None, header_style="bold")
    for row in rows:
        t.add_row(*(Text("" if v is None else str(v)) for v in row))  # as written: no markup (`cedana-ray[s3]`)
    console().print(t)


def show(as_json: bool, doc: Any, human: Callable[[], None]) -> None:
    """Print ``doc`` as JSON, or call ``human`` to print it for people."""
    if as_json:
        emit_json(doc)
    else:
        human()


QUIET = "cedana_ray.quiet"  # click's context meta: `--quiet`
MIN_STAGE_S = 0.01  # a stage line for less (a lock taken, a check) that moved nothing is noise


@contextmanager
def progress(enabled: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """The progress of a long dump, restore, migration or ``up`` on stderr: a transient bar on
    a terminal, else a line as each stage ends; none unless ``enabled``, or with ``--quiet``."""
    ctx = click.get_current_context(silent=True)
    if not enabled or (ctx and ctx.meta.get(QUIET)):
        yield None
    elif err_console().is_terminal:
        yield from _bar()
    else:
        lines = StageLines()
        try:
            yield lines
        finally:
            lines.end(last=True)


def _bar() -> Iterator[Callable[[str, int, int], None]]:
    from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TextColumn, TransferSpeedColumn

    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, console=err_console(), transient=True) as bar:
        task = bar.add_task("starting", total=None)

        def update(stage: str, done: int, total: int) -> None:
            bar.update(task, description=stage, completed=done, total=total or None)

        yield update


class StageLines:
    """Progress for logs (no terminal): one line per stage, once it ends, with its time and,
    for a stage that moves data, its bytes and rate; none for a stage that took no time but
    the last."""

    def __init__(self) -> None:
        self.stage: str | None = None
        self.started = self.moved_at = 0.0
        self.done = 0

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self.end()
            self.stage, self.started = stage, time.monotonic()
        self.done = done
        self.moved_at = time.monotonic()

    def end(self, last: bool = False) -> None:
        """Print the stage in progress as ended (the ``last`` one, however short)."""
        if self.stage is None:
            return
        # a stage that moves data ends with its last bytes; another, when the next one starts
        took = (self.moved_at if self.done else time.monotonic()) - self.started
        moved = f", {human_size(self.done)} at {human_size(int(self.done / max(took, 1e-6)))}/s" if self.done else ""
        if moved or last or took >= MIN_STAGE_S:
            err_console().print(f"{self.stage}: {took:.2f} s{moved}", highlight=False, markup=False)
        self.stage = None


def error(message: str) -> None:
    from rich.markup import escape

    err_console().print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True)


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(n)


def show_job(as_json: bool, job: Any, verb: str) -> None:
    """The result of run/manage/restore: the job's summary."""
    show(
        as_json,
        job.summary(),
        lambda: console().print(
            f"{verb} job [bold]{job.jid}[/] ({job.type}, PID {job.pid}, {job.state.value})", highlight=False
        ),
    )


def show_restore(as_json: bool, result: Any) -> None:
    job = result.job
    show(
        as_json,
        result.summary(),
        lambda: console().print(
            f"restored job [bold]{job.jid}[/] ({job.type}, PID {job.pid}, {job.state.value}) from {result.checkpoint} "
            f"in {result.duration_s:.2f} s",
            highlight=False,
        ),
    )


def show_dump(as_json: bool, result: Any) -> None:
    show(
        as_json,
        result,
        lambda: console().print(
            f"checkpoint [bold]{result.checkpoint}[/] of job {result.jid}: {human_size(result.size_bytes)} "
            f"stored ({human_size(result.image_bytes)} of images) in {result.duration_s:.2f} s\n  {result.path}",
            highlight=False,
        ),
    )
