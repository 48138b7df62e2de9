"""``cedana-ray k8s setup|destroy``: cedana-ray's node agents on a Kubernetes cluster; ``query k8s``."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click
from cedana_ray.plugins.crio.commands import endpoint_option

from cedana_ray.cli.common import common, engine
from cedana_ray.cli.output import emit_json, err_console, show, table
from cedana_ray.errors import PrerequisiteError, UsageError

from .client import api_pods, applier, manifests

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


KUBECONFIG_OPTIONS = (
    click.option("--kubeconfig", envvar="KUBECONFIG", metavar="PATH", help="Default: $KUBECONFIG, ~/.kube/config."),
    click.option("--context", "kube_context", metavar="NAME", help="The kubeconfig's context (default: current)."),
)


def with_options(fn: Callable[..., Any], options: Sequence[Callable[..., Any]]) -> Callable[..., Any]:
    """``fn`` with ``options``, listed in the order ``--help`` shows them."""
    for option in reversed(options):
        fn = option(fn)
    return fn


def kubeconfig_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Which API server: ``--kubeconfig`` and ``--context``."""
    return with_options(fn, KUBECONFIG_OPTIONS)


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
        *KUBECONFIG_OPTIONS,
        json_option,
    ]
    return with_options(fn, options)


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


def _api_configured(kubeconfig: str | None) -> bool:
    """Whether a Kubernetes API server is configured, found without importing the client
    (it takes seconds): a kubeconfig, or the service account of the pod we run in."""
    path = Path(kubeconfig or "~/.kube/config").expanduser()
    return path.is_file() or "KUBERNETES_SERVICE_HOST" in os.environ


def _node_pods() -> list[dict[str, Any]]:
    """What the agents found on their nodes' CRI; none (said on stderr) where none could read one."""
    try:
        return engine().query("k8s")
    except PrerequisiteError as exc:
        err_console().print(f"note: no cedana-ray job is shown: {exc}", highlight=False, markup=False)
        return []


@click.command("k8s")
@endpoint_option
@click.option(
    "--api/--no-api",
    default=None,
    help="List the pods the Kubernetes API server knows, cluster-wide, with the jobs the "
    "agents found (default: when a kubeconfig or in-cluster config is found).",
)
@click.option("--namespace", "-n", metavar="NS", help="Only this namespace's pods (default: every namespace).")
@kubeconfig_options
@common
def query(
    api: bool | None,
    namespace: str | None,
    kubeconfig: str | None,
    kube_context: str | None,
    as_json: bool,
    local: bool,
) -> None:
    """List the Kubernetes pods with their containers and each one's cedana-ray job, state and
    last checkpoint: cluster-wide from the API server, each joined to its node's agent, or
    (--no-api, or without an API server) as the agents read them from their nodes' CRI."""
    from .pods import rows

    if api is None:
        api = _api_configured(kubeconfig)
    if api:
        pods, client = api_pods(), applier().api_client(kubeconfig, kube_context)
        found = pods.joined(pods.listed(client, namespace), _node_pods())
    else:
        found = [p for p in engine().query("k8s") if namespace in (None, p["namespace"])]
    show(as_json, found, lambda: table(*rows(found)))
