"""The ``cedana-ray`` command line. The only place errors become output and exit codes."""

from __future__ import annotations

import os
import sys
import time
import traceback

import click
from rich.markup import escape

from .. import __version__
from ..backend import Backend
from ..engine import Engine
from ..environment import redact
from ..errors import CedanaError
from ..features import ROWS, SYMBOLS, FeatureMatrix, compute, plugin_errors
from ..models import LIVE_STATES
from ..plugins_manager import get_plugin_manager
from ..requests import DumpRequest, RestoreRequest
from . import cluster as cluster_commands
from .history import events
from .options import common, dump_options, engine, restore_options
from .output import console, error, human_size, progress, show, show_dump, show_job, show_restore, table
from .workload import wait

_debug = False


class PluginGroup(click.Group):
    """A group whose commands are the core's plus the plugins', from ``hook`` (one
    command per plugin, or a list of them for ``cedana_helper_commands``)."""

    def __init__(self, *args: object, hook: str, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.hook = hook

    def _plugin_commands(self) -> dict[str, click.Command]:
        found = getattr(get_plugin_manager().hook, self.hook)()
        commands = [c for item in found for c in (item if isinstance(item, list) else [item])]
        return {c.name: c for c in commands if c is not None and c.name}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self._plugin_commands()))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return super().get_command(ctx, name) or self._plugin_commands().get(name)


def plugin_group(name: str, hook: str, help: str) -> PluginGroup:
    return PluginGroup(name, hook=hook, help=help)


