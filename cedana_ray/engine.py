"""Local mode: every operation as a pipeline, with the registry and the store.

The core chains wrap each type's plugin middleware and handler:

* dump:    locked > require_live > finish_dump > commit > <plugin> > <gpu> > criu_dump
  (:mod:`cedana_ray.dumping`)
* restore: locked > replace_dead > fetch > <plugin> > <gpu> > <plugin late> > <plugin handler>
  (:mod:`cedana_ray.restoring`)
* run:     <plugin> > <plugin late> > <plugin handler>, under the job's lock
* a direct migration's two halves, the dump chain ending in ``send`` on the source and the
  restore chain with ``received`` for ``fetch`` on the target (:mod:`cedana_ray.handover`)
"""

from __future__ import annotations

import fcntl
import os
import secrets
import signal
import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from typing import Any

from . import recovery
from .backend import Progress
from .config import Paths, paths
from .crypto import KEY_ENV, KEY_FILE, load_key, save_key, saved_key
from .dumping import DumpChain
from .errors import JobNotFound, StateError, UsageError
from .handover import Handover
from .models import LIVE_STATES, Job, JobState, MigrateResult, NodeStatus
from .pipeline import Context, Handler, Middleware, Pipeline, QueryState, RunState
from .plugins_manager import PluginManager, get_plugin_manager
from .proctree import alive, parse_signal, signal_tree
from .records import Records, RecordVerbs, require_state
from .registry import Registry
from .requests import DumpRequest, ManageRequest, RunRequest
from .restoring import RestoreChain
from .signing import Signer
from .staging import remove_tree
from .store import CheckpointStore
from .working_dir import unpack

NO_CLUSTER = "`cedana-ray up` first, or set RAY_ADDRESS"


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


