"""Another host on this machine: network, UTS and mount namespaces, joined to ours by a veth pair.

Its processes share our file systems and PIDs (so a "shared file system" is simply the
same one) but have their own hostname, IP address and ports, as a second machine on the
same network would: servers there are reached at its address, and it reaches this
machine's addresses through the veth. It has no default route, as compute nodes often
have none: what picks an address by the route to the internet finds none there. Used to
run a second slurmd for multi-node allocations.

The mount namespace only gives it its own ``/etc/hosts`` (its name and ours) and
``/etc/resolv.conf``: our DNS server is not reachable from there, and every lookup of a
name (Ray looks up the hostname) would otherwise wait 10-20 s for it to time out.

A holder process (``unshare ... sleep``) keeps the namespaces; programs are started in
them with ``nsenter``. Removing the host end of the veth removes both ends, and the
namespaces go when their last process does: :meth:`VirtualHost.stop` does both.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

READY_TIMEOUT_S = 10.0


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {done.stderr.strip()}")


def _netns(pid: int | str) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def _local_addresses() -> list[str]:
    """This machine's IPv4 addresses but loopback's."""
    found = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    return [f.split()[3].split("/")[0] for f in found.splitlines() if f.split()[1] != "lo"]


def free_subnet() -> ipaddress.IPv4Network:
    """A /24 under 10.251.0.0/16 that no interface of this machine is on."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    free = [n for n in range(256) if f" 10.251.{n}." not in used]
    return ipaddress.IPv4Network(f"10.251.{random.choice(free)}.0/24")


class VirtualHost:
    """A namespace named ``hostname`` on a /24 of its own: ``gateway`` (.1) is this side of
    the veth pair, an address of this machine; ``address`` (.2) is the namespace's."""

    def __init__(self, hostname: str, subnet: ipaddress.IPv4Network | None = None) -> None:
        subnet = subnet or free_subnet()
        self.hostname, self.gateway, self.address = hostname, str(subnet[1]), str(subnet[2])
        self.veth = f"crsv{os.getpid() % 100000}{hostname[-2:]}"[:15]  # interface names: 15 chars at most
        self.holder: subprocess.Popen[bytes] | None = None
        self.etc = Path(tempfile.mkdtemp(prefix="crsvh-"))  # its /etc/hosts and /etc/resolv.conf

    def start(self) -> VirtualHost:
        try:
            self._hold()
            self._link()
        except BaseException:
            self.stop()
            raise
        return self

    def _hold(self) -> None:
        hosts = f"127.0.0.1 localhost\n{self.address} {self.hostname}\n{self.gateway} {socket.gethostname()}\n"
        (self.etc / "hosts").write_text(hosts)
        (self.etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")  # refused at once: no wait
        mounts = " && ".join(f"mount --bind {self.etc / name} /etc/{name}" for name in ("hosts", "resolv.conf"))
        # --mount makes mounts private to the namespace: ours never see these
        self.holder = subprocess.Popen(
            ["unshare", "--net", "--uts", "--mount", "sh", "-c", f"{mounts} && exec sleep infinity"],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while Path(f"/proc/{self.holder.pid}/comm").read_text().strip() != "sleep":  # set up
            if self.holder.poll() is not None:
                err = self.holder.stderr.read().decode().strip() if self.holder.stderr else ""
                raise RuntimeError(f"unshare --net --uts --mount failed: {err or self.holder.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("unshare --net --uts --mount did not start")
            time.sleep(0.05)

    def _link(self) -> None:
        assert self.holder is not None
        _ip("link", "add", self.veth, "type", "veth", "peer", "name", "eth0", "netns", str(self.holder.pid))
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.veth)
        _ip("link", "set", self.veth, "up")
        inside = ["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{self.address}/24", "dev", "eth0"]
        inside += (["ip", "link", "set", "eth0", "up"],)
        routes = [ip for ip in _local_addresses() if ip != self.gateway]
        inside += tuple(["ip", "route", "add", ip, "via", self.gateway] for ip in routes)
        for args in (*inside, ["hostname", self.hostname]):
            subprocess.run(self.enter(args), capture_output=True, check=True)

    def enter(self, args: list[str]) -> list[str]:
        """``args`` as a command line that runs in this host's namespaces."""
        assert self.holder is not None
        return ["nsenter", f"--target={self.holder.pid}", "--net", "--uts", "--mount", "--", *args]

    def spawn(self, args: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``args`` here; nsenter execs it, so the process is the one to stop by PID."""
        return subprocess.Popen(self.enter(args), **kwargs)

    def processes(self) -> list[psutil.Process]:
        """Every process in this namespace but the holder."""
        if self.holder is None or self.holder.poll() is not None:
            return []
        ns = _netns(self.holder.pid)
        found = []
        for p in psutil.process_iter():
            with contextlib.suppress(OSError, psutil.Error):
                if p.pid != self.holder.pid and _netns(p.pid) == ns:
                    found.append(p)
        return found

    def stop(self) -> None:
        """Kill what is left in the namespace, remove the veth pair, let the namespace go."""
        left = self.processes()
        for p in left:
            with contextlib.suppress(psutil.Error):
                p.kill()
        psutil.wait_procs(left, timeout=5)
        if self.holder is not None and self.holder.poll() is None:
            self.holder.kill()
            self.holder.wait()
        # gone already if the namespace went with its last process; if not, this removes it
        subprocess.run(["ip", "link", "del", self.veth], capture_output=True)
        shutil.rmtree(self.etc, ignore_errors=True)


def why_not() -> str | None:
    """Why no virtual host can be made here (the exact failure), or None."""
    try:
        VirtualHost("crsprobe").start().stop()
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        return f"no network namespace with a veth pair here: {exc}"
    return None
