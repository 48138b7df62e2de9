"""NodeAgent: the cedana-ray daemon of one Ray node.

One per alive node, pinned there and restarted by Ray when it dies. It runs the
core pipelines with this node's plugins through an :class:`Engine` whose state
lives under ``BASE/nodes/NODE_ID``, so a restarted agent finds its jobs again:
workloads are started detached (the process supervisor double-forks into its own
session), outlive the agent, and are re-adopted from the node's registry.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil

from cedana_ray.backend import VERBS, Progress
from cedana_ray.config import Paths
from cedana_ray.engine import Engine
from cedana_ray.errors import CedanaError, JobNotFound, UsageError
from cedana_ray.handoff import Receiver
from cedana_ray.models import LIVE_STATES, DumpResult, Manifest, NodeStatus, RestoreResult
from cedana_ray.proctree import signal_tree
from cedana_ray.remote import COORDINATOR, NAMESPACE, call, streamed
from cedana_ray.requests import DumpRequest, RestoreRequest
from cedana_ray.signing import Signer
from cedana_ray.staging import remove_tree, staging_area
from cedana_ray.working_dir import unpack

from .live_migration import LiveAgent

DRAIN_DEADLINE_S = 60.0
TYPES_TTL_S = 60.0
HANDOFF_WAIT_S = 120.0  # for the images to be down once the source says it sent them all
log = logging.getLogger("cedana_ray.agent")


def node_home(base: str | Path, node_id: str) -> Path:
    return Path(base) / "nodes" / node_id


class NodeAgent(LiveAgent):  # its side of live migrations: live_migration.py
    def __init__(self, node_id: str, base: str, signer: Signer, key: bytes | None = None) -> None:
        os.umask(0o077)  # the node's jobs, logs and images hold process memory: ours alone
        home = node_home(base, node_id)
        os.environ["CEDANA_RAY_HOME"] = str(home)  # plugins that read the state dir see the node's
        self.node_id = node_id
        import ray

        address = ray.get_runtime_context().gcs_address
        self._known_types: list[str] = []
        self._types_at = -TYPES_TTL_S
        self._handoffs: dict[str, Receiver] = {}
        self.engine = Engine(Paths(home, Path(base)), node=node_id, cluster_address=address, signer=signer, key=key)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, *_: object) -> None:
        """A node about to go away (a preemption notice) says so with SIGTERM: move the
        node's jobs elsewhere within the deadline, then go."""
        threading.Thread(target=self._drain_and_exit, name="drain", daemon=True).start()

    def _drain_and_exit(self) -> None:
        import ray

        deadline = float(os.environ.get("CEDANA_RAY_DRAIN_DEADLINE_S", DRAIN_DEADLINE_S))
        try:
            coordinator = ray.get_actor(COORDINATOR, namespace=NAMESPACE)
            moved = call(coordinator.drain.remote(self.node_id), timeout=deadline)
            log.warning("SIGTERM: %d job(s) moved off node %s", len(moved), self.node_id[:12])
        except CedanaError as exc:
            log.error("SIGTERM: drain of node %s failed: %s", self.node_id[:12], exc)
        os._exit(0)

    def status(self) -> NodeStatus:
        """Health and load: what placement and `cedana-ray nodes` show."""
        vm = psutil.virtual_memory()
        return NodeStatus(
            node=self.node_id,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            types=self._types(),
            live_jobs=sum(j.state in LIVE_STATES for j in self.engine.jobs()),
            cpus=psutil.cpu_count() or 1,
            memory_available=vm.available,
        )

    def _types(self) -> list[str]:
        """The job types this node can restore (a process's, or a virtual machine's), from the
        plugins' health; cached, since health checks (CRIU, daemons, endpoints) take a while
        and rarely change."""
        from cedana_ray.features import Status, compute

        now = time.monotonic()
        if now - self._types_at > TYPES_TTL_S:
            features = compute(self.engine.pm).features
            rows = (features.get("Restore handler", {}), features.get("Restore VM handler", {}))
            self._known_types = sorted({p for row in rows for p, s in row.items() if s == Status.implemented})
            self._types_at = now
        return self._known_types

    def serve(self, verb: str, *args: Any, **kwargs: Any) -> Any:
        """The engine's ``verb`` (:class:`~cedana_ray.backend.Backend`), for the coordinator."""
        if verb not in VERBS:
            raise UsageError(f"no such verb: {verb!r}")
        return getattr(self.engine, verb)(*args, **kwargs)

    def restore(self, request: RestoreRequest, history: bytes = b"", progress: Progress | None = None) -> RestoreResult:
        """Restore a checkpoint here; ``history`` is the job's output so far on its previous node."""
        self._arrive(request, history)
        return self.engine.restore(request, progress=progress)

    def _arrive(self, request: RestoreRequest, history: bytes) -> None:
        """What a job coming from another node needs here before its restore: its working
        directory, which CRIU restores by its path, and its output so far, which it appends to."""
        if request.working_dir:
            unpack(request.working_dir, self.engine.paths.working_dirs)
        if history and request.jid:
            log = self.engine.paths.job_dir(request.jid) / "log"
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_bytes(history)

    # -- direct migration: the images straight from the source node to the target (cedana_ray.handoff)
    def handoff_bytes(self, jid: str) -> int:
        return self.engine.handoff_bytes(jid)

    def handoff_receive(self, hid: str, key: bytes, nbytes: int) -> tuple[str, int]:
        """Listen for the images of handoff ``hid``, sent with ``key``; the address to send them to."""
        import ray

        dest = staging_area(self.engine.paths.staging, nbytes) / "images"
        dest.mkdir(mode=0o700)
        self._handoffs[hid] = receiver = Receiver(dest, key, ray.util.get_node_ip_address())
        return receiver.address

    def handoff_send(
        self, jid: str, request: DumpRequest, address: tuple[str, int], key: bytes, progress: Progress | None = None
    ) -> Manifest:
        return self.engine.hand_off(jid, request, address, key, progress)

    def handoff_restore(
        self, request: RestoreRequest, history: bytes, hid: str, progress: Progress | None = None
    ) -> RestoreResult:
        """Restore the job whose images arrived for handoff ``hid``, once they all did."""
        images = self._handoffs[hid].wait(HANDOFF_WAIT_S)
        self._arrive(request, history)
        return self.engine.restore_received(request, images, progress)

    def handoff_store(self, hid: str, manifest: Manifest, request: DumpRequest) -> DumpResult:
        """Keep what arrived for handoff ``hid`` as the restored job's checkpoint."""
        try:
            return self.engine.store_received(self._handoffs[hid].dest, manifest, request)
        except CedanaError:
            self.engine.forget_received(manifest)
            raise
        finally:
            self.handoff_discard(hid)

    def handoff_discard(self, hid: str, manifest: Manifest | None = None) -> None:
        """Drop handoff ``hid``: stop listening, remove what arrived (with ``manifest``: the
        job restored from it has no checkpoint of it)."""
        if receiver := self._handoffs.pop(hid, None):
            receiver.close()
            remove_tree(receiver.dest.parent)
        if manifest is not None:
            self.engine.forget_received(manifest)

    def stream(self, method: str, *args: Any) -> Iterator[Any]:
        """``serve``, ``restore``, a handoff's send and restore or a live migration's send, with its progress streamed
        to the caller as it comes (:func:`cedana_ray.remote.streamed`)."""
        if method not in ("serve", "restore", "handoff_send", "handoff_restore", "live_send"):
            raise UsageError(f"no such method: {method!r}")
        fn = getattr(self, method)
        yield from streamed(lambda progress: fn(*args, progress=progress))

    def forget(self, jid: str) -> None:
        """Drop a job that now lives on another node, stopping what is left of it here."""
        try:
            job = self.engine.registry.job(jid)
        except JobNotFound:
            return
        if job.state in LIVE_STATES and job.pid:
            signal_tree(job.pid, signal.SIGKILL)
        self.engine.pm.call_for(job.type, "cedana_cleanup", job=job)
        self.engine.registry.delete_job(jid)
