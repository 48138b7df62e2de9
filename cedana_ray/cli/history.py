"""``cedana-ray events``: what happened to each job, and why."""

from __future__ import annotations

import json
import sys
import time

import click

from ..models import Event
from .common import common, engine
from .output import console, human_size, show, table

FOLLOW_POLL_S = 0.5
COLUMNS = ("#", "at", "jid", "event", "detail")


def describe(event: Event) -> str:
    """The event's details in one line, sizes, times and node ids short."""
    words = []
    for key, value in event.detail.items():
        if value is None:
            continue
        if key == "size_bytes":
            key, value = "size", human_size(value)
        elif key == "duration_s":
            key, value = "took", f"{value:.2f} s"
        elif key in ("node", "source", "target"):
            value = value[:12]
        words.append(f"{key}={value}")
    return " ".join(words)


def _row(event: Event) -> list[object]:
    return [event.id, event.at.strftime("%Y-%m-%d %H:%M:%S"), event.jid, event.kind.value, describe(event)]


@click.command()
@click.argument("jid", required=False)
@click.option(
    "-f", "--follow", is_flag=True, help="Keep printing new events (Ctrl-C stops); with --json, one per line."
)
@common
def events(jid: str | None, follow: bool, as_json: bool, local: bool) -> None:
    """The history of job JID, or of every job: started, checkpointed, restored, migrated,
    drained, failed (with why), killed, exited, lost, deleted."""
    found = engine().events(jid)
    if not follow:
        show(as_json, found, lambda: table(COLUMNS, [_row(e) for e in found]))
        return
    last = 0
    try:
        while True:
            for event in found:
                if as_json:
                    sys.stdout.write(json.dumps(event.model_dump(mode="json")) + "\n")
                else:
                    console().print("  ".join(str(v) for v in _row(event)), highlight=False, markup=False)
                sys.stdout.flush()
                last = event.id
            time.sleep(FOLLOW_POLL_S)
            found = engine().events(jid, last)
    except KeyboardInterrupt:
        return
