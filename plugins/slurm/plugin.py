"""Hook implementations of the ``slurm`` plugin.

SLURM is not a workload runtime: the workloads of an allocation are cedana-ray jobs of
their own types (``process``...). The plugin contributes commands that act on all the
workloads of a SLURM job at once, the query of SLURM jobs, the batch template helpers
and health checks; no pipeline handler or middleware.
"""

from __future__ import annotations

import click

from cedana_ray.hookspecs import hookimpl
from cedana_ray.models import HealthCheck
from cedana_ray.pipeline import Handler

from . import allocation, client, commands

PROBES = (("version", client.version), ("munge", client.munge), ("slurmctld", client.ping))


@hookimpl
def cedana_dump_command() -> click.Command:
    return commands.dump


@hookimpl
def cedana_restore_command() -> click.Command:
    return commands.restore


@hookimpl
def cedana_freeze_command() -> click.Command:
    return commands.freeze


@hookimpl
def cedana_unfreeze_command() -> click.Command:
    return commands.unfreeze


@hookimpl
def cedana_query_command() -> click.Command:
    return commands.query


@hookimpl
def cedana_helper_commands() -> list[click.Command]:
    return [commands.slurm_group]


@hookimpl
def cedana_query_handler() -> Handler:
    return allocation.query


@hookimpl
def cedana_health_checks() -> list[HealthCheck]:
    # SLURM is optional here: failures make the column incompatible, not `check` fail
    return [HealthCheck.probe(name, probe, fatal=False) for name, probe in PROBES]
