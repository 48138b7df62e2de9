"""``cedana-ray <verb> slurm JOBID`` and the ``cedana-ray slurm`` helpers."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import fsspec

from cedana_ray.cli.options import dump_options
from cedana_ray.cli.output import console, err_console, human_size, show, table
from cedana_ray.errors import StateError, UsageError
from cedana_ray.models import Compression, JobState
from cedana_ray.pipeline import Context, Pipeline
from cedana_ray.plugins_manager import get_plugin_manager
from cedana_ray.policy import parse_duration
from cedana_ray.requests import DumpRequest, RestoreRequest

from . import allocation
from .template import BatchSpec, render

NAME = "slurm"
# how long the batch script waits for the allocation's other nodes to join Ray
NODES_TIMEOUT_S = 120.0
job_id_argument = click.argument("job_id", metavar="JOBID")
# no --local: these commands act on an allocation's cluster (or, query, on SLURM alone)
json_option = click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")


@click.command(NAME)
@job_id_argument
@dump_options
@json_option
def dump(job_id: str, request: DumpRequest, as_json: bool) -> None:
    """Checkpoint every cedana-ray workload of SLURM job JOBID."""
    cluster = allocation.connect(job_id)
    results = allocation.each(allocation.live(cluster, job_id), lambda j: cluster.dump(j.jid, request))
    rows = [[r.jid, r.checkpoint, human_size(r.size_bytes), f"{r.duration_s:.2f}", r.path] for r in results]
    show(as_json, results, lambda: table(("jid", "checkpoint", "size", "seconds", "path"), rows))


@click.command(NAME)
@job_id_argument
@json_option
def restore(job_id: str, as_json: bool) -> None:
    """Restore the workloads of SLURM job JOBID from their last checkpoints."""
    cluster = allocation.connect(job_id)
    jobs = allocation.restorable(cluster, job_id)
    results = allocation.each(jobs, lambda j: cluster.restore(RestoreRequest(), jid=j.jid))
    rows = [[r.job.jid, r.checkpoint, r.job.pid, f"{r.duration_s:.2f}"] for r in results]
    show(as_json, [r.summary() for r in results], lambda: table(("jid", "checkpoint", "pid", "seconds"), rows))


def _state_command(verb: str) -> click.Command:
    @click.command(NAME, help=f"{verb.capitalize()} every cedana-ray workload of SLURM job JOBID.")
    @job_id_argument
    @json_option
    def command(job_id: str, as_json: bool) -> None:
        cluster = allocation.connect(job_id)
        jobs = allocation.each(allocation.live(cluster, job_id), lambda j: getattr(cluster, verb)(j.jid))
        rows = [[j.jid, j.state.value, j.pid] for j in jobs]
        show(as_json, [j.summary() for j in jobs], lambda: table(("jid", "state", "pid"), rows))

    return command


freeze = _state_command("freeze")
unfreeze = _state_command("unfreeze")


@click.command(NAME)
@json_option
def query(as_json: bool) -> None:
    """List the SLURM jobs that run cedana-ray: state, nodes, Ray address, workloads, last checkpoint."""
    handler = get_plugin_manager().require(NAME, "cedana_query_handler", "query")
    rows: list[dict[str, Any]] = Pipeline(handler)(Context(None))

    def human() -> None:
        data = [
            [
                r["slurm_job"],
                r["state"],
                r["nodes"],
                r["ray_address"],
                ",".join(f"{w['jid']}:{w['state']}" for w in r["workloads"]),
                r["last_checkpoint"],
            ]
            for r in rows
        ]
        table(("slurm job", "state", "nodes", "ray address", "workloads", "last checkpoint"), data)

    show(as_json, rows, human)


# -- helpers: `cedana-ray slurm ...`
@click.group(NAME)
def slurm_group() -> None:
    """SLURM: render batch scripts, install the template and preemption settings."""


def _known_scheme(url: str) -> str:
    schemes = set(fsspec.available_protocols())
    for found in get_plugin_manager().call_all("cedana_checkpoint_storage"):
        schemes |= set(found or {})
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in schemes:
        raise UsageError(f"--storage: {url!r} is not a store URL", hint=f"known schemes: {', '.join(sorted(schemes))}")
    return url


@slurm_group.command("sbatch", context_settings={"ignore_unknown_options": True})
@click.option("--nodes", type=click.IntRange(1), default=1, show_default=True, help="Nodes of the allocation.")
@click.option(
    "--warning",
    "warning_s",
    type=click.IntRange(1, 65535),
    default=120,
    show_default=True,
    metavar="SECONDS",
    help="Ask SLURM for USR1 this long before the time limit or a preemption.",
)
@click.option("--storage", metavar="URL", help="Durable checkpoint store (default: the allocation's state dir).")
@click.option("--checkpoint-every", metavar="DUR", help="Also checkpoint every DUR (30s, 5m, 1h).")
@click.option(
    "--compression",
    type=click.Choice([c.value for c in Compression]),
    help="Compression of the checkpoints taken on a warning (default: the store's).",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".cedana-ray-slurm"),
    show_default=True,
    help="Shared dir for each allocation's cedana-ray state (kept across requeue).",
)
@click.option("--object-store-memory", "object_store_mb", type=click.IntRange(64), default=256, help="Ray MiB/node.")
@click.option("--job-name", default="cedana-ray", show_default=True, help="SLURM job name.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), required=True, help="Script to write.")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
@json_option
def sbatch(output: Path, cmd: tuple[str, ...], as_json: bool, **options: Any) -> None:
    """Render a batch script that runs CMD as a cedana-ray workload, checkpointed before
    preemption or the time limit and restored when the job is requeued. Submit it with
    `sbatch FILE` (any sbatch option, e.g. --time or --partition, can be added there)."""
    if options["checkpoint_every"]:
        parse_duration(options["checkpoint_every"])
    if options["storage"]:
        _known_scheme(options["storage"])
    root = options.pop("state_dir").absolute()
    if any(c.isspace() for c in str(root)):
        raise UsageError(f"--state-dir: {str(root)!r} contains white space, which SLURM's --comment cannot hold")
    spec = BatchSpec(command=list(cmd), state_root=root, **options)
    output.write_text(render(spec))
    output.chmod(0o755)
    doc = {"output": str(output.absolute()), "state_root": str(root)}
    show(as_json, doc, lambda: console().print(f"wrote {output}; submit it with `sbatch {output}`", highlight=False))


@slurm_group.command("setup")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--warning", "warning_s", type=click.IntRange(1), default=120, show_default=True, metavar="SECONDS")
@json_option
def setup(directory: Path, warning_s: int, as_json: bool) -> None:
    """Write the batch template and the slurm.conf settings for preemption into DIR.

    slurm.conf itself is not edited: add the printed lines there and run `scontrol reconfigure`."""
    from .setup import install

    written, conf = install(directory, warning_s)
    show(as_json, {"written": [str(p) for p in written], "slurm_conf": conf}, lambda: console().print(conf))


@slurm_group.command("destroy")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), required=True)
@json_option
def destroy(directory: Path, as_json: bool) -> None:
    """Remove what `slurm setup` wrote into DIR (slurm.conf is left to you)."""
    from .setup import uninstall

    removed = uninstall(directory)
    show(as_json, {"removed": [str(p) for p in removed]}, lambda: console().print(f"removed {len(removed)} file(s)"))


@slurm_group.command("up", hidden=True)
@click.option("--address", required=True, metavar="ADDR", help="The allocation's Ray head.")
@click.option("--nodes", type=click.IntRange(1), default=1, show_default=True, help="Nodes of the allocation.")
@click.option("--storage", metavar="URL", help="Cluster checkpoint store.")
@click.option("--timeout", type=click.FloatRange(0), default=NODES_TIMEOUT_S, show_default=True, metavar="SECONDS")
def up(address: str, nodes: int, storage: str | None, timeout: float) -> None:
    """`cedana-ray up` once every node of the allocation has joined Ray (for the batch script):
    then the workloads are placed, or restored, over all of them."""
    from cedana_ray.actors.launcher import up as start

    joined = allocation.wait_for_nodes(address, nodes, timeout)
    if joined < nodes:  # go on: the workloads can still run, on fewer nodes
        err_console().print(f"only {joined} of {nodes} nodes joined Ray within {timeout:.0f} s", highlight=False)
    _, found = start(address, storage)
    hosts = ", ".join(n.hostname for n in found)
    console().print(f"cedana-ray is up on {len(found)} node(s): {hosts}", highlight=False)


@slurm_group.command("follow", hidden=True)
@click.argument("jid")
def follow(jid: str) -> None:
    """Print job JID's output until it ends; exit with its exit code (for the batch script)."""
    from cedana_ray.cli.common import engine
    from cedana_ray.cli.jobs import logs

    click.get_current_context().invoke(logs, jid=jid, follow=True, as_json=False, local=False)
    job = engine().job(jid)
    if job.state is JobState.exited:
        sys.exit(job.exit_code or 0)
    if job.state is not JobState.checkpointed:  # checkpointed: the batch script's trap takes over
        raise StateError(f"job {jid} is {job.state.value}")
