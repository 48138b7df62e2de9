"""``checkpoint list|inspect|import|delete``."""

from __future__ import annotations

import click

from .common import common, engine
from .output import console, human_size, show, table


@click.group()
def checkpoint() -> None:
    """List, inspect and delete checkpoints."""


@checkpoint.command("list")
@click.argument("jid", required=False)
@common
def checkpoint_list(jid: str | None, as_json: bool, local: bool) -> None:
    """List checkpoints (of job JID)."""
    found = engine().checkpoints(jid)
    rows = [
        [c.checkpoint, c.jid, human_size(c.size_bytes), f"{c.created:%Y-%m-%d %H:%M:%S}", _labels(c.metadata), c.path]
        for c in found
    ]
    show(as_json, found, lambda: table(("checkpoint", "jid", "size", "created", "metadata", "path"), rows))


def _labels(metadata: dict[str, object]) -> str:
    return " ".join(f"{k}={v}" for k, v in metadata.items())


@checkpoint.command("inspect")
@click.argument("ckpt")
@common
def checkpoint_inspect(ckpt: str, as_json: bool, local: bool) -> None:
    """Show the manifest of checkpoint CKPT."""
    m = engine().inspect(ckpt)

    def human() -> None:
        from rich.markup import escape

        storage = f"compression {m.compression.value}, digest {m.digest.value}"
        console().print(
            f"[bold]{m.checkpoint}[/] of job {m.jid} ({m.type}) on {m.node}, {m.created:%Y-%m-%d %H:%M:%S}"
            f"\n  criu {m.criu_version}, {storage}, parent {m.parent or '-'}"
            + (f"\n  metadata {escape(_labels(m.metadata))}" if m.metadata else ""),
            highlight=False,
        )
        table(("file", "size", "chunks"), [[f.name, human_size(f.size), len(f.chunks)] for f in m.files])
        console().print(f"  {human_size(m.image_bytes)} of images, {human_size(m.size_bytes)} stored", highlight=False)

    show(as_json, m, human)


@checkpoint.command("import")
@click.argument("url")
@common
def checkpoint_import(url: str, as_json: bool, local: bool) -> None:
    """Trust the checkpoint at URL, made by another cluster or state dir.

    Every chunk is checked against its manifest, then the manifest is signed with this
    cluster's key (its other signatures stay) and the checkpoint is catalogued. Import
    only checkpoints whose origin you trust: restoring one runs its memory as root.
    """
    info = engine().import_checkpoint(url)
    said = f"imported checkpoint {info.checkpoint} of job {info.jid}"
    show(as_json, info, lambda: console().print(said, highlight=False))


@checkpoint.command("delete")
@click.argument("ckpt")
@common
def checkpoint_delete(ckpt: str, as_json: bool, local: bool) -> None:
    """Delete checkpoint CKPT from its store and the catalog."""
    info = engine().delete_checkpoint(ckpt)
    show(as_json, info, lambda: console().print(f"deleted checkpoint {info.checkpoint}", highlight=False))
