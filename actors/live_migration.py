"""Live migration across the cluster (``migrate --live``): a VM moved by its hypervisor's own
pre-copy migration, node to node, with no checkpoint in between (:mod:`cedana_ray.live`).

:class:`LiveMigration` is the coordinator's side, mixed into the
:class:`~cedana_ray.actors.coordinator.Coordinator`; :class:`LiveAgent` the agents', mixed
into the :class:`~cedana_ray.actors.agent.NodeAgent`. The coordinator makes the migration's
TLS credentials (:mod:`cedana_ray.tls`) and hands each side its own through these calls only.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from cedana_ray import live, tls
from cedana_ray.backend import Progress
from cedana_ray.engine import Engine
from cedana_ray.errors import CedanaError, UsageError
from cedana_ray.live import Incoming, Sent
from cedana_ray.models import EventKind, Job, MigrateResult
from cedana_ray.plugins_manager import get_plugin_manager
from cedana_ray.records import Records
from cedana_ray.registry import Registry
from cedana_ray.remote import call

from .reservations import give_back, release, reserve, resources_of

LIVE = "live"  # a MigrateResult's route: by the hypervisor, no images
log = logging.getLogger("cedana_ray.coordinator")


class LiveAgent:
    """A node's side: :mod:`cedana_ray.live`'s steps, with this node's engine."""

    engine: Engine

    def live_outgoing(self, jid: str) -> dict[str, bytes]:
        return live.outgoing(self.engine, jid)

    def live_receive(self, job: Job, files: dict[str, bytes], creds: tls.TlsFiles) -> Incoming:
        import ray

        return live.receive(self.engine, job, files, creds, ray.util.get_node_ip_address())

    def live_send(self, jid: str, incoming: Incoming, creds: tls.TlsFiles, progress: Progress | None = None) -> Sent:
        return live.send(self.engine, jid, incoming, creds, progress)

    def live_adopt(self, job: Job, history: bytes) -> Job:
        return live.adopt(self.engine, job, history)

    def live_abort(self, job: Job) -> None:
        live.abort(self.engine, job)

    def live_resume(self, jid: str) -> None:
        live.resume(self.engine, jid)


class LiveMigration:
    """The coordinator's side: both agents' steps in order, undone on the target and the
    source resumed if any fails."""

    registry: Registry
    records: Records

    def _require_live(self, job: Job) -> None:
        """Only a type with a live migration (a VM's) migrates live: one line otherwise."""
        if get_plugin_manager().call_for(job.type, live.HOOK) is None:
            raise UsageError(
                f"job {job.jid} is a {job.type} job: only VM jobs (qemu) migrate live",
                hint="migrate it without --live",
            )

    def _migrate_live(self, job: Job, target: str, progress: Progress | None = None) -> MigrateResult:
        start = time.perf_counter()
        server, client = tls.credentials()  # this migration's alone
        with self.records.noting_failure(job.jid, "migration"):
            files = self._on(job.node, "live_outgoing", job.jid)
            reserve(job.jid, target, resources_of(job))
            try:
                incoming: Incoming = self._on(target, "live_receive", job, files, server)
            except BaseException:
                release(job.jid, target)
                raise
            sent, moved = self._hand_over(job, target, incoming, client, progress)
        give_back(job)
        self._forget(job)  # the source's QEMU, paused for good, quits; its record there goes
        return self._moved(job, moved, sent, time.perf_counter() - start)

    def _hand_over(
        self, job: Job, target: str, incoming: Incoming, client: tls.TlsFiles, progress: Progress | None
    ) -> tuple[Sent, Job]:
        """The stream (its progress streamed from the source as it goes), then the target's
        job; on failure the target's QEMU goes and the source's runs."""
        try:
            sent: Sent = self._agent_call(job.node, "live_send", job.jid, incoming, client, progress=progress)
            history = self._log_of(job.jid, job.node)  # all of it: the source's guest is paused for good
            moved: Job = self._on(target, "live_adopt", incoming.job, history)
            return sent, moved
        except BaseException:
            self._undo(job, target, incoming.job)
            raise

    def _undo(self, job: Job, target: str, waiting: Job) -> None:
        for node, method, arg in ((target, "live_abort", waiting), (job.node, "live_resume", job.jid)):
            try:
                self._on(node, method, arg)
            except CedanaError as exc:
                log.error("job %s: %s on node %s failed: %s", job.jid, method, node[:12], exc)
        release(job.jid, target)

    def _moved(self, job: Job, moved: Job, sent: Sent, total: float) -> MigrateResult:
        """The job's record on its new node; the migration in its history."""
        record = self.registry.job(job.jid)
        details = {**record.details, **moved.details}
        update = {"node": moved.node, "state": moved.state, "pid": moved.pid, "log": moved.log, "details": details}
        record = record.model_copy(update=update)
        self.registry.save_job(record)
        times = {"duration_s": round(total, 6), "downtime_s": round(sent.downtime_s, 6)}
        sent_bytes = sent.transferred_bytes
        self.records.note(
            job.jid, EventKind.migrated, source=job.node, target=moved.node, route=LIVE, sent_bytes=sent_bytes, **times
        )
        return MigrateResult(
            jid=job.jid,
            source=job.node,
            target=moved.node,
            checkpoint=None,
            route=LIVE,
            dump_s=round(sent.total_s, 6),
            restore_s=round(max(total - sent.total_s, 0.0), 6),
            **times,
            job=record,
        )

    def _on(self, node: str, method: str, *args: Any) -> Any:
        """The agent's ``method`` on ``node``: one Ray round trip."""
        return call(getattr(self._agent(node), method).remote(*args))
