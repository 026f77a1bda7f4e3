"""The gateway at scale: hundreds of streams in flight, requests per second, memory per open stream.

Prints one JSON object. One gateway process, nats-server and synthetic workers
(`cortex-worker --synthetic-engine`: no model) run on this machine on 127.0.0.1
with the client, so they all share its cores.

- Streams in flight (256, then 1,024): closed loops, each a client on its own
  keep-alive connection asking again as soon as its answer ends; one token every
  `PACE_S` per stream, `ANSWER_TOKENS` tokens an answer, from `PACED_WORKERS`
  workers that emit in steps as batching engines do (their step clocks out of
  phase). Added TTFT is the time to the first token minus the synthetic
  engine's own TTFT called in-process (as `bench.overhead` measures it). The
  most streams run last: they overload this machine.
- Requests per second: tiny non-streamed requests (``max_tokens`` 1) through
  gateway + broker + worker, against a bare Starlette handler returning a
  chat-completion body of the same shape, served by uvicorn with the gateway's
  own settings (`cortex.gateway.main.server_settings`), both driven by the same
  client for the same time.
- Memory: the gateway's resident set (``VmRSS``) before and while ~1,000
  streams are held open on a slow worker (one token a second).

    python -m bench.gateway_scale
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import (
    SyntheticStack,
    SyntheticWorker,
    free_port,
    install_uvloop,
    p50,
    percentile,
    raise_fd_limit,
)

PACED, SLOW, FAST = "synthetic-scale", "synthetic-slow", "synthetic-fast"
PACE_S = 0.03
"""Seconds between two tokens of one stream: 33 tokens/s, a mid-sized model on a busy GPU."""
ANSWER_TOKENS = 32
PACED_WORKERS = 4
"""Workers answering the streams: each a batch of a quarter of them (256 at 1,024 streams), steps out of phase."""
PACED_SLOTS = 320
SLOW_PACE_S = 1.0
"""The memory test's worker: streams stay open, each getting a token a second."""
HELD_STREAMS = 1024
LEVELS = ((256, 12.0), (1024, 12.0))
"""Streams in flight, and seconds measured at each (after one answer's time of warm-up)."""
RATE_CONNECTIONS = 8
RATE_SECONDS = 4.0
TOKEN = b'"content":"tok'
ERROR_BACKOFF_S = 0.1
"""A stream whose request was refused (an overloaded gateway's 503) asks again after this, not in a hot loop."""


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 client connection: sends a request, notes when `marker` first shows, waits for the
    end of the answer (a Content-Length body, or the last chunk of a chunked one). Parses nothing else: the client
    must cost far less than what it measures."""

    def __init__(self) -> None:
        self.transport: asyncio.BaseTransport | None = None
        self._done: asyncio.Future[None] | None = None
        self._head = b""
        self._length = -1
        self._got = 0
        self._chunked = False
        self._tail = b""
        self._marker = b""
        self.first = 0.0
        self.status = 0
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_exception(ConnectionError(f"connection closed mid-answer: {exc}"))
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self._length < 0 and not self._chunked:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self._head[:end].lower(), self._head[end + 4 :]
            self.status = int(head[9:12])
            found = re.search(rb"\r\ncontent-length: *(\d+)", head)
            if found:
                self._length = int(found[1])
            else:
                self._chunked = True
        seen = self._tail + data
        if not self.first and self._marker in seen:
            self.first = time.perf_counter()
        if self._chunked:
            self._tail = seen[-16:]
            if self._tail.endswith(b"\r\n0\r\n\r\n"):
                self._finish()
        else:
            self._tail = seen[-len(self._marker) :]
            self._got += len(data)
            if self._got >= self._length:
                self._finish()

    def _finish(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    def send(self, raw: bytes, marker: bytes = TOKEN) -> asyncio.Future[None]:
        """Send one whole request; the future is done when its answer has ended."""
        assert self.transport is not None
        self._done = asyncio.get_running_loop().create_future()
        self._head, self._length, self._got, self._chunked, self._tail = b"", -1, 0, False, b""
        self._marker, self.first, self.status = marker, 0.0, 0
        self.transport.write(raw)  # type: ignore[attr-defined]  # a TCP transport (uvloop's are no asyncio.Transport)
        return self._done

    async def exchange(self, raw: bytes, marker: bytes = TOKEN) -> tuple[float, float]:
        """Send one whole request and wait for its answer; when it was sent, and when `marker` first came (0: never,
        or the answer's status was not 200: see `status`)."""
        sent = time.perf_counter()
        await self.send(raw, marker)
        return sent, self.first if self.status == 200 else 0.0


async def connect(port: int) -> Connection:
    _, conn = await asyncio.get_running_loop().create_connection(Connection, "127.0.0.1", port)
    return conn


def chat_request(model: str, tokens: int, stream: bool, path: str = "/v1/chat/completions") -> bytes:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": tokens,
                       "stream": stream}).encode()  # fmt: skip
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()  # fmt: skip
    return head + body


