"""Local mode: every operation as a pipeline, with the registry and the store.

The core chains wrap each type's plugin middleware and handler:

* dump:    locked > require_live > finish_dump > commit > <plugin> > <gpu> > criu_dump
* restore: locked > replace_dead > fetch > <plugin> > <gpu> > <plugin late> > <plugin handler>
* run:     <plugin> > <plugin late> > <plugin handler>
"""

from __future__ import annotations

import fcntl
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from typing import Any

from pydantic import SecretBytes

from . import catalog, criu, failpoint, recovery
from .config import Paths, paths
from .crypto import KEY_ENV, KEY_FILE, cipher_for, load_key, save_key, saved_key
from .errors import CedanaError, CheckpointNotFound, JobNotFound, StateError, UsageError
from .models import LIVE_STATES, CheckpointInfo, DumpResult, Job, JobState, Manifest, RestoreResult, utcnow
from .pipeline import Context, Handler, Middleware, Pipeline
from .plugins_manager import PluginManager, get_plugin_manager
from .proctree import alive, parse_signal, signal_tree, tree_rss
from .registry import Registry
from .requests import DumpRequest, ManageRequest, RestoreRequest, RunRequest
from .retry import until
from .signing import Signer
from .staging import remove_tree, staging_area
from .store import CheckpointStore, split_url

Progress = Callable[[str, int, int], None]
STOP_TIMEOUT_S = 30.0  # for a dumped job to be gone once killed: one holding GBs of memory takes seconds
STOP_POLL_S = 0.02


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


def _beside_criu(streams: int) -> int:
    """Hashing threads that leave CRIU a core while it restores (it is the slower of the two)."""
    return max(1, min(streams, (os.cpu_count() or 1) - 1))


