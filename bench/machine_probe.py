"""What this machine gives any service made of several processes: the yardstick for the broker hop.

Prints one JSON object. The broker hop (`bench.overhead`) crosses processes at
least six times (client, gateway, nats-server, worker and back) and runs Python
code that was idle since the stream's last token. Both cost what the machine
makes them cost, whatever Cortex does, so `bench.overhead` measures them in the
same run, on its own nats-server, with the hop's own pacing:

- ``broker_rtt_ms_p50_back_to_back``: a core NATS request and its reply between
  two nats-py clients (uvloop), each asked as soon as the last was answered.
- ``broker_rtt_ms_p50_paced_16``: the same from 16 loops that each wait one
  answer's time (`bench.overhead.ANSWER_S`) between requests, as the hop's 16
  streams do: the processes go idle between messages.
- ``jetstream_ack_ms_p50_paced_16``: a JetStream publish until its
  acknowledgement, paced the same way (every request takes one).
- ``cold_code_slowdown``: how much slower a request's parsing (the gateway's
  own OpenAI chat parser on the hop's request body) runs 20 ms after the process
  last ran, against the same call in a hot loop. On a virtual machine whose idle
  cores halt, or whose caches other tenants share, it is far above 1.

    python -m bench.machine_probe
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
from nats.aio.msg import Msg
from nats.js.api import StorageType, StreamConfig

from bench.common import install_uvloop, p50

ECHO_SUBJECT = "bench.probe.echo"
PROBE_STREAM = "BENCH_PROBE"
STREAMS = 16
PER_STREAM = 12
BACK_TO_BACK = 300
IDLE_S = 0.02
"""The idle time before a cold call: about a quarter of one hop stream's answer time."""


async def _paced(pace: float, call: Callable[[], Awaitable[None]]) -> list[float]:
    """`STREAMS` loops, starts spread over `pace`, each timing `call` then waiting `pace`, `PER_STREAM` times."""

    async def loop(index: int) -> list[float]:
        await asyncio.sleep(pace * index / STREAMS)
        out = []
        for _ in range(PER_STREAM):
            start = time.perf_counter()
            await call()
            out.append(time.perf_counter() - start)
            await asyncio.sleep(pace)
        return out

    results = await asyncio.gather(*(loop(i) for i in range(STREAMS)))
    return [t for r in results for t in r]


async def broker_figures(url: str, pace: float) -> dict[str, float]:
    asker, answerer = await nats.connect(url), await nats.connect(url)
    try:

        async def echo(msg: Msg) -> None:
            await answerer.publish(msg.reply, msg.data)

        await answerer.subscribe(ECHO_SUBJECT, cb=echo)
        await answerer.flush()

        async def ask() -> None:
            await asker.request(ECHO_SUBJECT, b"x", timeout=5)

        for _ in range(50):  # warm-up
            await ask()
        back_to_back = []
        for _ in range(BACK_TO_BACK):
            start = time.perf_counter()
            await ask()
            back_to_back.append(time.perf_counter() - start)
        paced = await _paced(pace, ask)
        js = asker.jetstream()
        await js.add_stream(StreamConfig(name=PROBE_STREAM, subjects=[f"{PROBE_STREAM.lower()}.>"],
                                         storage=StorageType.FILE))  # fmt: skip
        try:

            async def store() -> None:
                await js.publish(f"{PROBE_STREAM.lower()}.x", b"x" * 256)

            acked = await _paced(pace, store)
        finally:
            await js.delete_stream(PROBE_STREAM)
    finally:
        await asker.close()
        await answerer.close()
    return {
        "broker_rtt_ms_p50_back_to_back": round(p50(back_to_back) * 1000, 3),
        "broker_rtt_ms_p50_paced_16": round(p50(paced) * 1000, 3),
        "jetstream_ack_ms_p50_paced_16": round(p50(acked) * 1000, 3),
    }


def cold_code_slowdown(samples: int = 100) -> float:
    """p50 of one parse 20 ms after this process last ran, over its p50 in a hot loop."""
    from cortex.gateway.openai_chat import OpenAIChat

    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8,
                       "stream": True}).encode()  # fmt: skip
    dialect = OpenAIChat()
    for _ in range(1000):
        dialect.parse(body)
    hot, cold = [], []
    for _ in range(samples):
        start = time.perf_counter()
        dialect.parse(body)
        hot.append(time.perf_counter() - start)
    for _ in range(samples):
        time.sleep(IDLE_S)
        start = time.perf_counter()
        dialect.parse(body)
        cold.append(time.perf_counter() - start)
    return round(p50(cold) / p50(hot), 1)


def measure(url: str, pace: float) -> dict[str, float]:
    """Every figure above, against the nats-server at `url`; `pace`: seconds each paced loop waits."""
    figures = asyncio.run(broker_figures(url, pace))
    return {**figures, "cold_code_slowdown": cold_code_slowdown()}


def main() -> None:
    from bench.overhead import ANSWER_S
    from cortex.broker.server import EmbeddedNats

    install_uvloop()
    tmp = tempfile.TemporaryDirectory(prefix="cortex-bench-")
    with tmp, EmbeddedNats(store_dir=Path(tmp.name), port=0) as server:
        print(json.dumps(measure(server.url, ANSWER_S)))


if __name__ == "__main__":
    main()
