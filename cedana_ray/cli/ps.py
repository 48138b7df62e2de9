"""``cedana-ray ps``: the jobs as they are kept (:mod:`cedana_ray.listing`), or as the
engine lists them where it has something to record first."""

from __future__ import annotations

import click

from ..listing import GPUs, Job, gpus_of, listed, row
from .common import common, engine
from .output import show, table


@click.command()
@common
def ps(as_json: bool, local: bool) -> None:
    """List jobs: id, type, state, PID, node, last checkpoint, GPUs in use."""
    jobs, gpus = listed(local) or _from_engine()
    rows = [[j["jid"], j["type"], j["state"], j["pid"], j["node"][:12], j["last_checkpoint"]] for j in jobs]
    cols: tuple[str, ...] = ("jid", "type", "state", "pid", "node", "last checkpoint")
    if gpus:
        rows = [[*r, ",".join(map(str, gpus.get(j["jid"], [])))] for r, j in zip(rows, jobs, strict=True)]
        cols += ("gpus",)
    show(as_json, [{**row(j), "gpus": gpus.get(j["jid"], [])} for j in jobs], lambda: table(cols, rows))


def _from_engine() -> tuple[list[Job], GPUs]:
    backend = engine()
    jobs = [j.model_dump(mode="json") for j in backend.jobs()]
    return jobs, gpus_of(jobs, lambda: backend.query("gpu"))
