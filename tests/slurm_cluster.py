"""A real SLURM cluster for tests and benchmarks: munged, slurmctld, one slurmd per node.

Everything lives under one temp dir (config, state, spool, logs, the munge socket and
key) with free ports of its own, so it neither needs nor touches a system SLURM.
Clients find it through ``SLURM_CONF`` (see :attr:`SlurmCluster.env`). The daemons run
in the foreground as our children and are stopped by PID, never by name.

One node is this machine, named ``localhost``. With more, node ``crs1`` is this machine
and every other node (``crs2``...) is a :class:`~netns.VirtualHost`: a slurmd in a
network + UTS namespace of its own, with its own hostname and IP address, so that what
crosses nodes (srun's I/O, Ray's head address) really goes over a network. slurmctld
listens on this side's veth address, which every node reaches.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from cedana_ray.actors.launcher import free_port
from netns import VirtualHost
from servers import stop_process

DAEMONS = ("munged", "slurmctld", "slurmd")
READY_TIMEOUT_S = 30.0
# A requeued job may start again only once its launch credential expired
# (AuthInfo cred_expire, default 120 s): short here so tests need not wait.
CRED_EXPIRE_S = 5

SLURM_CONF = """\
ClusterName=cedanatest
SlurmctldHost={ctld_host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire={cred_expire}
StateSaveLocation={root}/state
# %n: each node's slurmd has its own
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
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
# pending jobs (a requeued one once its BeginTime passed) are looked at every second, not 60
SchedulerParameters=sched_interval=1
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def missing_binaries() -> list[str]:
    """The daemons and client tools this module needs that are not installed."""
    wanted = [*DAEMONS, "sbatch", "scontrol", "squeue", "scancel"]
    return [b for b in wanted if not shutil.which(b, path=f"{os.environ.get('PATH', '')}:/usr/sbin")]


class SlurmCluster:
    """munged + slurmctld + a slurmd per node (see the module's docstring for the nodes)."""

    def __init__(self, nodes: int = 1, cpus: int = 2, memory_mb: int = 16000) -> None:
        if not 1 <= nodes <= 2:
            # a third node's namespace could reach this machine but not the second's: that
            # needs IP forwarding here, a setting of the whole machine, which we leave alone
            raise ValueError(f"nodes={nodes}: this cluster has 1 or 2 nodes")
        # mkdtemp makes it 0700; munged (user munge) must reach its own dir inside
        self.root = Path(tempfile.mkdtemp(prefix="crslurm-"))
        self.root.chmod(0o755)
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.cpus, self.memory_mb = cpus, memory_mb  # per node
        self.nodes = ["localhost"] if nodes == 1 else [f"crs{i}" for i in range(1, nodes + 1)]
        self.hosts: dict[str, VirtualHost] = {}  # node -> its namespace (all but the first)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def env(self) -> dict[str, str]:
        """What a client (sbatch, scontrol, cedana-ray) needs to reach this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def start(self) -> SlurmCluster:
        try:
            for node in self.nodes[1:]:
                self.hosts[node] = VirtualHost(node).start()
            self._start_munged()
            self._write_conf()
            self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            for node in self.nodes:
                self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)], self.hosts.get(node))
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
                ctld_host=self._ctld_host(),
                node_lines="\n".join(self._node_line(n) for n in self.nodes),
                ctld_port=free_port(),
                slurmd_port=free_port(),
                munge_socket=self.munge_socket,
                cred_expire=CRED_EXPIRE_S,
            )
        )

    @property
    def _gateway(self) -> str:
        """This machine's address on the nodes' network (the first namespace's veth)."""
        return next(iter(self.hosts.values())).gateway

    def _ctld_host(self) -> str:
        # slurmctld accepts the name localhost as its own; (ADDR) is where the nodes reach it
        return f"localhost({self._gateway})" if self.hosts else "localhost"

    def _node_line(self, node: str) -> str:
        line = f"NodeName={node} CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN"
        if self.hosts:
            line += f" NodeAddr={self.hosts[node].address if node in self.hosts else self._gateway}"
        return line

    def _spawn(self, name: str, args: list[str], host: VirtualHost | None = None, **kwargs: object) -> None:
        log = (self.root / f"{name}.out").open("wb")
        env = {**os.environ, **self.env, "PATH": f"{os.environ.get('PATH', '')}:/usr/sbin"}
        self.procs[name] = subprocess.Popen(  # type: ignore[call-overload]
            host.enter(args) if host else args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            **kwargs,
        )

    def _wait_ready(self) -> None:
        def idle() -> bool:
            done = self.run("sinfo", "-h", "-N", "-o", "%T", check=False)
            states = done.stdout.split()
            return done.returncode == 0 and len(states) == len(self.nodes) and set(states) <= {"idle", "mixed"}

        self._wait(idle, "every slurmd to register as idle")

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
        """Cancel the jobs, stop the daemons by PID (slurmds first, munged last), remove the
        namespaces and the temp dir."""
        if any(name.startswith("slurmd") for name in self.procs):
            self.cancel_all()
        for name in reversed(list(self.procs)):  # started munged, slurmctld, slurmds
            stop_process(self.procs.pop(name))
        for host in self.hosts.values():
            host.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.root)
