"""Three hosts: a 3-node JetStream cluster, two workers and a gateway, each on a host of its own.

The hosts are network namespaces on one bridge (`tests/netns.py`), each with its own address and
ports; nothing talks over 127.0.0.1. Host 1 and host 2 run a nats-server node and a worker with the
tiny model, host 3 a node and the gateway; every process is given the three nodes' URLs. The test
process, a client on the same LAN, calls the gateway with the official SDKs; then host 1, made the
leader of the request stream, its consumer and every bucket, loses its node and its worker
(SIGKILL) at once, and the calls go on: host 2's worker answers through the two nodes left, once
JetStream has elected new leaders.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anthropic
import nats
import nats.errors
import nats.js.errors
import openai
import pytest
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from cortex.broker.server import ClusterNode, EmbeddedNats, stop_processes
from cortex.protocol import names
from tests import netns
from tests.conftest import STARTUP_TIMEOUT_S, child_env, get_json, wait_for
from tests.test_broker_faults import BUCKETS, ModelWatch, cluster_formed

MODEL = "tiny-hosts"
NATS_PORT, ROUTE_PORT, HTTP_PORT, METRICS_PORT = 4222, 6222, 8080, 9090
"""The same on every host: each namespace has ports of its own."""
LENGTH = 16
STEP_S = 0.05
"""Each decoding step's delay: an answer holds its worker's only slot for about a second, so a few asked at once
reach both workers."""
SDK_RETRIES = 20
"""Enough for 503s over some 20 s (a JetStream election after a SIGKILL takes 5 to 7 s, then 2 s settling)."""
ANSWER_TIMEOUT_S = 60.0
WORKERS = ("host1-w", "host2-w")


@pytest.fixture
def lan() -> Iterator[netns.Lan]:
    netns.require()
    with netns.lan(3) as made:
        yield made


def replicas(urls: str) -> dict[str, int]:
    """Copies of the request stream, of each bucket's stream, and of the model's consumer (leader + followers)."""

    async def read() -> dict[str, int]:
        nc = await nats.connect(urls.split(","))
        try:
            js = nc.jetstream()
            counts = {}
            for stream in streams():
                counts[stream] = (await js.stream_info(stream)).config.num_replicas or 0
            consumer = await js.consumer_info(names.REQUEST_STREAM, names.consumer_name(MODEL))
            counts["consumer"] = 1 + len(consumer.cluster.replicas or []) if consumer.cluster else 1
            return counts
        finally:
            await nc.close()

    return asyncio.run(read())


def places_three_copies(urls: str) -> bool:
    """Whether JetStream can place a stream on all three nodes yet (a throwaway one, deleted at once).

    Knowing its peers (`cluster_formed`) comes a moment before the meta leader may place on them; a gateway or worker
    started in between fails to make its stream ("no suitable peers for placement") and exits.
    """

    async def probe() -> bool:
        nc = await nats.connect(urls.split(","))
        try:
            js = nc.jetstream()
            name = f"PROBE_{uuid.uuid4().hex}"
            try:
                await js.add_stream(StreamConfig(name=name, subjects=[f"probe.{name}"], num_replicas=3,
                                                 storage=StorageType.MEMORY))  # fmt: skip
            except nats.js.errors.APIError:
                return False
            await js.delete_stream(name)
            return True
        finally:
            await nc.close()

    return asyncio.run(probe())


def streams() -> list[str]:
    """The request stream and each bucket's stream."""
    return [names.REQUEST_STREAM, *(f"KV_{bucket}" for bucket in BUCKETS)]


async def _leaders(js: JetStreamContext) -> dict[str, str]:
    found = {stream: (await js.stream_info(stream)).cluster for stream in streams()}
    found["consumer"] = (await js.consumer_info(names.REQUEST_STREAM, names.consumer_name(MODEL))).cluster
    return {what: (cluster.leader or "") if cluster else "" for what, cluster in found.items()}


def leaders(urls: str) -> dict[str, str]:
    """The server leading each stream, and the model's consumer; none while one is being elected."""

    async def read() -> dict[str, str]:
        nc = await nats.connect(urls.split(","))
        try:
            return await _leaders(nc.jetstream())
        except nats.errors.Error:  # no leader to answer for a moment
            return {}
        finally:
            await nc.close()

    return asyncio.run(read())


