"""Several hosts on one box: network namespaces on a private LAN, for tests that need real separate machines.

Each host is a network namespace with its own loopback, its own ports and one address on a shared
/24; the test process (the root namespace) has an address there too, so it reaches every host the
way a client on the LAN would. The bridge lives in a namespace of its own, so the root namespace's
firewall (Docker's ``FORWARD`` policy ``DROP`` with ``br_netfilter``, say) never sees the hosts'
traffic to each other.

::

    require()                        # pytest.skip, with the reason, where namespaces cannot be made
    with lan(3) as net:
        proc = net.hosts[0].popen([sys.executable, "-m", "http.server", "80"], log=Path("h1.log"))
        httpx.get(f"http://{net.hosts[0].address}/")

Names carry the test process's pid (hosts ``cx-<pid>-1``..., the bridge's ``cx-<pid>-sw``, the
root namespace's link ``cx<pid>r``), so two runs never collide. Leaving `lan` (normally, on an
exception, on Ctrl-C or SIGTERM) kills every process in the namespaces and deletes them with their
links. A test process killed outright takes the processes it started here with it, and the next run
deletes the namespaces and link it left (those of a pid no longer alive).
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cortex.broker.server import stop_processes

_NAMESPACE = re.compile(r"^cx-(\d+)-\w+$")
_ROOT_LINK = re.compile(r"^cx(\d+)r$")
_made: set[str] = set()
"""Namespaces and root links this process made and has not deleted: never swept as stale."""
IP_TIMEOUT_S = 20.0


class IpFailed(Exception):
    """An ``ip`` command failed: the command and what it printed."""


def _killed_with_test() -> None:
    """preexec_fn: SIGKILL when the test process dies, even by SIGKILL (nothing is left to be graceful for; a worker
    given SIGTERM would drain for 30 s). Tied to the thread that starts the process: start them from the main one."""
    pr_set_pdeathsig = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def ip(*args: str, check: bool = True) -> str:
    """Run ``ip ARGS`` and return its output; raise `IpFailed` (with its stderr) if it fails and `check`."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False)
    if check and done.returncode != 0:
        raise IpFailed(f"ip {' '.join(args)}: {done.stderr.strip() or f'exit status {done.returncode}'}")
    return done.stdout


