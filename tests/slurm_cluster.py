"""A real single-node SLURM cluster for tests and benchmarks: munged, slurmctld, slurmd.

Everything lives under one temp dir (config, state, spool, logs, the munge socket and
key) with free ports of its own, so it neither needs nor touches a system SLURM.
Clients find it through ``SLURM_CONF`` (see :attr:`SlurmCluster.env`). The daemons run
in the foreground as our children and are stopped by PID, never by name.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
READY_TIMEOUT_S = 30.0
# A requeued job may start again only once its launch credential expired
# (AuthInfo cred_expire, default 120 s): short here so tests need not wait.
CRED_EXPIRE_S = 5

SLURM_CONF = """\
ClusterName=cedanatest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire={cred_expire}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=2000
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
KillWait=30
SchedulerType=sched/builtin
# pending jobs (a requeued one once its BeginTime passed) are looked at every 2 s, not 60
SchedulerParameters=sched_interval=2
NodeName=localhost CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


def missing_binaries() -> list[str]:
    """The daemons and client tools this module needs that are not installed."""
    wanted = [*DAEMONS, "sbatch", "scontrol", "squeue", "scancel"]
    return [b for b in wanted if not shutil.which(b, path=f"{os.environ.get('PATH', '')}:/usr/sbin")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """munged + slurmctld + slurmd on this machine as node ``localhost``."""

    def __init__(self, cpus: int = 2, memory_mb: int = 16000) -> None:
        # mkdtemp makes it 0700; munged (user munge) must reach its own dir inside
        self.root = Path(tempfile.mkdtemp(prefix="crslurm-"))
        self.root.chmod(0o755)
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.cpus, self.memory_mb = cpus, memory_mb
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def env(self) -> dict[str, str]:
        """What a client (sbatch, scontrol, cedana-ray) needs to reach this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def start(self) -> SlurmCluster:
        try:
            self._start_munged()
            self._write_conf()
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._spawn("slurmd", ["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)])
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munged(self) -> None:
        munge = pwd.getpwnam("munge")
        home = self.munge_socket.parent
        home.mkdir()
        home.chmod(0o755)  # clients must reach the socket: munged checks for o+x
        key = home / "munge.key"
        key.write_bytes(secrets.token_bytes(128))
        key.chmod(0o400)
        for path in (home, key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        args = ["munged", "-F", f"--socket={self.munge_socket}", f"--key-file={key}"]
        args += [f"--pid-file={home}/munged.pid", f"--log-file={home}/munged.log", f"--seed-file={home}/seed"]
        self._spawn("munged", args, user=munge.pw_uid, group=munge.pw_gid)
        self._wait(lambda: self.munge_socket.exists(), "munged")

    def _write_conf(self) -> None:
        for d in ("state", "spool"):
            (self.root / d).mkdir()
        self.conf.write_text(
            SLURM_CONF.format(
                root=self.root,
                ctld_port=_free_port(),
                slurmd_port=_free_port(),
                munge_socket=self.munge_socket,
                cred_expire=CRED_EXPIRE_S,
                cpus=self.cpus,
                memory_mb=self.memory_mb,
            )
        )

    def _spawn(self, name: str, args: list[str], **kwargs: object) -> None:
        log = (self.root / f"{name}.out").open("wb")
        env = {**os.environ, **self.env, "PATH": f"{os.environ.get('PATH', '')}:/usr/sbin"}
        self.procs[name] = subprocess.Popen(  # type: ignore[call-overload]
            args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, **kwargs
        )

    def _wait_ready(self) -> None:
        def idle() -> bool:
            done = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
            return done.returncode == 0 and done.stdout.strip() in ("idle", "mixed", "allocated")

        self._wait(idle, "slurmd to register as idle")

    def _wait(self, ready: object, what: str) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready():  # type: ignore[operator]
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"{what}: not ready ({', '.join(dead) or 'timeout'}); logs in {self.root}")
            time.sleep(0.2)

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """A SLURM client command against this cluster."""
        env = {**os.environ, **self.env}
        return subprocess.run(args, capture_output=True, text=True, env=env, check=check, timeout=timeout)

    def cancel_all(self, timeout: float = 60.0) -> None:
        """Cancel every job and wait until they are gone: their batch scripts clean up
        (stop their Ray) only while slurmctld and slurmd are there to signal them."""
        if self.run("scancel", "--user", "root", check=False).returncode != 0:
            return
        deadline = time.monotonic() + timeout
        while self.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.5)

    def stop(self) -> None:
        """Cancel the jobs, stop the daemons by PID (slurmd first, munged last), remove the temp dir."""
        if "slurmd" in self.procs:
            self.cancel_all()
        for name in reversed(DAEMONS):
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.root)
