"""The options of dump and restore commands, turned into their requests."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import click
from pydantic import TypeAdapter, ValidationError

from ..crypto import KEY_ENV, load_key
from ..errors import UsageError
from ..models import Compression, CriuOptions, Metadata
from ..requests import DumpRequest, RestoreRequest
from ..store_write import DEFAULT_STREAMS
from .common import F
from .output import QUIET

key_file_option = click.option(
    "--key-file",
    metavar="FILE",
    help=f"Key of an encrypted checkpoint: 32 bytes, 64 hex digits or base64 (default: ${KEY_ENV}).",
)


def _be_quiet(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta[QUIET] = True


quiet_option = click.option(
    "--quiet", "-q", is_flag=True, expose_value=False, callback=_be_quiet, help="Show no progress on stderr."
)


def dump_options(fn: F) -> F:
    """The options of every dump command, turned into a ``request: DumpRequest``."""
    options = [
        click.option("--leave-running", is_flag=True, help="Keep the workload running after the dump."),
        click.option("--dir", "storage", metavar="URL", help="Checkpoint store URL (default: the state dir)."),
        click.option(
            "--compression",
            type=click.Choice([c.value for c in Compression]),
            help="Compression of image chunks [default: none on a local store, zstd on a remote one].",
        ),
        click.option(
            "--streams",
            type=click.IntRange(1, 64),
            default=DEFAULT_STREAMS,
            show_default=True,
            help="Parallel compression/upload streams.",
        ),
        click.option("--tcp-established", is_flag=True, help="Checkpoint established TCP connections."),
        click.option("--file-locks", is_flag=True, help="Checkpoint file locks."),
        click.option("--shell-job", is_flag=True, help="The workload is attached to a terminal session."),
        click.option("--external", multiple=True, metavar="RES", help="CRIU external resource (repeatable)."),
        click.option(
            "--encrypt", is_flag=True, help=f"Encrypt the checkpoint (AES-256-GCM; key: --key-file or {KEY_ENV})."
        ),
        key_file_option,
        click.option(
            "--metadata",
            multiple=True,
            metavar="K=V",
            callback=metadata_pairs,
            help="Label the checkpoint (repeatable): step=1200, loss=0.31; `checkpoint list` shows them.",
        ),
        quiet_option,
    ]

    @functools.wraps(fn)
    def wrapper(**kw: Any) -> Any:
        criu = CriuOptions(
            tcp_established=kw.pop("tcp_established"),
            file_locks=kw.pop("file_locks"),
            shell_job=kw.pop("shell_job"),
            external=tuple(kw.pop("external")),
        )
        encrypt = kw.pop("encrypt")
        kw["request"] = DumpRequest(
            leave_running=kw.pop("leave_running"),
            storage=kw.pop("storage"),
            compression=Compression(c) if (c := kw.pop("compression")) else None,
            streams=kw.pop("streams"),
            criu=criu,
            encrypt=encrypt,
            key=_dump_key(encrypt, kw.pop("key_file")),
            metadata=kw.pop("metadata"),
        )
        return fn(**kw)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def metadata_pairs(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, Any]:
    """``--metadata K=V`` options as a checkpoint's metadata: a value that reads as a JSON
    scalar is one (``step=1200`` is 1200, ``tag="1"`` the string 1), any other is a string."""
    found = {}
    try:
        given = pairs("K=V", empty_value=True)(ctx, param, value)
    except click.BadParameter as exc:
        raise UsageError(f"--metadata: {exc.message}") from None
    for key, text in given.items():
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = text
        found[key] = parsed if parsed is None or isinstance(parsed, (str, int, float, bool)) else text
    try:
        return TypeAdapter(Metadata).validate_python(found)
    except ValidationError as exc:
        raise UsageError(f"--metadata: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None


def _dump_key(encrypt: bool, key_file: str | None) -> bytes | None:
    if key_file and not encrypt:
        raise UsageError("--key-file is for encrypted dumps", hint="add --encrypt")
    return load_key(key_file) if encrypt else None


def pairs(form: str, empty_value: bool = False) -> Callable[..., dict[str, str]]:
    """A click callback: repeated ``form`` (``K=V``) options as a dict; a value may be empty
    only if ``empty_value``."""

    def callback(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, str]:
        split = [text.split("=", 1) for text in value]
        for text, kv in zip(value, split, strict=True):
            if len(kv) != 2 or not kv[0] or not (kv[1] or empty_value):
                raise click.BadParameter(f"{text!r} is not {form}")
        return dict(split)

    return callback


def restore_options(fn: F) -> F:
    """``--jid`` (restore as a new job), ``--streams``, ``--key-file`` and ``--gpu-map``, as
    ``request: RestoreRequest``."""

    @functools.wraps(fn)
    def wrapper(**kw: Any) -> Any:
        kw["request"] = RestoreRequest(
            jid=kw.pop("new_jid"),
            streams=kw.pop("streams"),
            checkpoint=kw.pop("checkpoint", None),
            path=kw.pop("path", None),
            key=load_key(kw.pop("key_file")),
            gpu_map=kw.pop("gpu_map"),
        )
        return fn(**kw)

    wrapper = quiet_option(key_file_option(wrapper))
    wrapper = click.option(
        "--gpu-map",
        multiple=True,
        callback=pairs("FROM=TO"),
        metavar="FROM=TO",
        help="Restore the GPU state of checkpointed GPU FROM onto GPU TO here (UUIDs or indexes; repeatable).",
    )(wrapper)
    wrapper = click.option(
        "--streams",
        type=click.IntRange(1, 64),
        default=DEFAULT_STREAMS,
        show_default=True,
        help="Parallel download/verify streams.",
    )(wrapper)
    return click.option("--jid", "new_jid", metavar="ID", help="Restore as a new job with this id (a clone).")(wrapper)
