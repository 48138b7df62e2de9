"""Commands on jobs: ``dump job``, ``restore job``, ``freeze|unfreeze job``,
``job kill|delete`` and ``logs``."""

from __future__ import annotations

import sys
import time

import click

from ..models import LIVE_STATES
from ..requests import DumpRequest, RestoreRequest
from .common import common, engine
from .options import dump_options, restore_options
from .output import progress, show, show_dump, show_job, show_restore


@click.command("job")
@click.argument("jid")
@dump_options
@common
def dump_job(jid: str, request: DumpRequest, as_json: bool, local: bool) -> None:
    """Checkpoint job JID."""
    with progress(not as_json) as bar:
        result = engine().dump(jid, request, bar)
    show_dump(as_json, result)


@click.command("job")
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


def _job_state_command(verb: str) -> click.Command:
    @click.command("job", help=f"{verb.capitalize()} job JID.")
    @click.argument("jid")
    @common
    def command(jid: str, as_json: bool, local: bool) -> None:
        show_job(as_json, getattr(engine(), verb)(jid), f"{verb}d")

    return command


freeze_job = _job_state_command("freeze")
unfreeze_job = _job_state_command("unfreeze")


@click.group()
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


@click.command()
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