class Engine(DumpChain, RestoreChain, Handover, RecordVerbs):
    """cedana-ray on one machine, without a cluster (``--local``)."""

    def __init__(
        self,
        home: Paths | None = None,
        pm: PluginManager | None = None,
        node: str = "local",
        cluster_address: str | None = None,
        signer: Signer | None = None,
        key: bytes | None = None,
    ) -> None:
        self.paths = (home or paths()).ensure()
        self.node = node  # the Ray node id when a NodeAgent runs this engine
        self.cluster_address = cluster_address  # where a job's own checkpoint requests go
        # the cluster's key on a node of a cluster, else this state dir's own
        self.signer = signer or Signer.load(self.paths.signing_key)
        # what every dump here is encrypted with: a cluster's own key on its nodes, else CEDANA_RAY_KEY
        self.key = key if cluster_address else key or load_key(None)
        self.registry = Registry(self.paths.db)
        # on a cluster's node, the coordinator catalogs the checkpoints and keeps the history (cedana_ray.records)
        self.records = Records(self.registry, self.signer, authoritative=cluster_address is None)
        self.pm = pm or get_plugin_manager()
        recovery.repair(self)

    def store(self, url: str) -> CheckpointStore:
        """The checkpoint store at ``url``, trusting only checkpoints signed with our key."""
        return CheckpointStore(url, self.signer)

    # -- jobs
    def job(self, jid: str) -> Job:
        return self._refresh(self.registry.job(jid))

    def jobs(self) -> list[Job]:
        return [self._refresh(j) for j in self.registry.jobs()]

    def _refresh(self, job: Job) -> Job:
        """Notice a live job whose process is gone: exited (with its code) or lost."""
        if job.state not in LIVE_STATES or alive(job.pid, job.details.get("started")):
            return job
        code = self.pm.call_for(job.type, "cedana_reaper", job=job)
        state = JobState.lost if code is None else JobState.exited
        seen = []

        def unchanged(now: Job) -> bool:  # unless the job moved on meanwhile (restored, by another process)
            seen.append((now.state, now.pid) == (job.state, job.pid))
            return seen[-1]

        ended = self.registry.update_job(job.jid, when=unchanged, state=state, exit_code=code)
        if seen[-1]:  # this process noticed it: its history says so once
            self.records.ended(ended)
        return ended

    def _live(self, jid: str, *states: JobState) -> Job:
        return require_state(self.job(jid), *states)

    def _handler(self, jtype: str, hook: str, what: str) -> Handler:
        return self.pm.require(jtype, hook, what)

    def _middleware(self, jtype: str, *hooks: str) -> list[Middleware]:
        return [m for hook in hooks for m in (self.pm.call_for(jtype, hook) or [])]

    def _new_job(
        self, jtype: str, jid: str | None, hook: str, what: str, request: Any, middleware: list[Middleware]
    ) -> Job:
        jid = jid or new_id("job")
        handler = self._handler(jtype, hook, what)
        with self.lock(jid):  # of two starts of one id, exactly one runs a workload
            if self._existing(jid):
                raise StateError(f"a job named {jid!r} already exists")
            job_dir = self.paths.job_dir(jid)
            job_dir.mkdir(parents=True, exist_ok=True)
            self._keep_job_key(jid, request)
            ctx = Context(request, RunState(jid, job_dir, self._control(jid)))
            try:
                job = Pipeline(handler).with_(*middleware)(ctx).model_copy(update={"node": self.node})
            except BaseException:
                remove_tree(job_dir)
                raise
            self.records.started(job)
        return job

    def _keep_job_key(self, jid: str, request: Any) -> None:
        """With ``run --encrypt``: keep the key that every checkpoint of the job is encrypted with."""
        if not getattr(request, "encrypt", False):
            return
        if request.key and self.cluster_address:
            raise UsageError("a cluster encrypts with its own key", hint="set it with `cedana-ray up --encrypt`")
        key = request.key.get_secret_value() if request.key else self.key
        if key is None:
            hint = "`cedana-ray up --encrypt`" if self.cluster_address else f"--key-file FILE or {KEY_ENV}"
            raise UsageError("--encrypt needs a key", hint=hint)
        if key != self.key:
            save_key(self.paths.job_dir(jid) / KEY_FILE, key)

    def key_of(self, jid: str) -> bytes | None:
        """The key the checkpoints of job ``jid`` are encrypted with: its own, else this node's."""
        return saved_key(self.paths.job_dir(jid) / KEY_FILE) or self.key

    def _control(self, jid: str) -> dict[str, Any]:
        """How a job's supervisor serves the job's own checkpoint requests (cedana_ray.inside):
        as we would, with our environment (a store's credentials, Ray's token). The supervisor
        gets it privately, never in its own environment or on a command line, and the job never."""
        argv = [sys.executable, "-m", "cedana_ray.cli", "dump", "job", jid, "--leave-running", "--json"]
        env = dict(os.environ)
        if self.cluster_address:
            env["CEDANA_RAY_ADDRESS"] = self.cluster_address
        else:
            argv.append("--local")
            env["CEDANA_RAY_HOME"] = str(self.paths.home)
        return {"dir": str(self.paths.control(jid)), "argv": argv, "env": env}

    def run(self, jtype: str, request: RunRequest) -> Job:
        """Start a workload of type ``jtype`` on this machine."""
        if request.node not in (None, "local", self.node) or request.restore_on_loss or request.resources:
            raise UsageError(
                "--node, --restore-on-loss, --cpus, --gpus and --memory need a cluster", hint="`cedana-ray up` first"
            )
        if request.working_dir:
            here = unpack(request.working_dir, self.paths.working_dirs)
            request = request.model_copy(update={"cwd": str(here), "working_dir": None})
        hook = "cedana_run_handler_serverless"
        mws = self._middleware(jtype, "cedana_run_middleware", "cedana_gpu_tracing", "cedana_run_middleware_late")
        job = self._new_job(jtype, request.jid, hook, "running without a cluster", request, mws)
        if request.checkpoint_every:
            from . import policy

            pid = policy.start(self.paths.home, job.jid, request.checkpoint_every, request.keep)
            details = {"policy": {"every_s": request.checkpoint_every, "keep": request.keep, "pid": pid}}
            job = self.registry.update_job(job.jid, details=details)
        return job

    def manage(self, jtype: str, request: ManageRequest) -> Job:
        """Adopt a workload started elsewhere."""
        self._here(request.node)
        if found := self._job_of(jtype, request.target):
            raise StateError(f"{jtype} {request.target} is already job {found.jid}")
        return self._new_job(jtype, request.jid, "cedana_manage_handler", "manage", request, [])

    def _job_of(self, jtype: str, target: str) -> Job | None:
        for job in self.jobs():
            if job.type == jtype and job.state in LIVE_STATES and job.target == target:
                return job
        return None

    def _here(self, node: str | None) -> None:
        """Refuse a node other than this one: without a cluster the only node is ``local``."""
        if node not in (None, "local", self.node):
            raise UsageError(f"unknown node {node!r}: without a cluster the only node is 'local'", hint=NO_CLUSTER)

    def kill(self, jid: str, sig: int | str | None = None) -> Job:
        """Stop job ``jid`` with its type's kill signal and record it killed; given ``sig``,
        only send it ``sig`` (see :meth:`send`)."""
        if sig is not None:
            number = parse_signal(sig)  # a bad name is refused whatever the job
            return self.send(self._live(jid), number)
        job = self.registry.update_job(self._live(jid).jid, state=JobState.killed)
        self.stop(job)
        self.records.ended(job)
        return job

    def send(self, job: Job, sig: int) -> Job:
        """Send ``sig`` to the job's process (a ``process`` job's init forwards it to the
        workload). Nothing is recorded: a workload that exits on it is then reaped as exited."""
        if job.pid is None:
            raise StateError(f"job {job.jid} has no process to signal")
        with suppress(ProcessLookupError):  # gone meanwhile: the reaper records it
            os.kill(job.pid, sig)
        return job

    def stop(self, job: Job) -> None:
        """Stop the job's workload with its type's kill signal."""
        sig = self.pm.call_for(job.type, "cedana_kill_signal") or signal.SIGTERM
        if job.pid is not None:
            signal_tree(job.pid, sig)

    def delete(self, jid: str) -> Job:
        job = self.job(jid)
        if job.state in LIVE_STATES:
            raise StateError(f"job {jid} is {job.state.value}", hint=f"`cedana-ray job kill {jid}` first")
        self.pm.call_for(job.type, "cedana_cleanup", job=job)
        self.records.deleted(jid)
        return job

    def freeze(self, jid: str) -> Job:
        return self._set_frozen(self._live(jid, JobState.running), JobState.frozen, "cedana_freeze_handler")

    def unfreeze(self, jid: str) -> Job:
        return self._set_frozen(self._live(jid, JobState.frozen), JobState.running, "cedana_unfreeze_handler")

    def _set_frozen(self, job: Job, state: JobState, hook: str) -> Job:
        handler = self._handler(job.type, hook, hook.split("_")[1])
        with self.lock(job.jid):
            Pipeline(handler)(Context(None, job=job))
            return self.registry.update_job(job.jid, state=state)

    def query(self, jtype: str) -> list[dict[str, Any]]:
        handler = self._handler(jtype, "cedana_query_handler", "query")
        jobs = self.jobs()  # all of them in state: `query gpu` tells which jobs use each GPU
        return Pipeline(handler)(Context([j for j in jobs if j.type == jtype], QueryState(jobs)))

    # -- locks
    @contextmanager
    def lock(self, jid: str) -> Iterator[int]:
        """Serialize run/dump/restore/freeze of one job across processes; refuse, never wait.
        Yields the lock's descriptor: a child that inherits it holds the lock as long as it runs."""
        with open(self.paths.locks / f"{jid}.lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StateError(f"job {jid} is busy: another run, dump or restore of it is in progress") from None
            yield f.fileno()

    def _exclusive(self, jid: str) -> AbstractContextManager[int]:
        return self.lock(jid)

    def _existing(self, jid: str) -> Job | None:
        try:
            return self.job(jid)
        except JobNotFound:
            return None

    def log_path(self, jid: str) -> str:
        job = self.job(jid)
        if not job.log or not os.path.exists(job.log):
            raise UsageError(f"job {jid} has no log", hint="adopted (managed) jobs keep their own output")
        return job.log

    def read_log(self, jid: str, offset: int = 0, limit: int = 1 << 20) -> bytes:
        """Up to ``limit`` bytes of job ``jid``'s output, from ``offset`` (from the end if negative)."""
        with open(self.log_path(jid), "rb") as f:
            f.seek(max(0, offset + os.fstat(f.fileno()).st_size) if offset < 0 else offset)
            return f.read(limit)

    # -- the cluster's verbs: none without one
    def migrate(
        self,
        jid: str,
        node: str,
        request: DumpRequest | None = None,
        progress: Progress | None = None,
        live: bool = False,
    ) -> MigrateResult:
        raise UsageError("migration needs a cluster", hint="on one machine, `dump job` then `restore job`")

    def drain(self, node: str) -> list[MigrateResult]:
        raise UsageError("draining a node needs a cluster", hint=NO_CLUSTER)

    def undrain(self, node: str) -> str:
        raise UsageError("draining a node needs a cluster", hint=NO_CLUSTER)

    def nodes(self) -> list[NodeStatus]:
        raise UsageError("listing nodes needs a cluster", hint=NO_CLUSTER)

    def info(self) -> dict[str, Any]:
        return {"mode": "local", "home": str(self.paths.home), "encrypted": self.key is not None}
