"""The embedded one-machine stack behind ``cortexctl up``: nats-server, a gateway, a worker.

Every child is stopped on Ctrl-C or SIGTERM (and, on Linux, dies with this
process even if it is killed outright), so nothing is left behind.

``cortexctl up --secure`` locks the broker down (`cortex.broker.lockdown`):
nats-server runs ``deploy/nats-secure.conf`` with the users' credentials made
once in ``<data dir>/secure``, this process provisions as the admin, and the
worker and the gateway connect each as its own user.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from cortex.broker import lockdown
from cortex.broker.access import CREDS_ENV, TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV, Access
from cortex.broker.server import EmbeddedNats, own_group_dying_with_parent, stop_processes


@dataclass
class StackConfig:
    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 31313
    metrics_port: int = 31314
    nats_port: int = 4222
    model: str = "smollm2-135m-instruct"
    models_file: Path | None = None
    device: str | None = None
    gpu: str = "0"
    slots: int = 8
    ready_timeout: float = 600.0
    secure: bool = False
    """Lock the broker down: a user each for the gateway, the worker and cortexctl (`secure_dir`)."""
    log_format: str | None = None
    """The children's ``--log-format`` (None: theirs, from the environment or cortex.toml)."""

    @property
    def secure_dir(self) -> Path:
        """Where ``--secure`` keeps the users' credentials and the server's configuration."""
        return self.data_dir / "secure"


@dataclass
class Stack:
    config: StackConfig
    nats: EmbeddedNats | None = None
    admin: Access | None = None
    """cortexctl's own user on a locked-down broker (``--secure``); None: anonymous."""
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def base_url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}/v1"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config.host}:{self.config.metrics_port}/metrics"

    def start(self) -> None:
        cfg = self.config
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self.nats = EmbeddedNats(
            store_dir=cfg.data_dir / "jetstream",
            port=cfg.nats_port,
            host="127.0.0.1",
            config=lockdown.server_config(cfg.secure_dir) if cfg.secure else None,
            log_file=cfg.data_dir / "nats.log",
        )
        self.nats.start()
        if cfg.secure:
            self.admin = Access.from_file(lockdown.credentials_file(cfg.secure_dir, "admin"))
            asyncio.run(lockdown.provision_broker(self.nats.url, self.admin))
        worker = [sys.executable, "-m", "cortex.worker", "--nats", self.nats.url, "--model", cfg.model,
                  "--gpu", str(cfg.gpu), "--slots", str(cfg.slots), *self._creds("worker"),
                  *self._log_format()]  # fmt: skip
        if cfg.models_file:
            worker += ["--models", str(cfg.models_file)]
        if cfg.device:
            worker += ["--device", cfg.device]
        gateway = [sys.executable, "-m", "cortex.gateway", "--nats", self.nats.url, "--host", cfg.host,
                   "--port", str(cfg.port), "--metrics-port", str(cfg.metrics_port), *self._log_format(),
                   *self._creds("gateway")]  # fmt: skip
        self._spawn("worker", worker)
        self._spawn("gateway", gateway)

    def _log_format(self) -> list[str]:
        return ["--log-format", self.config.log_format] if self.config.log_format else []

    def _creds(self, user: str) -> list[str]:
        return (
            ["--nats-creds", str(lockdown.credentials_file(self.config.secure_dir, user))] if self.config.secure else []
        )

    def _spawn(self, name: str, argv: list[str]) -> None:
        # The children talk to this stack's broker alone, as the options say: not as whatever user or TLS
        # files the shell's environment names for another broker.
        env = {k: v for k, v in os.environ.items() if k not in (CREDS_ENV, TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV)}
        self.children[name] = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, env=env, preexec_fn=own_group_dying_with_parent
        )

    def wait_ready(self) -> None:
        """Block until the gateway lists the model as ready; raise if a child dies first."""
        deadline = time.monotonic() + self.config.ready_timeout
        while time.monotonic() < deadline and not self._stop.is_set():
            self.check_children()
            if self.config.model in self._ready_models():
                return
            self._stop.wait(0.5)
        if not self._stop.is_set():
            raise RuntimeError(f"{self.config.model} was not ready within {self.config.ready_timeout:.0f}s")

    def _ready_models(self) -> set[str]:
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as resp:
                data = json.load(resp)["data"]
        except (OSError, urllib.error.URLError, ValueError, KeyError):
            return set()
        ready = set()
        for model in data:
            if model.get("ready"):
                ready.add(model["id"])
                ready.update(model.get("aliases", []))
        return ready

    def check_children(self) -> None:
        for name, proc in self.children.items():
            if proc.poll() is not None:
                raise RuntimeError(f"the {name} exited with code {proc.returncode}")

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def wait(self) -> None:
        while not self._stop.is_set():
            self.check_children()
            self._stop.wait(0.5)

    def stop(self, timeout: float = 20.0) -> None:
        """Front to back: the gateway (no new requests), the worker (it finishes or hands back what runs,
        which needs the broker), then nats-server."""
        for name in ("gateway", "worker"):
            if name in self.children:
                stop_processes([self.children[name]], timeout)
        if self.nats is not None:
            self.nats.stop()


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "cortex"