# the root group: the core's commands and the plugins' helper commands (`slurm setup`, `gpu trace`)
@click.group(cls=PluginGroup, hook="cedana_helper_commands", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cedana-ray")
@click.option("--debug", is_flag=True, help="Show tracebacks of errors.")
def cli(debug: bool) -> None:
    """Checkpoint/restore and migration of processes, containers and GPU jobs."""
    global _debug
    _debug = debug


run = plugin_group("run", "cedana_run_command", "Run a workload under cedana-ray.")
manage = plugin_group("manage", "cedana_manage_command", "Adopt a workload started elsewhere.")
dump = plugin_group("dump", "cedana_dump_command", "Checkpoint a job or a workload.")
restore = plugin_group("restore", "cedana_restore_command", "Restore a job or a checkpoint.")
freeze = plugin_group("freeze", "cedana_freeze_command", "Pause a job or a workload.")
unfreeze = plugin_group("unfreeze", "cedana_unfreeze_command", "Resume a frozen job or workload.")
query = plugin_group("query", "cedana_query_command", "List the workloads of a runtime on this node.")
for group in (run, manage, dump, restore, freeze, unfreeze, query, events, wait, *cluster_commands.COMMANDS):
    cli.add_command(group)


@dump.command("job")
@click.argument("jid")
@dump_options
@common
def dump_job(jid: str, request: DumpRequest, as_json: bool, local: bool) -> None:
    """Checkpoint job JID."""
    with progress(not as_json) as bar:
        result = engine().dump(jid, request, bar)
    show_dump(as_json, result)


@restore.command("job")
@click.argument("jid")
@click.option("--checkpoint", metavar="CKPT", help="Checkpoint id (default: the job's last).")
@click.option("--node", metavar="NODE", help="Node to restore on (with a cluster).")
@restore_options
@common
def restore_job(jid: str, node: str | None, request: RestoreRequest, as_json: bool, local: bool) -> None:
    """Restore job JID from its last (or a given) checkpoint."""
    with progress(not as_json) as bar:
        result = engine().restore(request, jid=jid, progress=bar, node=node)
    show_restore(as_json, result)


def _job_state_command(group: click.Group, verb: str) -> None:
    @group.command("job", help=f"{verb.capitalize()} job JID.")
    @click.argument("jid")
    @common
    def command(jid: str, as_json: bool, local: bool) -> None:
        show_job(as_json, getattr(engine(), verb)(jid), f"{verb}d")


_job_state_command(freeze, "freeze")
_job_state_command(unfreeze, "unfreeze")


@cli.command()
@common
def ps(as_json: bool, local: bool) -> None:
    """List jobs: id, type, state, PID, node, last checkpoint, GPUs in use."""
    backend = engine()
    jobs, gpus = backend.jobs(), _gpus_by_job(backend)
    rows = [[j.jid, j.type, j.state.value, j.pid, j.node[:12], j.last_checkpoint] for j in jobs]
    cols: tuple[str, ...] = ("jid", "type", "state", "pid", "node", "last checkpoint")
    if gpus:
        rows = [[*row, ",".join(map(str, gpus.get(j.jid, [])))] for row, j in zip(rows, jobs, strict=True)]
        cols += ("gpus",)
    show(as_json, [{**j.row(), "gpus": gpus.get(j.jid, [])} for j in jobs], lambda: table(cols, rows))


def _gpus_by_job(backend: Backend) -> dict[str, list[int]]:
    """The GPUs (NVML indexes) each job's processes use; none where no node has a driver."""
    try:
        found = backend.query("gpu")
    except CedanaError:  # no driver, or no gpu plugin: ps shows the rest
        return {}
    used: dict[str, list[int]] = {}
    for gpu in found:
        for jid in gpu["jobs"]:
            used.setdefault(jid, []).append(gpu["index"])
    return used


@cli.group()
def job() -> None:
    """Kill or delete jobs."""


@job.command("kill")
@click.argument("jid")
@click.option(
    "-s", "--signal", "sig", metavar="SIG", help="Only send SIG (TERM, INT, 15...) to the job's PID; record nothing."
)
@common
def job_kill(jid: str, sig: str | None, as_json: bool, local: bool) -> None:
    """Stop job JID with its type's kill signal (its checkpoints stay), or send it SIG."""
    show_job(as_json, engine().kill(jid, sig), "killed" if sig is None else f"sent {sig} to")


@job.command("delete")
@click.argument("jid")
@common
def job_delete(jid: str, as_json: bool, local: bool) -> None:
    """Forget a stopped job and remove its log (its checkpoints stay)."""
    show_job(as_json, engine().delete(jid), "deleted")


@cli.command()
@click.argument("jid")
@click.option("-f", "--follow", is_flag=True, help="Keep printing while the job runs.")
@common
def logs(jid: str, follow: bool, as_json: bool, local: bool) -> None:
    """Print the output of job JID."""
    if as_json:
        data = b""
        while chunk := engine().read_log(jid, len(data)):
            data += chunk
        show(True, {"jid": jid, "log": data.decode(errors="replace")}, lambda: None)
        return
    offset = 0
    while True:
        chunk = engine().read_log(jid, offset)
        if chunk:
            offset += len(chunk)
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
        elif not follow or engine().job(jid).state not in LIVE_STATES:
            return
        else:
            time.sleep(0.2)


@cli.group()
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
        console.print(
            f"[bold]{m.checkpoint}[/] of job {m.jid} ({m.type}) on {m.node}, {m.created:%Y-%m-%d %H:%M:%S}"
            f"\n  criu {m.criu_version}, compression {m.compression.value}, parent {m.parent or '-'}"
            + (f"\n  metadata {escape(_labels(m.metadata))}" if m.metadata else ""),
            highlight=False,
        )
        table(("file", "size", "chunks"), [[f.name, human_size(f.size), len(f.chunks)] for f in m.files])
        console.print(f"  {human_size(m.image_bytes)} of images, {human_size(m.size_bytes)} stored", highlight=False)

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
    show(as_json, info, lambda: console.print(said, highlight=False))


@checkpoint.command("delete")
@click.argument("ckpt")
@common
def checkpoint_delete(ckpt: str, as_json: bool, local: bool) -> None:
    """Delete checkpoint CKPT from its store and the catalog."""
    info = engine().delete_checkpoint(ckpt)
    show(as_json, info, lambda: console.print(f"deleted checkpoint {info.checkpoint}", highlight=False))


@cli.command()
@click.option("--errors", is_flag=True, help="Say why plugins are incompatible or not installed.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def features(errors: bool, as_json: bool) -> None:
    """The feature matrix, computed from the installed plugins."""
    m = compute(get_plugin_manager())
    doc = m.model_dump(mode="json", exclude=set() if errors else {"errors"})
    show(as_json, doc, lambda: _print_features(m, errors))


def _print_features(m: FeatureMatrix, errors: bool) -> None:
    from rich.table import Table

    t = Table("FEATURE", *(p.upper() for p in m.plugins), box=None, header_style="bold")
    for row in ROWS:
        if row is None:
            t.add_section()
            continue
        t.add_row(row[0], *(SYMBOLS[m.features[row[0]][p]] for p in m.plugins))
    console.print(t)
    console.print("✔ = implemented, • = unimplemented, — = not installed, ✖ = incompatible")
    if errors:
        for name, reasons in m.errors.items():
            for reason in reasons:
                console.print(f"{name}: {reason}", highlight=False, markup=False)  # `cedana-ray[gpu]` as written


@cli.group()
def plugin() -> None:
    """Installed plugins."""


@plugin.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def plugin_list(as_json: bool) -> None:
    """List plugins with their status."""
    pm = get_plugin_manager()
    rows = []
    for name in sorted(set(pm.plugin_names()) | set(pm.failures)):
        status, reasons = plugin_errors(pm, name)
        module = getattr(pm.get_plugin(name), "__name__", "")
        rows.append({"name": name, "status": status.value if status else "ok", "module": module, "errors": reasons})
    show(
        as_json,
        rows,
        lambda: table(
            ("name", "status", "module", "errors"),
            [[r["name"], r["status"], r["module"], "; ".join(r["errors"])] for r in rows],
        ),
    )


@cli.command()
@click.option("--full", is_flag=True, help="Also list every CRIU kernel feature.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document on stdout.")
def check(full: bool, as_json: bool) -> None:
    """Health of CRIU, the state dir, the store and every plugin."""
    from ..health import run_checks

    report = run_checks(Engine(), full)
    show(
        as_json,
        report,
        lambda: table(
            ("component", "check", "ok", "detail"),
            [
                [c["component"], c["name"], "✔" if c["ok"] else ("!" if not c["fatal"] else "✖"), c["detail"]]
                for c in report["checks"]
            ],
        ),
    )
    if not report["ok"]:
        sys.exit(1)


def _safe(text: str) -> str:
    """``text`` without secrets (the values of ``--env``, keys, credentials; see
    cedana_ray.environment.redact): errors and tracebacks end up in logs and bug reports."""
    return redact(text, sys.argv[1:])


def _traceback() -> None:
    if _debug:
        sys.stderr.write(_safe(traceback.format_exc()))


def main() -> None:
    os.umask(0o077)  # what we write (images, manifests, logs, the registry) holds process memory: ours alone
    try:
        status = cli.main(standalone_mode=False)  # a command's ctx.exit(N) comes back as N
        sys.exit(status if isinstance(status, int) else 0)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        error("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.message = _safe(exc.message)
        exc.show()
        sys.exit(exc.exit_code)
    except CedanaError as exc:
        _traceback()
        error(_safe(str(exc)))
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # the last resort: one line, traceback on --debug
        _traceback()
        error(_safe(f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for details)"))
        sys.exit(1)


if __name__ == "__main__":
    main()
