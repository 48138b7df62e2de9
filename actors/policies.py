"""Policies: the checkpoint schedule of jobs run with ``--checkpoint-every DUR --keep K``.

Mixed into the :class:`~cedana_ray.actors.coordinator.Coordinator`, whose monitor calls
``_run_policies`` on every tick.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cedana_ray.errors import CedanaError
from cedana_ray.models import LIVE_STATES
from cedana_ray.registry import Registry
from cedana_ray.requests import DumpRequest

log = logging.getLogger("cedana_ray.coordinator")


class Policies:
    registry: Registry
    agents: dict[str, Any]
    due: dict[str, float]
    _busy: set[str]
    _pool: ThreadPoolExecutor

    def _run_policies(self) -> None:
        now = time.monotonic()
        for job in self.registry.jobs():
            policy = job.details.get("policy")
            if not policy or job.state not in LIVE_STATES or job.node not in self.agents:
                continue
            due = self.due.setdefault(job.jid, now + policy["every_s"])
            if now >= due and job.jid not in self._busy:
                self.due[job.jid] = now + policy["every_s"]
                self._pool.submit(self._policy_run, job.jid, policy.get("keep"))

    def _policy_run(self, jid: str, keep: int | None) -> None:
        try:
            with self._claim(jid):
                result = self._dump(self._live(jid), DumpRequest(leave_running=True))
            log.info("policy checkpoint %s of job %s in %.2f s", result.checkpoint, jid, result.duration_s)
            for old in self.registry.checkpoints(jid)[:-keep] if keep else []:
                self.delete_checkpoint(old.checkpoint)
        except CedanaError as exc:
            log.error("policy checkpoint of job %s failed: %s", jid, exc)