async def streams_in_flight(port: int, streams: int, seconds: float, pids: dict[str, int]) -> dict[str, object]:
    """`streams` closed loops for one answer's time of warm-up, then `seconds` measured: each stream's TTFTs, and
    the cores each of `pids` (and the client) kept busy meanwhile."""
    answer_s = PACE_S * ANSWER_TOKENS
    raw = chat_request(PACED, ANSWER_TOKENS, stream=True)
    conns = await asyncio.gather(*(connect(port) for _ in range(streams)))
    start = time.perf_counter() + answer_s  # every stream has started, spread over one answer's time
    stop = start + seconds
    ttfts: list[float] = []
    answers = [0]
    errors: Counter[int] = Counter()

    async def loop(index: int, conn: Connection) -> None:
        await asyncio.sleep(answer_s * index / streams)
        while time.perf_counter() < stop:
            sent, first = await conn.exchange(raw)
            if not first:
                errors[conn.status] += 1  # counted, not fatal: what an overloaded gateway answers is part of the result
                await asyncio.sleep(ERROR_BACKOFF_S)
                continue
            if sent >= start:
                ttfts.append(first - sent)
                answers[0] += 1

    cores: dict[str, float] = {}

    async def clock() -> None:
        await asyncio.sleep(start - time.perf_counter())
        before = cpu_seconds(pids)
        await asyncio.sleep(stop - time.perf_counter())
        after = cpu_seconds(pids)
        cores.update({name: round((after[name] - before[name]) / seconds, 2) for name in before})

    try:
        await asyncio.gather(clock(), *(loop(i, c) for i, c in enumerate(conns)))
    finally:
        for conn in conns:
            assert conn.transport is not None
            conn.transport.close()
    return {"ttfts": ttfts, "answers_per_s": answers[0] / seconds, "errors": dict(errors), "cores_busy": cores}


async def request_rate(
    port: int, raw: bytes, connections: int, seconds: float, pids: dict[str, int]
) -> dict[str, object]:
    """200 answers per second over `seconds` (after a second of warm-up), `connections` keep-alive clients in a loop;
    and the CPU each of `pids` and this client spent per answer meanwhile."""
    conns = await asyncio.gather(*(connect(port) for _ in range(connections)))
    start = time.perf_counter() + 1.0
    stop = start + seconds
    done = [0]
    errors: Counter[int] = Counter()
    cpu: dict[str, float] = {}

    async def loop(conn: Connection) -> None:
        while True:
            await conn.exchange(raw, marker=b"")
            now = time.perf_counter()
            if now >= stop:
                return
            if now >= start:
                if conn.status == 200:
                    done[0] += 1
                else:
                    errors[conn.status] += 1

    async def clock() -> None:
        await asyncio.sleep(start - time.perf_counter())
        before = cpu_seconds(pids)
        await asyncio.sleep(stop - time.perf_counter())
        after = cpu_seconds(pids)
        cpu.update({name: round((after[name] - before[name]) / max(1, done[0]) * 1e6) for name in before})

    try:
        await asyncio.gather(clock(), *(loop(c) for c in conns))
    finally:
        for conn in conns:
            assert conn.transport is not None
            conn.transport.close()
    return {"per_s": done[0] / seconds, "errors": dict(errors), "cpu_us_per_answer": cpu}


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds (user and system) of each named process and of this one (the client) so far."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name, pid in pids.items():
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        out[name] = (int(fields[11]) + int(fields[12])) / tick
    out["client"] = sum(os.times()[:2])
    return out


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