def lead_from(urls: str, server: str) -> None:
    """Ask JetStream to hand `server` the lead of every stream and of the model's consumer (a step-down naming it as
    the successor), so that killing it is the worst case: each of them needs an election."""

    async def step_down() -> None:
        nc = await nats.connect(urls.split(","))
        try:
            body = json.dumps({"placement": {"preferred": server}}).encode()
            for what, leader in (await _leaders(nc.jetstream())).items():
                if leader != server:
                    subject = (f"$JS.API.CONSUMER.LEADER.STEPDOWN.{names.REQUEST_STREAM}.{names.consumer_name(MODEL)}"
                               if what == "consumer" else f"$JS.API.STREAM.LEADER.STEPDOWN.{what}")  # fmt: skip
                    reply = json.loads((await nc.request(subject, body, timeout=5)).data)
                    assert "error" not in reply, f"{what}: {reply['error']}"
        finally:
            await nc.close()

    asyncio.run(step_down())


def status(urls: str) -> dict[str, Any]:
    """``cortexctl status --json`` run here, a client on the LAN."""
    done = subprocess.run([sys.executable, "-m", "cortex.broker", "status", "--json", "--nats", urls],
                          capture_output=True, text=True, timeout=30, env=child_env(), check=True)  # fmt: skip
    data = json.loads(done.stdout)
    assert isinstance(data, dict)
    return data


def answered_since(urls: str, since: float) -> set[str]:
    """The live workers that finished a request for the model after `since` (Unix time: its advert's `last_used`)."""
    return {
        advert["worker_id"]
        for advert in status(urls)["workers"]
        for state in advert.get("models", [])
        if state["id"] == MODEL and state.get("last_used", 0.0) > since
    }


def loaded_on(base_url: str) -> list[str]:
    try:
        entry = get_json(f"{base_url}/models/{MODEL}")
    except OSError:
        return []
    assert isinstance(entry, dict)
    return sorted(entry.get("loaded_on", [])) if entry.get("ready") else []


def chat(base_url: str) -> str:
    with openai.OpenAI(base_url=base_url, api_key="x", max_retries=SDK_RETRIES, timeout=ANSWER_TIMEOUT_S) as client:
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello"}], temperature=0, max_tokens=LENGTH
        )
    assert reply.usage is not None and reply.usage.completion_tokens == LENGTH
    return reply.choices[0].message.content or ""


def chat_stream(base_url: str) -> str:
    text = ""
    with openai.OpenAI(base_url=base_url, api_key="x", max_retries=SDK_RETRIES, timeout=ANSWER_TIMEOUT_S) as client:
        for chunk in client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello"}], temperature=0, max_tokens=LENGTH, stream=True
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
    return text


def claude(root_url: str) -> str:
    with anthropic.Anthropic(base_url=root_url, api_key="x", max_retries=SDK_RETRIES,
                             timeout=ANSWER_TIMEOUT_S) as client:  # fmt: skip
        reply = client.messages.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                       max_tokens=LENGTH, extra_body={"temperature": 0})  # fmt: skip
    assert reply.usage.output_tokens == LENGTH
    return "".join(block.text for block in reply.content if block.type == "text")


def never_gone(watch: ModelWatch, since: float) -> tuple[float, float] | None:
    """Assert the model was never said to be gone (a 503 while the broker elects is fine: the SDKs retry it);
    the first and last 503 after `since` (monotonic), in seconds from it, if any."""
    since -= watch.t0
    wrong = [(round(t - since, 2), status) for t, status in watch.seen if status not in (200, 503)]
    assert not wrong, f"the gateway said the model is gone (seconds from the kills, status): {wrong}"
    unavailable = [t - since for t, status in watch.seen if status == 503 and t >= since]
    return (unavailable[0], unavailable[-1]) if unavailable else None


def at_once(count: int, ask: Callable[[str], str], url: str) -> list[str]:
    """`count` calls of `ask(url)` at the same time, on threads; their answers (the first error is raised)."""
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: ask(url), range(count), timeout=ANSWER_TIMEOUT_S))


