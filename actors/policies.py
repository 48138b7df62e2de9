"""Policies: the checkpoint schedule of jobs run with ``--checkpoint-every DUR --keep K``.

Mixed into the :class:`~cedana_ray.actors.coordinator.Coordinator`, whose monitor calls
``_run_policies`` on every tick; each checkpoint is :func:`cedana_ray.policy.tick`, as in
local mode.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cedana_ray import policy
from cedana_ray.models import LIVE_STATES
from cedana_ray.registry import Registry


class Policies:
    registry: Registry
    agents: dict[str, Any]
    due: dict[str, float]
    _busy: set[str]
    _pool: ThreadPoolExecutor

    def _run_policies(self) -> None:
        now = time.monotonic()
        for job in self.registry.jobs():
            rule = job.details.get("policy")
            if not rule or job.state not in LIVE_STATES or job.node not in self.agents:
                continue
            due = self.due.setdefault(job.jid, now + rule["every_s"])
            if now >= due and job.jid not in self._busy:
                self.due[job.jid] = now + rule["every_s"]
                self._pool.submit(policy.tick, self, job.jid, rule.get("keep"))
