"""The ``slurm`` plugin.

SLURM is not a workload runtime: the workloads of an allocation are cedana-ray jobs of
their own types (``process``...). The plugin contributes commands that act on all the
workloads of a SLURM job at once, the query of SLURM jobs, the batch template helpers
and health checks; no pipeline handler or middleware.
"""

from __future__ import annotations

from cedana_ray.models import HealthCheck
from cedana_ray.runtime import Commands, Runtime

from . import allocation, client, commands

PROBES = (("version", client.version), ("munge", client.munge), ("slurmctld", client.ping))


def health_checks() -> list[HealthCheck]:
    # SLURM is optional here: failures make the column incompatible, not `check` fail
    return [HealthCheck.probe(name, probe, fatal=False) for name, probe in PROBES]


VERBS = ("dump", "restore", "freeze", "unfreeze", "query")  # of all the workloads of a SLURM job
plugin = Runtime(
    "slurm",
    query=allocation.query,  # no run or restore handler: no kill signal, reaper or cleanup either
    commands=Commands(own={verb: getattr(commands, verb) for verb in VERBS}, helpers=[commands.slurm_group]),
    health_checks=health_checks,
)
