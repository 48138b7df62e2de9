"""``cedana-ray k8s setup|destroy``: cedana-ray's node agents on a Kubernetes cluster; ``query k8s``."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import click
from cedana_ray.plugins.crio.commands import endpoint_option

from cedana_ray.cli.options import common, engine
from cedana_ray.cli.output import emit_json, show, table
from cedana_ray.errors import UsageError

from .client import applier, manifests

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")


@click.group("k8s")
def k8s_group() -> None:
    """Kubernetes: install or remove cedana-ray's node agents (a DaemonSet and what it needs)."""


def _namespace(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if not DNS_LABEL.match(value):
        raise UsageError(f"--namespace: {value!r} is not a Kubernetes namespace name (a DNS label)")
    return value


def _storage(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not re.match(r"^[a-z][a-z0-9+.-]*://.", value):
        raise UsageError(f"--storage: {value!r} is not a store URL", hint="s3://BUCKET/PREFIX, gs://..., cedana://")
    return value


def target_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """What to install, where, and how to print or reach it: shared by setup and destroy."""
    options = [
        click.option("--dry-run", is_flag=True, help="Print the objects; contact no API server."),
        click.option(
            "-o",
            "--output",
            "fmt",
            type=click.Choice(["yaml", "json"]),
            help="Print the objects (yaml with --dry-run).",
        ),
        click.option("--namespace", default="cedana-ray", show_default=True, callback=_namespace, metavar="NS"),
        click.option("--kubeconfig", envvar="KUBECONFIG", metavar="PATH", help="Default: $KUBECONFIG, ~/.kube/config."),
        click.option("--context", "kube_context", metavar="NAME", help="The kubeconfig's context (default: current)."),
        json_option,
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def print_objects(objs: list[dict[str, Any]], fmt: str) -> None:
    """As kubectl prints them: a YAML stream, or a JSON List."""
    if fmt == "json":
        emit_json({"apiVersion": "v1", "kind": "List", "items": objs})
        return
    import yaml

    click.echo(yaml.safe_dump_all(objs, sort_keys=False), nl=False)


def _run(action: str, objs: list[Any], opts: dict[str, Any]) -> None:
    """Print the objects (dry run), or apply/delete each and report what happened."""
    plain = manifests().plain(objs)
    if opts["dry_run"]:
        print_objects(plain, opts["fmt"] or "yaml")
        return
    api = applier()
    client = api.api_client(opts["kubeconfig"], opts["kube_context"])
    step = api.apply if action == "apply" else api.delete
    rows = [
        {"kind": o.kind, "namespace": o.metadata.namespace, "name": o.metadata.name, "result": step(client, o)}
        for o in objs
    ]
    if opts["fmt"]:
        print_objects(plain, opts["fmt"])
        return
    columns = ("kind", "namespace", "name", "result")
    show(opts["as_json"], rows, lambda: table(columns, [[r[c] for c in columns] for r in rows]))


@k8s_group.command("setup")
@target_options
@click.option("--storage", metavar="URL", callback=_storage, help="The checkpoint store (s3://, gs://...).")
@click.option("--image", metavar="IMAGE", help="The agents' image (default: the one `make image` builds).")
@click.option("--ray-address", metavar="HOST:PORT", help="The Ray head (default: examples/kuberay's head service).")
def setup(storage: str | None, image: str | None, ray_address: str | None, **opts: Any) -> None:
    """Install cedana-ray's node agents: namespace, service account, read-only RBAC (pods,
    nodes), settings (ConfigMap) and a privileged DaemonSet that joins the Ray cluster.

    The Ray auth token comes from the Secret cedana-ray-auth (key `token`) and the store's
    credentials from the optional Secret cedana-ray-storage: create them with kubectl."""
    m = manifests()
    settings = m.Settings(opts["namespace"], storage, image or m.DEFAULT_IMAGE, ray_address)
    _run("apply", m.objects(settings), opts)


@k8s_group.command("destroy")
@target_options
def destroy(**opts: Any) -> None:
    """Remove what `k8s setup` installed (the namespace with everything in it, the RBAC)."""
    m = manifests()
    _run("delete", list(reversed(m.objects(m.Settings(opts["namespace"])))), opts)


@click.command("k8s")
@endpoint_option
@common
def query(as_json: bool, local: bool) -> None:
    """List the Kubernetes pods of this node (every node's, on a cluster), read from the
    node's CRI, with their containers and each one's cedana-ray job, state and last checkpoint."""
    from .pods import COLUMNS, rows

    pods = engine().query("k8s")
    show(as_json, pods, lambda: table(COLUMNS, rows(pods)))
