"""What the broker hop costs: gateway + NATS + worker against the engine called in-process.

Prints one JSON object. A synthetic engine (no model) emits one token every
`--interval` seconds so only the hop is measured: HTTP in, msgspec, JetStream
publish, the worker's pull, chunks back over core NATS, SSE out. All processes
run on this machine on 127.0.0.1 (nats-server, one gateway, two synthetic
workers, the client), so they share its cores. In the same run, on the same
nats-server, `bench.machine_probe` measures the broker's own round trip with
the hop's pacing: ``hop_vs_broker_rtt_paced_at_16`` is the hop in those units.

    python -m bench.overhead
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench import machine_probe
from bench.common import SyntheticStack, SyntheticWorker, install_uvloop, machine, p50, percentile
from cortex.protocol import GenerateRequest, Message, Sampling
from cortex.worker.synthetic import SyntheticEngine

PACED, FAST = "synthetic-paced", "synthetic-fast"
INTERVAL_S = 0.01
ANSWER_TOKENS = 8
ANSWER_S = INTERVAL_S * ANSWER_TOKENS
TOKEN_TEXT = b'"content":"tok'


def in_process_ttft(interval: float, samples: int) -> list[float]:
    engine = SyntheticEngine(worker_id="inproc", interval=interval)
    engine.start()
    out = []
    try:
        for i in range(samples):
            got = threading.Event()
            start = time.perf_counter()
            stamp: list[float] = []

            def emit(chunk: object, s: list[float] = stamp, e: threading.Event = got) -> None:
                if not s:
                    s.append(time.perf_counter())
                    e.set()

            req = GenerateRequest(request_id=f"i{i}", model=PACED, messages=[Message(role="user", content="hi")],
                                  sampling=Sampling(max_tokens=1))  # fmt: skip
            engine.submit(req, emit)
            got.wait(5)
            out.append(stamp[0] - start)
    finally:
        engine.stop()
    return out


async def stream_ttft(client: httpx.AsyncClient, base: str, model: str, content: str, tokens: int) -> float:
    """Time to the first token event, with a minimal HTTP/1.1 client so client overhead stays out of the figure."""
    del client  # httpx costs ~1 ms of CPU per request here: too much for what is measured
    url = httpx.URL(base)
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": tokens, "stream": True}
    ).encode()
    head = (
        f"POST {url.path}/chat/completions HTTP/1.1\r\nHost: {url.host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection(url.host, url.port)
    start = time.perf_counter()
    writer.write(head + body)
    first = 0.0
    seen = b""
    while True:
        data = await reader.read(65536)
        if not data:
            break
        if not first:
            seen += data
            if b'"content":"tok' in seen:
                first = time.perf_counter()
    writer.close()
    if not first:
        raise RuntimeError(f"no token in the answer: {seen[:300]!r}")
    return first - start


async def ttft_at(client: httpx.AsyncClient, base: str, concurrency: int, per_stream: int) -> list[float]:
    """`concurrency` streams in flight at once, each a client asking again as soon as its answer ends.

    Starts are spread over one answer's duration, as they are with independent clients.
    """

    async def one_client(index: int) -> list[float]:
        await asyncio.sleep(ANSWER_S * index / concurrency)
        return [await stream_ttft(client, base, PACED, "hello", ANSWER_TOKENS) for _ in range(per_stream)]

    results = await asyncio.gather(*(one_client(i) for i in range(concurrency)))
    return [t for r in results for t in r]


async def relay_rate(client: httpx.AsyncClient, base: str, streams: int, tokens: int) -> float:
    async def one() -> int:
        body = {"model": FAST, "messages": [{"role": "user", "content": "go"}], "max_tokens": tokens, "stream": True}
        count, tail = 0, b""
        async with client.stream("POST", f"{base}/chat/completions", json=body) as response:
            async for data in response.aiter_bytes():
                seen = tail + data  # a token's text may be split between two reads
                count += seen.count(TOKEN_TEXT)
                tail = seen[-(len(TOKEN_TEXT) - 1) :]
        return count

    start = time.perf_counter()
    counts = await asyncio.gather(*(one() for _ in range(streams)))
    elapsed = time.perf_counter() - start
    assert sum(counts) == streams * tokens, f"lost chunks: {sum(counts)} of {streams * tokens}"
    return sum(counts) / elapsed


async def measure_http(base: str) -> dict[str, object]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await ttft_at(client, base, 4, 2)  # warm-up
        ttfts = {c: await ttft_at(client, base, c, n) for c, n in ((1, 60), (16, 8), (64, 4))}
        small, large = "x" * 1024, "x" * (200 * 1024)
        sizes: dict[str, list[float]] = {"1k": [], "200k": []}
        for _ in range(15):
            sizes["1k"].append(await stream_ttft(client, base, PACED, small, 1))
            sizes["200k"].append(await stream_ttft(client, base, PACED, large, 1))
        rate = await relay_rate(client, base, streams=32, tokens=1000)
    return {"ttft": ttfts, "sizes": sizes, "relay_chunks_per_s": rate}


def measure(interval: float = INTERVAL_S) -> dict[str, object]:
    baseline = in_process_ttft(interval, 200)
    with tempfile.TemporaryDirectory(prefix="cortex-bench-") as tmp:
        stack = SyntheticStack(Path(tmp), [SyntheticWorker(PACED, interval), SyntheticWorker(FAST, 0.0)]).start()
        try:
            http = asyncio.run(measure_http(stack.base))
            probe = machine_probe.measure(stack.nats_url, ANSWER_S)  # the same server, the hop's own pacing
        finally:
            stack.stop()
    base_p50, base_p99 = p50(baseline), percentile(baseline, 99)
    ttft: dict[int, list[float]] = http["ttft"]  # type: ignore[assignment]
    sizes: dict[str, list[float]] = http["sizes"]  # type: ignore[assignment]
    added = {
        str(c): {
            "p50_ms": round((p50(v) - base_p50) * 1000, 3),
            "p99_ms": round((percentile(v, 99) - base_p99) * 1000, 3),
        }
        for c, v in ttft.items()
    }
    return {
        "hop_added_ttft_ms_p50_at_16": added["16"]["p50_ms"],
        "hop_added_ttft_ms_p99_at_16": added["16"]["p99_ms"],
        "relay_chunks_per_s": round(float(http["relay_chunks_per_s"]), 1),  # type: ignore[arg-type]
        "large_prompt_added_ms": round((statistics.median(sizes["200k"]) - statistics.median(sizes["1k"])) * 1000, 3),
        "hop_vs_broker_rtt_paced_at_16": round(added["16"]["p50_ms"] / probe["broker_rtt_ms_p50_paced_16"], 2),
        **probe,
        "hop_added_ttft_ms": added,
        "in_process_ttft_ms_p50": round(base_p50 * 1000, 4),
        "machine": machine("cpu"),
    }


def main() -> None:
    install_uvloop()
    print(json.dumps(measure()))


if __name__ == "__main__":
    main()