async def held_streams_rss(port: int, pid: int, streams: int) -> dict[str, float]:
    """The gateway's RSS before, and while `streams` streams are open (each has had its first token)."""
    raw = chat_request(SLOW, 10_000, stream=True)
    before = rss_kb(pid)
    conns: list[Connection] = []
    for start in range(0, streams, 128):  # in bursts, as clients arrive, not one SYN flood
        conns += await asyncio.gather(*(connect(port) for _ in range(min(128, streams - start))))
    answers = [conn.send(raw) for conn in conns]
    deadline = time.monotonic() + 60
    while sum(1 for c in conns if c.first) < streams:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {sum(1 for c in conns if c.first)} of {streams} streams started")
        await asyncio.sleep(0.2)
    await asyncio.sleep(2 * SLOW_PACE_S)  # a couple of tokens each: the streams' steady state
    during = rss_kb(pid)
    for conn in conns:
        assert conn.transport is not None
        conn.transport.close()
    await asyncio.gather(*(c.closed for c in conns))
    for answer in answers:
        answer.exception() if answer.done() else answer.cancel()  # closed mid-answer, as meant: nothing to report
    return {"before_mb": before / 1024, "during_mb": during / 1024}


def bare_app() -> object:
    """A Starlette app whose one route reads the body and answers a fixed chat completion: the most a gateway on
    this ASGI stack could do per second."""
    import msgspec
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    encoder = msgspec.json.Encoder()

    async def chat(request: Request) -> Response:
        body = await request.body()
        now = int(time.time())
        answer = {
            "id": f"chatcmpl-{os.urandom(16).hex()}", "object": "chat.completion", "created": now,
            "model": msgspec.json.decode(body).get("model", ""),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "tok "}, "logprobs": None,
                         "finish_reason": "length"}],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
        }  # fmt: skip
        return Response(encoder.encode(answer), media_type="application/json")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def serve_bare(port: int) -> None:
    import uvicorn

    from cortex.gateway.main import server_settings

    uvicorn.run(bare_app(), host="127.0.0.1", port=port, **server_settings("WARNING"))  # type: ignore[arg-type]


def start_bare() -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bench.gateway_scale", "--bare-server", str(port)])
    deadline = time.monotonic() + 30
    while True:
        try:
            asyncio.run(_probe(port))
            return proc, port
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("the bare ASGI server did not come up") from None
            time.sleep(0.1)


async def _probe(port: int) -> None:
    conn = await connect(port)
    await conn.exchange(chat_request(FAST, 1, stream=False), marker=b"")
    assert conn.transport is not None
    conn.transport.close()


def added(level: dict[str, object], base: list[float]) -> dict[str, object]:
    ttfts: list[float] = level["ttfts"]  # type: ignore[assignment]
    return {
        "p50_ms": round((p50(ttfts) - p50(base)) * 1000, 3),
        "p99_ms": round((percentile(ttfts, 99) - percentile(base, 99)) * 1000, 3),
        "samples": len(ttfts),
        "answers_per_s": round(float(level["answers_per_s"]), 1),  # type: ignore[arg-type]
        "errors": level["errors"],
        "cores_busy": level["cores_busy"],
    }


async def measure_stack(stack: SyntheticStack) -> dict[str, object]:
    assert stack.gateway is not None
    port, pids = stack.port, stack.pids()
    warm = await connect(port)  # code paths and caches warm before memory is read
    for _ in range(20):
        await warm.exchange(chat_request(SLOW, 1, stream=True))
    assert warm.transport is not None
    warm.transport.close()
    rss = await held_streams_rss(port, pids["gateway"], HELD_STREAMS)
    rate = await request_rate(port, chat_request(FAST, 1, stream=False), RATE_CONNECTIONS, RATE_SECONDS, pids)
    # The most streams last: they overload this machine, and what an overloaded gateway does next is their result.
    levels = {n: await streams_in_flight(port, n, seconds, pids) for n, seconds in LEVELS}
    return {"rss": rss, "levels": levels, "rate": rate}


