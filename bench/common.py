"""Helpers shared by the benchmarks: percentiles, the default model, machine facts, a synthetic stack."""

from __future__ import annotations

import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain how a refrigerator works.",
    "What are the three primary colours?",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
    "Tell me a joke about computers.",
    "Summarise the plot of Hamlet.",
    "How do airplanes stay in the air?",
    "List five animals that live in the desert.",
    "What is the capital of Australia and why?",
    "Describe a sunset in two sentences.",
    "How do I make a cup of tea?",
    "What does a compiler do?",
    "Name three famous painters.",
    "Why do cats purr?",
    "Explain photosynthesis simply.",
]


def prompts(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" (variant {i})") for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine(device: str) -> dict[str, object]:
    import torch  # here, not at the top: the hop benchmarks need no torch and should not pay for importing it

    return {
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
        "python": platform.python_version(),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit (children inherit it); the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def ready(base: str, models: set[str]) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/models", timeout=2) as resp:
            data = json.load(resp)["data"]
    except OSError:
        return False
    return models <= {m["id"] for m in data if m.get("ready")}


@dataclass(frozen=True)
class SyntheticWorker:
    """A worker process serving `model` with the synthetic engine: one token every `interval` seconds."""

    model: str
    interval: float
    slots: int = 256
    worker_id: str = ""
    """Its name in the fleet (default: the model's); workers of one model need their own."""
    steps: bool = False
    """Tokens in steps, as a batching engine emits them (`cortex.worker.synthetic`), not each stream on its own."""


@dataclass
class SyntheticStack:
    """nats-server, one gateway and synthetic workers on 127.0.0.1, each its own process; `stop` ends them all."""

    tmp: Path
    workers: list[SyntheticWorker]
    base: str = ""
    gateway: subprocess.Popen[bytes] | None = None
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _nats: object | None = None

    def start(self, timeout: float = 120.0) -> SyntheticStack:
        from cortex.broker.server import EmbeddedNats
        from cortex.worker.synthetic import STEPS_ENV

        nats = EmbeddedNats(store_dir=self.tmp / "nats", port=0, log_file=self.tmp / "nats.log")
        nats.start()
        self._nats = nats
        catalogue = self.tmp / "models.toml"
        models = sorted({w.model for w in self.workers})
        catalogue.write_text("".join(f'[[models]]\nid = "{model}"\npath = "-"\n\n' for model in models))
        py = sys.executable
        for w in self.workers:
            self._procs.append(subprocess.Popen([
                py, "-m", "cortex.worker", "--nats", nats.url, "--models", str(catalogue), "--slots", str(w.slots),
                "--log-level", "WARNING", "--model", w.model, "--synthetic-engine", str(w.interval),
                "--worker-id", w.worker_id or w.model,
            ], env={**os.environ, STEPS_ENV: "1" if w.steps else "0"}))  # fmt: skip
        port = free_port()
        self.gateway = subprocess.Popen([py, "-m", "cortex.gateway", "--nats", nats.url, "--port", str(port),
                                         "--metrics-port", "-1", "--log-level", "WARNING"])  # fmt: skip
        self._procs.append(self.gateway)
        self.base = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + timeout
        while not ready(self.base, {w.model for w in self.workers}):
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("synthetic stack did not come up")
            time.sleep(0.2)
        return self

    def pids(self) -> dict[str, int]:
        """Each process by role: ``gateway``, ``nats``, ``worker:<model>``."""
        from cortex.broker.server import EmbeddedNats

        assert self.gateway is not None and isinstance(self._nats, EmbeddedNats) and self._nats.pid is not None
        named = zip(self.workers, self._procs, strict=False)  # the gateway comes last
        workers = {f"worker:{w.worker_id or w.model}": proc.pid for w, proc in named}
        return {"gateway": self.gateway.pid, "nats": self._nats.pid, **workers}

    @property
    def nats_url(self) -> str:
        from cortex.broker.server import EmbeddedNats

        assert isinstance(self._nats, EmbeddedNats)
        return self._nats.url

    @property
    def port(self) -> int:
        return int(self.base.rsplit(":", 1)[1].split("/", 1)[0])

    def stop(self) -> None:
        from cortex.broker.server import EmbeddedNats, stop_processes

        stop_processes(self._procs, 20)
        if isinstance(self._nats, EmbeddedNats):
            self._nats.stop()


def install_uvloop() -> None:
    """Run the benchmark's event loops on uvloop where it is installed."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
