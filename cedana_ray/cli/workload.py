"""Command builders every runtime plugin shares: ``run`` options, ``manage``, ``dump``,
``restore``, ``freeze``/``unfreeze`` and ``query`` of a workload type; and ``wait``."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import click

from ..backend import job_for
from ..crypto import KEY_ENV, load_key
from ..follow import exit_status, follow
from ..models import check_name
from ..policy import parse_duration
from ..requests import DumpRequest, ManageRequest, RestoreRequest, RunRequest
from .common import common, engine
from .options import dump_options, key_file_option, pairs, restore_options
from .output import emit_json, err_console, progress, show, show_dump, show_job, show_restore, table

F = Callable[..., Any]
WAIT = "cedana_ray.wait"  # click's context meta: `run --wait`


def container_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A click callback: a container id is a name (no ``/``, no ``..``)."""
    return check_name(value, "container id")


gpu_tracing_option = click.option(
    "--gpu-tracing", is_flag=True, help="Trace the job's GPU use into gpu-trace.json (Chrome/Perfetto JSON)."
)


env_option = click.option(
    "--env",
    multiple=True,
    callback=pairs("K=V", empty_value=True),
    metavar="K=V",
    help="An environment variable of the workload (repeatable); the only way to give it a secret.",
)


def policy_options(fn: F) -> F:
    """``--storage``, ``--checkpoint-every``, ``--keep``, ``--encrypt`` and ``--key-file``, passed on
    as ``storage``, ``every`` (seconds), ``keep`` and ``encryption`` (RunRequest's fields); and
    ``--wait``, which :func:`start` reads."""

    @functools.wraps(fn)
    def wrapper(**kw: Any) -> Any:
        click.get_current_context().meta[WAIT] = kw.pop("wait")
        text = kw.pop("checkpoint_every")
        kw["every"] = parse_duration(text) if text else None
        if kw["keep"] and not kw["every"]:
            raise click.BadParameter("needs --checkpoint-every", param_hint="--keep")
        encrypt, key_file = kw.pop("encrypt"), kw.pop("key_file")
        if key_file and not encrypt:
            raise click.BadParameter("is for encrypted jobs: add --encrypt", param_hint="--key-file")
        kw["encryption"] = {"encrypt": encrypt, "key": load_key(key_file) if key_file else None}
        return fn(**kw)

    options = [
        click.option("--storage", metavar="URL", help="Default checkpoint store of this job."),
        click.option(
            "--checkpoint-every", metavar="DUR", help="Checkpoint (leaving it running) every DUR: 30s, 5m, 1h."
        ),
        click.option("--keep", type=click.IntRange(1), metavar="N", help="Keep only the last N of those checkpoints."),
        click.option(
            "--encrypt",
            is_flag=True,
            help=f"Encrypt every checkpoint of the job, however it is made (key: --key-file, {KEY_ENV}, "
            "or the cluster's own from `up --encrypt`).",
        ),
        key_file_option,
        click.option(
            "--wait",
            is_flag=True,
            help="Print the job's output as it comes and exit as it does, through dumps, restores and "
            "migrations (Ctrl-C detaches; for `ray job submit`).",
        ),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def start(name: str, request: RunRequest, storage: str | None, as_json: bool) -> None:
    """Run the workload, give it its store, print the job; with ``--wait``, then follow it."""
    job = engine().run(name, request)
    if storage:
        job = engine().set_storage(job.jid, storage)
    if not click.get_current_context().meta.get(WAIT):
        show_job(as_json, job, "started")
        return
    err_console().print(f"started job {job.jid} ({job.type}); Ctrl-C detaches", highlight=False, markup=False)
    follow_to_the_end(job.jid, as_json)


def follow_to_the_end(jid: str, as_json: bool) -> None:
    """Print job ``jid``'s output as it comes (on stderr with ``--json``, whose document is the
    job as it ended), and exit as the workload did (see :func:`cedana_ray.follow.exit_status`)."""
    sink = sys.stderr.buffer if as_json else sys.stdout.buffer

    def out(chunk: bytes) -> None:
        sink.write(chunk)
        sink.flush()

    try:
        job = follow(engine(), jid, out)
    except KeyboardInterrupt:
        err_console().print(
            f"detached from job {jid}, which goes on: `cedana-ray logs -f {jid}` shows its output, "
            f"`cedana-ray wait {jid}` waits for it again",
            highlight=False,
            markup=False,
        )
        click.get_current_context().exit(130)
    if as_json:
        emit_json(job)
    click.get_current_context().exit(exit_status(job))


@click.command()
@click.argument("jid")
@common
def wait(jid: str, as_json: bool, local: bool) -> None:
    """Print job JID's output from the start and exit as the job does: with its exit code,
    137 if it was killed, 1 if it was lost; through dumps, restores and migrations."""
    follow_to_the_end(jid, as_json)


def manage_command(name: str, target: str, what: str) -> click.Command:
    @click.command(name, help=f"Adopt {what} {target}, started elsewhere, as a job.")
    @click.argument("target", metavar=target)
    @click.option("--jid", metavar="ID", help="Job id (default: generated).")
    @common
    def command(target: str, jid: str | None, as_json: bool, local: bool) -> None:
        show_job(as_json, engine().manage(name, ManageRequest(target=target, jid=jid)), "managing")

    return command


def dump_command(name: str, target: str, what: str) -> click.Command:
    """``dump NAME TARGET``: checkpoint a workload by the id users know it by."""

    @click.command(name, help=f"Checkpoint {what} {target} (adopting it as a job if it is not one).")
    @click.argument("target", metavar=target)
    @dump_options
    @common
    def command(target: str, request: DumpRequest, as_json: bool, local: bool) -> None:
        job = job_for(engine(), name, target)
        with progress(not as_json) as bar:
            result = engine().dump(job.jid, request, bar)
        show_dump(as_json, result)

    return command


def restore_command(name: str, help: str, *options: Callable[[F], F]) -> Callable[[F], click.Command]:
    """``restore NAME --path URL``; the decorated function turns the request into the type's own."""

    def decorate(make_request: F) -> click.Command:
        @click.command(name, help=help)
        @click.option("--path", required=True, metavar="URL", help="The checkpoint's URL (see `checkpoint list`).")
        @restore_options
        @common
        @functools.wraps(make_request)
        def command(request: RestoreRequest, as_json: bool, local: bool, **extra: Any) -> None:
            request = make_request(request, **extra)
            with progress(not as_json) as bar:
                result = engine().restore(request, jtype=name, progress=bar)
            show_restore(as_json, result)

        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def state_command(name: str, verb: str, target: str, what: str) -> click.Command:
    """``freeze|unfreeze NAME TARGET``."""

    @click.command(name, help=f"{verb.capitalize()} {what} {target}.")
    @click.argument("target", metavar=target)
    @common
    def command(target: str, as_json: bool, local: bool) -> None:
        job = job_for(engine(), name, target)
        show_job(as_json, getattr(engine(), verb)(job.jid), f"{verb}d")

    return command


def query_command(name: str, columns: tuple[str, ...], help: str) -> click.Command:
    @click.command(name, help=help)
    @common
    def command(as_json: bool, local: bool) -> None:
        rows = engine().query(name)
        show(as_json, rows, lambda: table(columns, [[r.get(c) for c in columns] for r in rows]))

    return command