def measure() -> dict[str, object]:
    from bench.overhead import in_process_ttft

    fds = raise_fd_limit()
    began = time.monotonic()
    base = in_process_ttft(PACE_S, 200)
    workers = [SyntheticWorker(PACED, PACE_S, PACED_SLOTS, f"{PACED}-{i}", steps=True) for i in range(PACED_WORKERS)]
    workers += [SyntheticWorker(SLOW, SLOW_PACE_S, slots=HELD_STREAMS + 64), SyntheticWorker(FAST, 0.0, slots=64)]
    with tempfile.TemporaryDirectory(prefix="cortex-bench-") as tmp:
        stack = SyntheticStack(Path(tmp), workers).start()
        try:
            got = asyncio.run(measure_stack(stack))
        finally:
            stack.stop()
    bare, bare_port = start_bare()
    try:
        tiny = chat_request(FAST, 1, stream=False)
        bare_rate: dict[str, Any] = asyncio.run(
            request_rate(bare_port, tiny, RATE_CONNECTIONS, RATE_SECONDS, {"bare_server": bare.pid})
        )
    finally:
        bare.terminate()
        bare.wait(10)
    rss: dict[str, float] = got["rss"]  # type: ignore[assignment]
    levels: dict[int, dict[str, object]] = got["levels"]  # type: ignore[assignment]
    hop = {str(n): added(level, base) for n, level in levels.items()}
    rate: dict[str, Any] = got["rate"]  # type: ignore[assignment]
    return {
        "hop_added_ttft_ms_p99_at_256": hop["256"]["p99_ms"],
        "gateway_rps_vs_bare_asgi": round(rate["per_s"] / bare_rate["per_s"], 3),
        "gateway_rss_mb_per_1000_streams": round((rss["during_mb"] - rss["before_mb"]) * 1000 / HELD_STREAMS, 1),
        "hop_added_ttft_ms_p50_at_256": hop["256"]["p50_ms"],
        "hop_added_ttft_ms_p50_at_1024": hop["1024"]["p50_ms"],
        "hop_added_ttft_ms_p99_at_1024": hop["1024"]["p99_ms"],
        "hop_added_ttft_ms_at_scale": hop,
        "gateway_rps": round(rate["per_s"], 1),
        "bare_asgi_rps": round(bare_rate["per_s"], 1),
        "rate_cpu_us_per_answer": {"gateway_stack": rate["cpu_us_per_answer"], "bare": bare_rate["cpu_us_per_answer"]},
        "rate_errors": {"gateway": rate["errors"], "bare": bare_rate["errors"]},
        "gateway_rss_mb": {k: round(v, 1) for k, v in rss.items()} | {"streams_held": HELD_STREAMS},
        "shape": {
            "streams": "closed loops, one keep-alive connection each, started spread over one answer's time",
            "token_pace_s": PACE_S,
            "tokens": "the first at admission, the others on the worker's step clock (all streams of a worker "
            "together, as a batching engine's decoding step)",
            "answer_tokens": ANSWER_TOKENS,
            "measured_s": {str(n): seconds for n, seconds in LEVELS},
            "rate_requests": f"non-streamed chat, max_tokens 1, {RATE_CONNECTIONS} keep-alive connections, "
            f"{RATE_SECONDS} s each",
            "held_streams_pace_s": SLOW_PACE_S,
            "gateway_processes": 1,
            "worker_processes": len(workers),
            "stream_workers": f"{PACED_WORKERS}, {PACED_SLOTS} slots each",
            "client_processes": 1,
            "cores": os.cpu_count(),
            "open_files_limit": fds,
        },
        "in_process_ttft_ms": {"p50": round(p50(base) * 1000, 4), "p99": round(percentile(base, 99) * 1000, 4)},
        "seconds": round(time.monotonic() - began, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bare-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        serve_bare(args.bare_server)
        return
    install_uvloop()
    print(json.dumps(measure()))


if __name__ == "__main__":
    main()