def test_three_hosts_serve_and_survive_losing_one(
    lan: netns.Lan, tiny_model_dir: Path, logs_dir: Path, tmp_path: Path
) -> None:
    catalogue = tmp_path / "models.toml"
    catalogue.write_text(f'[[models]]\nid = "{MODEL}"\npath = "{tiny_model_dir}"\ndtype = "float32"\nkeep_alive = -1\n')
    hosts = lan.hosts
    nodes = [
        EmbeddedNats(
            store_dir=tmp_path / f"nats-{i + 1}", host=host.address, port=NATS_PORT, launcher=host.launcher,
            log_file=logs_dir / f"multihost-nats-{i + 1}.log",
            cluster=ClusterNode(name=f"host{i + 1}", cluster_port=ROUTE_PORT, host=host.address,
                                routes=[f"nats://{o.address}:{ROUTE_PORT}" for o in hosts if o is not host]),
        )
        for i, host in enumerate(hosts)
    ]  # fmt: skip
    urls = ",".join(node.url for node in nodes)
    base_url, root_url = f"http://{hosts[2].address}:{HTTP_PORT}/v1", f"http://{hosts[2].address}:{HTTP_PORT}"
    procs: list[subprocess.Popen[bytes]] = []
    t0 = time.monotonic()
    try:
        for node in nodes:
            node.start()
        wait_for(lambda: cluster_formed(nodes) and places_three_copies(urls), timeout=30,
                 what="the cluster formed across the three hosts")  # fmt: skip
        formed_s = time.monotonic() - t0
        workers = [
            host.popen([sys.executable, "-m", "cortex.worker", "--nats", urls, "--models", str(catalogue),
                        "--model", MODEL, "--device", "cpu", "--slots", "1", "--worker-id", worker_id,
                        "--step-delay", str(STEP_S)],
                       log=logs_dir / f"multihost-{worker_id}.log", env=child_env())
            for host, worker_id in zip(hosts[:2], WORKERS, strict=True)
        ]  # fmt: skip
        gateway = hosts[2].popen(
            [sys.executable, "-m", "cortex.gateway", "--nats", urls, "--host", hosts[2].address,
             "--port", str(HTTP_PORT), "--metrics-port", str(METRICS_PORT)],
            log=logs_dir / "multihost-gateway.log", env=child_env(),
        )  # fmt: skip
        procs = [gateway, *workers]
        wait_for(lambda: loaded_on(base_url) == list(WORKERS), timeout=STARTUP_TIMEOUT_S,
                 what="both workers ready, seen from the gateway on host 3", proc=gateway)  # fmt: skip
        started_s = time.monotonic() - t0
        copies = replicas(urls)
        assert set(copies) == {*streams(), "consumer"}
        assert copies == dict.fromkeys(copies, 3), copies

        with ModelWatch(base_url, MODEL) as watch:
            # The worst case for what follows: host 1 leads everything JetStream must elect again.
            lead_from(urls, "host1")
            wait_for(lambda: set(leaders(urls).values()) == {"host1"}, timeout=20, what="host 1 leading everything")
            wait_for(lambda: loaded_on(base_url) == list(WORKERS), timeout=20, what="both workers listed again")

            # Across hosts: client -> gateway (host 3) -> a node -> a worker (host 1 or 2) -> back.
            before = time.time()
            reference = chat(base_url)
            assert at_once(4, chat, base_url) == [reference] * 4  # one slot each: both workers must take some
            assert claude(root_url) == reference
            wait_for(lambda: answered_since(urls, before) == set(WORKERS), timeout=20,
                     what="both workers to have answered")  # fmt: skip

            # Host 1 loses its nats-server and its worker at once, as when the machine dies.
            killed_at, killed_wall = time.monotonic(), time.time()
            nodes[0].kill()
            workers[0].kill()
            workers[0].wait()
            assert chat_stream(base_url) == reference
            next_answer_s = time.monotonic() - killed_at
            assert at_once(2, chat, base_url) == [reference] * 2
            assert claude(root_url) == reference
            wait_for(lambda: loaded_on(base_url) == [WORKERS[1]], timeout=20, what="host 1's worker gone")
            assert answered_since(",".join(node.url for node in nodes[1:]), killed_wall) == {WORKERS[1]}
        unavailable = never_gone(watch, killed_at)
        total_s = time.monotonic() - t0
    finally:
        stop_processes(procs, timeout=15)  # before the nodes: a worker drains through the broker
        for node in nodes:
            node.stop()
    window = f"{unavailable[0]:.1f}-{unavailable[1]:.1f} s" if unavailable else "none"
    print(f"\nthree hosts: cluster formed {formed_s:.1f} s, both workers serving {started_s:.1f} s after the start; "
          f"host 1 (leading the stream, the consumer and every bucket) lost its node and worker: 503s {window} "
          f"after the kills, next answer {next_answer_s:.1f} s after them; {total_s:.1f} s in all")  # fmt: skip