class Engine:
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
        # unless the job moved on meanwhile (restored, by another process): that is its state
        same = job.model_dump(include={"state", "pid"})
        return self.registry.update_job(
            job.jid, when=lambda now: now.model_dump(include={"state", "pid"}) == same, state=state, exit_code=code
        )

    def _live(self, jid: str, *states: JobState) -> Job:
        job = self.job(jid)
        if job.state not in (states or LIVE_STATES):
            raise StateError(
                f"job {jid} is {job.state.value}, not {' or '.join(s.value for s in states or LIVE_STATES)}"
            )
        return job

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
            ctx = Context(request, state={"jid": jid, "job_dir": job_dir, "control": self._control(jid)})
            try:
                job = Pipeline(handler).with_(*middleware)(ctx).model_copy(update={"node": self.node})
            except BaseException:
                remove_tree(job_dir)
                raise
            self.registry.add_job(job)
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
        if request.node not in (None, "local", self.node) or request.restore_on_loss:
            raise UsageError("--node and --restore-on-loss need a cluster", hint="`cedana-ray up` first")
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
        if found := self._job_of(jtype, request.target):
            raise StateError(f"{jtype} {request.target} is already job {found.jid}")
        return self._new_job(jtype, request.jid, "cedana_manage_handler", "manage", request, [])

    def _job_of(self, jtype: str, target: str) -> Job | None:
        for job in self.jobs():
            if job.type == jtype and job.state in LIVE_STATES and job.target == target:
                return job
        return None

    def job_for(self, jtype: str, target: str) -> Job:
        """The live job of ``target`` (a PID, a container id), adopting it if needed."""
        return self._job_of(jtype, target) or self.manage(jtype, ManageRequest(target=target))

    def set_storage(self, jid: str, url: str) -> Job:
        """Make ``url`` the default checkpoint store of job ``jid``."""
        CheckpointStore(url)  # refuses an unknown scheme now, not at the first dump
        return self.registry.update_job(jid, details={"storage": url})

    def kill(self, jid: str, sig: int | str | None = None) -> Job:
        """Stop job ``jid`` with its type's kill signal and record it killed; given ``sig``,
        only send it ``sig`` (see :meth:`send`)."""
        if sig is not None:
            number = parse_signal(sig)  # a bad name is refused whatever the job
            return self.send(self._live(jid), number)
        job = self.registry.update_job(self._live(jid).jid, state=JobState.killed)
        self.stop(job)
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
        self.registry.delete_job(jid)
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
        return Pipeline(handler)(Context([j for j in jobs if j.type == jtype], state={"jobs": jobs}))

    # -- dump
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

    def locked(self, ctx: Context, next_: Handler) -> Any:
        with self.lock(ctx.state["jid"]) as fd:
            ctx.state["lock"] = fd
            return next_(ctx)

    def require_live(self, ctx: Context, next_: Handler) -> Any:
        ctx.job = self._live(ctx.job.jid)
        return next_(ctx)

    def finish_dump(self, ctx: Context, next_: Handler) -> DumpResult:
        """Stop the job once its checkpoint is stored; resume it if anything failed."""
        job: Job = ctx.job
        try:
            result = next_(ctx)
        except BaseException as exc:
            if job.state is JobState.running and job.pid is not None:
                signal_tree(job.pid, signal.SIGCONT)  # CRIU left the tree stopped
            for undo in ctx.state.get("rollback", []):  # e.g. give a CUDA job its GPU back
                try:
                    undo()
                except CedanaError as undo_error:
                    exc.add_note(f"while resuming the job: {undo_error}")
            self.registry.update_job(job.jid, details=recovery.CLEARED)
            raise
        failpoint.reached("dump:committed")
        update: dict[str, Any] = {"last_checkpoint": result.checkpoint}
        if not ctx.request.leave_running:
            update["state"] = JobState.checkpointed
        self.registry.update_job(job.jid, **update)  # not a whole row: a `job kill` meanwhile stays recorded
        try:
            if not ctx.request.leave_running:
                self.stop(job)
                self._wait_stopped(job)
        finally:
            self.registry.update_job(job.jid, details=recovery.CLEARED)  # only now: see cedana_ray.recovery
        return result

    def _wait_stopped(self, job: Job) -> None:
        """Return once the dumped job, sent its kill signal, is gone as its runtime reports it.
        A killed process takes a moment to exit and be reaped, and containerd one more to
        notice: a dump that returned at once left its container reported running (issue 16)."""
        if not until(lambda: self._stopped(job), STOP_TIMEOUT_S, STOP_POLL_S):
            raise StateError(f"job {job.jid} is checkpointed but still runs {STOP_TIMEOUT_S:.0f} s after being killed")

    def _stopped(self, job: Job) -> bool:
        """The type's own answer (``cedana_stopped``), else whether the job's process is dead."""
        stopped = self.pm.call_for(job.type, "cedana_stopped", job=job)
        return not alive(job.pid, job.details.get("started")) if stopped is None else stopped

    def commit(self, ctx: Context, next_: Handler) -> DumpResult:
        """Dump into a fresh image dir, then store it and write the manifest."""
        req: DumpRequest = ctx.request
        job: Job = ctx.job
        store = self.store(req.storage or job.details.get("storage") or self.paths.storage)
        ckpt = f"{job.jid}-{time.strftime('%Y%m%dT%H%M%S')}-{secrets.token_hex(2)}"
        work = staging_area(self.paths.staging, tree_rss(job.pid))
        self.registry.update_job(job.jid, details=recovery.mark(ckpt, store.url))
        images = store.dump_dir(ckpt, req.compression, work, encrypted=req.encrypt)
        ctx.state.update(images=images, work=work)
        try:
            early = store.early_chunks(images, ckpt, req.compression, req.encryption_key(), req.streams)
            with early as prehashed:
                next_(ctx)
            ctx.report("store")
            manifest = store.commit(
                images,
                {
                    "checkpoint": ckpt,
                    "jid": job.jid,
                    "type": job.type,
                    "node": job.node,
                    "created": utcnow(),
                    "criu_version": criu.version(),
                    "criu": req.criu,
                    "parent": job.last_checkpoint,
                    "details": {**ctx.state.get("details", {}), "command": job.command},
                },
                compression=req.compression,
                streams=req.streams,
                progress=ctx.progress,
                prehashed=prehashed,
                key=req.encryption_key(),
            )
        except BaseException:
            store.discard(ckpt)
            raise
        finally:
            remove_tree(work)  # CRIU's logs, and the images when they were staged
        info = CheckpointInfo.of(manifest, store.url_of(ckpt))
        self.registry.add_checkpoint(info)
        return DumpResult(
            jid=job.jid,
            checkpoint=ckpt,
            path=info.path,
            size_bytes=manifest.size_bytes,
            image_bytes=manifest.image_bytes,
            duration_s=0.0,
        )

    def criu_dump(self, ctx: Context) -> None:
        criu.dump(
            ctx.state["pid"],
            ctx.state["images"],
            ctx.state["work"],
            ctx.request.criu,
            leave_running=ctx.request.leave_running,
            enter=ctx.state.get("enter"),
            hold=ctx.state["lock"],
        )

    def dump(self, jid: str, request: DumpRequest, progress: Progress | None = None) -> DumpResult:
        """Checkpoint job ``jid`` into the store."""
        job = self.job(jid)
        criu.version()
        if not request.encrypt and (key := self.key_of(jid)):  # however the dump was asked for
            request = request.model_copy(update={"encrypt": True, "key": SecretBytes(key)})
        handler = self.pm.call_for(job.type, "cedana_dump_handler") or self.criu_dump
        chain = [self.locked, self.require_live, self.finish_dump, self.commit]
        chain += self._middleware(job.type, "cedana_dump_middleware", "cedana_gpu_interception")
        ctx = Context(request, job=job, progress=progress, state={"jid": jid})
        start = time.perf_counter()
        result: DumpResult = Pipeline(handler).with_(*chain)(ctx)
        return result.model_copy(update={"duration_s": round(time.perf_counter() - start, 6), "timings": ctx.timings})

    # -- restore
    def fetch(self, ctx: Context, next_: Handler) -> Job:
        """Verify and lay out the checkpoint's images locally for the handler.

        Images CRIU can read where they are stored are verified while CRIU restores
        them into a stopped tree, which resumes only once every chunk checked out (it
        is killed otherwise): an unverified image never runs. GPU jobs, whose restore
        needs the tree running, are verified first.
        """
        store: CheckpointStore = ctx.state["store"]
        manifest: Manifest = ctx.state["manifest"]
        tmp = staging_area(self.paths.staging, manifest.image_bytes)
        (tmp / "work").mkdir()
        ctx.state["work"] = tmp / "work"
        try:
            if not store.readable_in_place(manifest) or manifest.details.get("gpu"):
                _, ctx.state["images"] = store.fetch(
                    manifest.checkpoint,
                    tmp / "images",
                    ctx.request.streams,
                    ctx.progress,
                    ctx.request.decryption_key(),
                    manifest=manifest,
                )
                return next_(ctx)
            ctx.state.update(images=store.link(manifest, tmp / "images"), leave_stopped=True)
            with ThreadPoolExecutor(1) as verifier:
                verified = verifier.submit(store.verify, manifest, _beside_criu(ctx.request.streams))
                job: Job = next_(ctx)
                try:
                    verified.result()
                except BaseException:
                    signal_tree(job.pid, signal.SIGKILL)
                    raise
            if not manifest.details.get("frozen"):
                signal_tree(job.pid, signal.SIGCONT)
            return job
        finally:
            remove_tree(tmp)

    def restore(
        self,
        request: RestoreRequest,
        jid: str | None = None,
        jtype: str | None = None,
        progress: Progress | None = None,
    ) -> RestoreResult:
        """Restore a checkpoint: the last (or a given) one of job ``jid``, or ``request.path``.

        The restored job keeps the job's id unless ``request.jid`` names a new one (a
        clone); a live job is never replaced.
        """
        url = request.path or self._checkpoint_of(jid, request.checkpoint).path
        root, ckpt = split_url(url)
        store = self.store(root)
        manifest = self._manifest(store, ckpt, request.manifest)
        if request.key is None and (key := self.key_of(manifest.jid)):
            request = request.model_copy(update={"key": SecretBytes(key)})
        cipher_for(manifest, request.decryption_key())  # a wrong, missing or refused key fails here, not mid-restore
        criu.version()
        if jtype and manifest.type != jtype:
            raise UsageError(f"checkpoint {ckpt} is of a {manifest.type} job, not {jtype}")
        if request.gpu_map and not manifest.details.get("gpu"):
            raise UsageError(f"--gpu-map: checkpoint {ckpt} holds no GPU state")
        target = request.jid or jid or manifest.jid
        job_dir = self.paths.job_dir(target)
        job_dir.mkdir(parents=True, exist_ok=True)
        chain = [self.locked, self.replace_dead, self.fetch]
        chain += self._middleware(
            manifest.type,
            "cedana_restore_middleware",
            "cedana_gpu_interception_restore",
            "cedana_gpu_tracing_restore",
            "cedana_restore_middleware_late",
        )
        handler = self._handler(manifest.type, "cedana_restore_handler", "restore")
        state = {
            "manifest": manifest,
            "jid": target,
            "job_dir": job_dir,
            "store": store,
            "checkpoint": ckpt,
            "command": manifest.details.get("command", []),
            "control": self._control(target),
        }
        ctx = Context(request, progress=progress, state=state)
        start = time.perf_counter()
        job: Job = Pipeline(handler).with_(*chain)(ctx)
        if manifest.encryption and not saved_key(job_dir / KEY_FILE) and request.decryption_key() != self.key:
            save_key(job_dir / KEY_FILE, request.decryption_key())  # an encrypted job stays encrypted
        duration = round(time.perf_counter() - start, 6)
        return RestoreResult(job=job, checkpoint=ckpt, duration_s=duration, timings=ctx.timings)

    def _manifest(self, store: CheckpointStore, ckpt: str, given: Manifest | None) -> Manifest:
        """The manifest of ``ckpt``: the one the coordinator read and handed down, once it
        verifies (no I/O), else read from the store: a restore reads it once."""
        if given is None:
            return store.manifest(ckpt)
        if given.checkpoint != ckpt:
            raise UsageError(f"the manifest given is of checkpoint {given.checkpoint}, not {ckpt}")
        return self.signer.verify(given)

    def _checkpoint_of(self, jid: str | None, ckpt: str | None) -> CheckpointInfo:
        if ckpt:
            return self.registry.checkpoint(ckpt)
        if not jid:
            raise UsageError("name a job, a checkpoint or a checkpoint path")
        job = self.job(jid)
        if not job.last_checkpoint:
            raise CheckpointNotFound(f"job {jid} has no checkpoint", hint=f"`cedana-ray dump job {jid}`")
        return self.registry.checkpoint(job.last_checkpoint)

    def _existing(self, jid: str) -> Job | None:
        try:
            return self.job(jid)
        except JobNotFound:
            return None

    def replace_dead(self, ctx: Context, next_: Handler) -> Job:
        """Restore over a job only if it is not live, and record the restored job, both under
        the job's lock: of two restores of one job, exactly one runs it."""
        target = ctx.state["jid"]
        existing = self._existing(target)
        if existing and existing.state in LIVE_STATES:
            raise StateError(
                f"job {target} is {existing.state.value}", hint="restore a clone with --jid NEW, or kill the job first"
            )
        return self._record_restore(existing, next_(ctx), ctx.state["manifest"])

    def _record_restore(self, existing: Job | None, restored: Job, manifest: Manifest) -> Job:
        update = {"last_checkpoint": manifest.checkpoint, "node": self.node}
        if existing:
            keep = {"created", "command", "managed"}
            restored = existing.model_copy(update={**restored.model_dump(exclude=keep), **update})
        else:
            restored = restored.model_copy(update=update)
        self.registry.save_job(restored)
        return restored

    # -- checkpoints
    def checkpoints(self, jid: str | None = None) -> list[CheckpointInfo]:
        if jid is not None:
            self.job(jid)
        return self.registry.checkpoints(jid)

    def inspect(self, ckpt: str) -> Manifest:
        return catalog.inspect(self.registry, ckpt, self.signer)

    def import_checkpoint(self, url: str) -> CheckpointInfo:
        """Trust and catalog the checkpoint at ``url``, made elsewhere (see :func:`catalog.adopt`)."""
        return catalog.adopt(self.registry, url, self.signer)

    def delete_checkpoint(self, ckpt: str) -> CheckpointInfo:
        with self.lock(self.registry.checkpoint(ckpt).jid):
            return catalog.delete(self.registry, ckpt, self.signer)

    def log_path(self, jid: str) -> str:
        job = self.job(jid)
        if not job.log or not os.path.exists(job.log):
            raise UsageError(f"job {jid} has no log", hint="adopted (managed) jobs keep their own output")
        return job.log

    def read_log(self, jid: str, offset: int = 0, limit: int = 1 << 20) -> bytes:
        """Up to ``limit`` bytes of job ``jid``'s output, from ``offset``."""
        with open(self.log_path(jid), "rb") as f:
            f.seek(offset)
            return f.read(limit)