def unavailable() -> str | None:
    """Why network namespaces cannot be made here (no ``ip``, no privileges, a read-only sysfs...), or None.

    Found by trying what `lan` does, in a throwaway namespace: a veth pair, a bridge, and a command run inside.
    """
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    name = f"cx-{os.getpid()}-probe"
    try:
        ip("netns", "add", name)
        try:
            ip("-n", name, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
            ip("-n", name, "link", "add", "b0", "type", "bridge")
            ip("netns", "exec", name, "ip", "link", "set", "lo", "up")  # exec remounts /sys: fails on a read-only one
        finally:
            ip("netns", "del", name, check=False)
    except (IpFailed, OSError, subprocess.TimeoutExpired) as exc:
        who = "" if os.geteuid() == 0 else f" (running as uid {os.geteuid()}: it needs root or CAP_NET_ADMIN)"
        return f"cannot make network namespaces here{who}: {exc}"
    return None


def require() -> None:
    """Skip the calling test, printing the reason, where namespaces cannot be made."""
    reason = unavailable()
    if reason is not None:
        pytest.skip(reason)


@dataclass
class Host:
    """One namespace on the LAN: its name, its address, and the processes started in it."""

    name: str
    address: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def launcher(self) -> list[str]:
        """The prefix that runs a command here (``ip netns exec`` execs it: the pid stays the command's)."""
        return ["ip", "netns", "exec", self.name]

    def popen(self, args: Sequence[str], *, log: Path, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start `args` here, output to `log`; it is killed if the test process dies, and stopped with the LAN."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [*self.launcher, *args], stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=dict(env) if env is not None else None, preexec_fn=_killed_with_test,
            )  # fmt: skip
        self.procs.append(proc)
        return proc


@dataclass
class Lan:
    """The hosts, and the test process's own address on their network."""

    hosts: list[Host]
    root_address: str
    switch: str
    root_link: str


def free_subnet() -> ipaddress.IPv4Network:
    """A 10.231.K.0/24 no route here covers, starting from the pid so that concurrent runs pick different ones."""
    taken = []
    for route in json.loads(ip("-j", "-4", "route", "show", "table", "all") or "[]"):
        dst = route.get("dst", "default")
        if dst != "default":
            with contextlib.suppress(ValueError):
                taken.append(ipaddress.ip_network(dst, strict=False))
    for step in range(256):
        candidate = ipaddress.IPv4Network(f"10.231.{(os.getpid() + step) % 256}.0/24")
        if not any(candidate.overlaps(net) for net in taken):
            return candidate
    raise IpFailed("no free 10.231.K.0/24 subnet: every one is routed here")


def _pid_alive(pid: int) -> bool:
    return pid != os.getpid() and Path(f"/proc/{pid}").exists()


def _namespaces() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def _delete_namespace(name: str, timeout: float = 10.0) -> list[str]:
    """Kill every process in the namespace, then delete it; what went wrong, if anything."""
    problems = []
    deadline = time.monotonic() + timeout
    while pids := [int(p) for p in ip("netns", "pids", name, check=False).split()]:
        if time.monotonic() > deadline:
            problems.append(f"{name}: processes {pids} would not die")
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    try:
        ip("netns", "del", name)
    except IpFailed as exc:
        problems.append(str(exc))
    _made.discard(name)
    return problems


def _delete_link(name: str) -> list[str]:
    """Delete a root link; one already gone (with its peer's namespace) is fine."""
    _made.discard(name)
    if not ip("-o", "link", "show", "dev", name, check=False):
        return []
    try:
        ip("link", "del", name)
    except IpFailed as exc:
        if ip("-o", "link", "show", "dev", name, check=False):  # not merely gone meanwhile
            return [str(exc)]
    return []


def sweep_stale() -> None:
    """Delete what runs killed outright left: namespaces and root links named after a pid no longer alive."""
    for name in _namespaces():
        found = _NAMESPACE.match(name)
        if found and name not in _made and not _pid_alive(int(found[1])):
            _delete_namespace(name)
    for line in ip("-o", "link", "show").splitlines():
        link = line.split(":")[1].strip().split("@")[0]
        found = _ROOT_LINK.match(link)
        if found and link not in _made and not _pid_alive(int(found[1])):
            _delete_link(link)


def _stop_on_sigterm() -> Callable[[], object]:
    """Turn SIGTERM (a CI job cancelled, ``timeout``) into KeyboardInterrupt, so the LAN is still torn down; return
    what puts the previous handler back."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@contextmanager
def lan(count: int) -> Iterator[Lan]:
    """`count` hosts on a bridge, with addresses .2, .3, ... and the root namespace at .1; all gone afterwards."""
    sweep_stale()
    pid = os.getpid()
    subnet = free_subnet()
    addresses = [str(address) for address in subnet.hosts()]
    made = Lan(
        hosts=[Host(f"cx-{pid}-{i + 1}", addresses[i + 1]) for i in range(count)],
        root_address=addresses[0],
        switch=f"cx-{pid}-sw",
        root_link=f"cx{pid}r",
    )
    restore = _stop_on_sigterm()
    failed = True
    try:
        _build(made, subnet.prefixlen)
        yield made
        failed = False
    finally:
        problems = _tear_down(made)
        restore()
        if problems and not failed:
            raise AssertionError("network namespaces not cleaned up: " + "; ".join(problems))


def _build(net: Lan, prefix: int) -> None:
    sw = net.switch
    for name in (sw, *(host.name for host in net.hosts)):
        _made.add(name)
        ip("netns", "add", name)
    ip("-n", sw, "link", "add", "br0", "type", "bridge")
    ip("-n", sw, "link", "set", "br0", "up")
    for i, host in enumerate(net.hosts):
        port = f"h{i + 1}"
        ip("-n", sw, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host.name)
        ip("-n", sw, "link", "set", port, "master", "br0", "up")
        ip("-n", host.name, "link", "set", "lo", "up")
        ip("-n", host.name, "addr", "add", f"{host.address}/{prefix}", "dev", "eth0")
        ip("-n", host.name, "link", "set", "eth0", "up")
    _made.add(net.root_link)
    ip("link", "add", net.root_link, "type", "veth", "peer", "name", "root", "netns", sw)
    ip("-n", sw, "link", "set", "root", "master", "br0", "up")
    ip("addr", "add", f"{net.root_address}/{prefix}", "dev", net.root_link)
    ip("link", "set", net.root_link, "up")


def _tear_down(net: Lan) -> list[str]:
    """Stop the processes started here (SIGTERM, then SIGKILL), kill any other, delete namespaces and links."""
    problems: list[str] = []
    procs = [proc for host in net.hosts for proc in host.procs]
    try:
        stop_processes(procs, timeout=10)
    except Exception as exc:  # go on deleting: the namespaces matter more
        problems.append(f"stopping processes: {exc!r}")
    present = set(_namespaces())
    for name in (*(host.name for host in net.hosts), net.switch):
        if name in present:
            problems += _delete_namespace(name)
        _made.discard(name)
    problems += _delete_link(net.root_link)  # usually gone already, with its peer in the switch namespace
    return problems
