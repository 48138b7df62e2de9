"""Cluster commands: ``up``, ``down``, ``nodes``, ``migrate`` and ``drain``."""

from __future__ import annotations

import dataclasses
from typing import Any

import click

from ..crypto import load_key
from ..errors import UsageError
from ..models import Compression, NodeStatus
from ..requests import MigrateRequest
from .common import common, engine
from .options import key_file_option, quiet_option
from .output import console, human_size, progress, show, table


@click.command()
@click.option("--address", metavar="ADDR", help="Ray cluster to join (default: RAY_ADDRESS, else start a local head).")
@click.option("--storage", metavar="URL", help="Cluster checkpoint store (default: file://STATE/cluster/checkpoints).")
@click.option(
    "--dashboard-host",
    metavar="HOST",
    help="Where the dashboard (Ray's job API) of a head `up` starts listens (default: 127.0.0.1).",
)
@click.option(
    "--no-auth",
    is_flag=True,
    help="Run Ray without token authentication, for single-user machines: whoever reaches Ray is root"
    " on every node (also: CEDANA_RAY_AUTH=disabled).",
)
@click.option(
    "--encrypt",
    is_flag=True,
    help="Encrypt every checkpoint of the cluster (AES-256-GCM) with the key of --key-file or "
    "CEDANA_RAY_KEY (which alone means --encrypt), else one made and kept in the head's state dir.",
)
@key_file_option
@quiet_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def up(
    address: str | None,
    storage: str | None,
    dashboard_host: str | None,
    no_auth: bool,
    encrypt: bool,
    key_file: str | None,
    as_json: bool,
) -> None:
    """Join (or start) a Ray cluster and start the coordinator and one agent per node.

    Ray runs with token authentication: the token is RAY_AUTH_TOKEN, the file
    RAY_AUTH_TOKEN_PATH names, or STATE/ray-auth-token (created for a new head)."""
    from ..actors.launcher import up as start

    if key_file and not encrypt:
        raise click.BadParameter("is for an encrypted cluster: add --encrypt", param_hint="--key-file")
    key = load_key(key_file) if key_file else None
    with progress(not as_json) as bar:
        state, nodes = start(address, storage, dashboard_host, no_auth, encrypt, key, progress=bar)

    def human() -> None:
        console().print(f"cedana-ray is up on {state.address}, checkpoints in {state.storage}", highlight=False)
        auth = f"on (token in {state.auth_token_file})" if state.auth_token_file else "OFF"
        console().print(f"Ray token authentication: {auth}", highlight=False)
        console().print(f"checkpoints encrypted: {'yes' if state.encrypted else 'no'}", highlight=False)
        _nodes_table(nodes)

    show(as_json, {**dataclasses.asdict(state), "nodes": nodes}, human)


@click.command()
@click.option("--kill-jobs", is_flag=True, help="Kill running jobs instead of refusing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def down(kill_jobs: bool, as_json: bool) -> None:
    """Stop what `up` started (the head too if `up` started it); jobs' checkpoints stay."""
    from ..actors.launcher import down as stop

    report = stop(kill_jobs)
    show(as_json, report, lambda: console().print(f"cedana-ray is down ({report['actors']} actors stopped)"))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def nodes(as_json: bool) -> None:
    """The cluster's nodes as their agents report them."""
    found = engine().nodes()
    show(as_json, found, lambda: _nodes_table(found))


def _nodes_table(found: list[NodeStatus]) -> None:
    rows = [
        [
            n.node[:12],
            n.hostname,
            "draining" if n.draining else ("error: " + n.error if n.error else "ok"),
            ",".join(n.types),
            n.live_jobs,
            human_size(n.memory_available),
            f"{n.gpus:g}",
        ]
        for n in found
    ]
    table(("node", "host", "agent", "types", "jobs", "mem free", "gpus"), rows)


@click.command()
@click.argument("jid")
@click.option(
    "--to",
    "node",
    required=True,
    metavar="NODE",
    help="Target node: its hostname, IP or Ray id (a unique prefix is enough).",
)
@click.option(
    "--compression",
    type=click.Choice([c.value for c in Compression]),
    help="Compression of the migration checkpoint [default: the store's: none on local disk, zstd on a remote one].",
)
@click.option(
    "--store/--no-store",
    default=True,
    help="Keep the images as the job's checkpoint once it runs on the target (default), or not.",
)
@click.option(
    "--through-store/--direct",
    default=None,
    help="Dump into the store and restore from it, or send the images straight to the target"
    " (default: whichever copies less: through a local store when both nodes are on one machine).",
)
@click.option(
    "--live",
    is_flag=True,
    help="A VM job: moved by its hypervisor's own pre-copy migration while it runs, no checkpoint"
    " (QEMU's TLS-authenticated migration; only its last copy pauses the guest).",
)
@quiet_option
@common
def migrate(
    jid: str,
    node: str,
    compression: str | None,
    store: bool,
    through_store: bool | None,
    live: bool,
    as_json: bool,
    local: bool,
) -> None:
    """Move job JID to another node: freeze it, send its images straight there, restore, resume;
    it keeps its id."""
    options: dict[str, Any] = {"store": store, "through_store": through_store}
    if compression:  # else the coordinator's choice for the job's store
        options["compression"] = Compression(compression)
    if live and (compression or through_store or not store):
        raise UsageError("--live sends no images: --compression, --through-store and --no-store do not apply")
    request = MigrateRequest(**options)
    with progress(not as_json) as bar:  # live: the guest's RAM sent, as QEMU reports it
        result = engine().migrate(jid, node, request, progress=bar, live=live)

    def human() -> None:
        if result.route == "live":
            console().print(
                f"job {jid} moved live {result.source[:12]} → {result.target[:12]} in {result.duration_s:.2f} s"
                f" (QEMU's downtime {result.downtime_s * 1000:.0f} ms)",
                highlight=False,
            )
            return
        console().print(
            f"job {jid} moved {result.source[:12]} → {result.target[:12]} in {result.duration_s:.2f} s"
            f" (dump {result.dump_s:.2f} s, restore {result.restore_s:.2f} s; down {result.downtime_s:.2f} s)",
            highlight=False,
        )

    show(as_json, result, human)


@click.command()
@click.argument("node")
@click.option("--cancel", is_flag=True, help="Call a drain off: NODE takes new jobs again.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def drain(node: str, cancel: bool, as_json: bool) -> None:
    """Move every job off NODE (before it goes away); no new job is placed there."""
    if cancel:
        found = engine().undrain(node)
        said = f"node {found[:12]} takes jobs again"
        show(as_json, {"node": found, "draining": False}, lambda: console().print(said))
        return
    moved = engine().drain(node)
    show(as_json, moved, lambda: table(("jid", "to", "seconds"), [[m.jid, m.target[:12], m.duration_s] for m in moved]))
