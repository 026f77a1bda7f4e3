"""Resuming an interrupted answer, in-process: the worker's replay and the gateway's failover logic.

The engine: a request resumed after any prefix of its chunks (what a gateway
had received when its worker died) ends exactly as the uninterrupted run, with
stop strings, logprobs, tool calls and constrained decoding. The relay, on the
session's nats-server with the test playing the workers: which failures fail
over, what the new attempt carries, what is dropped, and when it gives up. End
to end, with real workers killed, in ``tests/test_failover.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest
import torch

from cortex.broker.bus import Bus
from cortex.broker.server import EmbeddedNats
from cortex.gateway import errors
from cortex.gateway.relay import Abandoned, Relay, ReplyStream
from cortex.protocol import Chunk, GenerateRequest, Message, ResponseFormat, Sampling, Tool, ToolChoice, codec, names
from cortex.protocol.messages import Resume
from cortex.worker.catalogue import ModelSpec
from cortex.worker.engine import Engine, EngineLimits
from cortex.worker.loader import load_model

# -- the engine: a resumed request continues exactly ----------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[Engine]:
    loaded = load_model(ModelSpec(id="tiny", path=str(tiny_model_dir), dtype="float32"), torch.device("cpu"))
    engine = Engine(worker_id="resumer", limits=EngineLimits(prefix_cache_tokens=0))
    engine.start()
    engine.add_model(loaded)
    yield engine
    engine.stop()


def run_all(engine: Engine, requests: list[GenerateRequest]) -> dict[str, list[Chunk]]:
    """Every request's chunks, all submitted at once (they share the batch)."""
    chunks: dict[str, list[Chunk]] = {r.request_id: [] for r in requests}
    left = [len(requests)]
    done = threading.Event()
    lock = threading.Lock()

    def emit_for(request_id: str):  # type: ignore[no-untyped-def]
        def emit(chunk: Chunk) -> None:
            chunks[request_id].append(chunk)
            if chunk.final:
                with lock:
                    left[0] -= 1
                    if not left[0]:
                        done.set()

        return emit

    for request in requests:
        engine.submit(request, emit_for(request.request_id))
    assert done.wait(120), "requests did not finish"
    return chunks


@dataclass
class Whole:
    """An answer as a client puts it together from its chunks."""

    text: str
    reasoning: str
    calls: dict[int, tuple[str, str]]
    logprobs: list[str]
    finish: str | None
    stop: str | None
    usage: tuple[int, int, int]
    token_ids: list[int]


def whole(chunks: list[Chunk]) -> Whole:
    assert [c.seq for c in chunks] == list(range(len(chunks))), "one stream: seq 0, 1, 2, ... with no gap"
    calls: dict[int, tuple[str, str]] = {}
    for chunk in chunks:
        for delta in chunk.tool_calls:
            name, args = calls.get(delta.index, (delta.name, ""))
            calls[delta.index] = (name, args + delta.arguments)
    last = chunks[-1]
    assert last.usage is not None, last
    usage = (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.reasoning_tokens)
    return Whole(text="".join(c.text for c in chunks), reasoning="".join(c.reasoning for c in chunks), calls=calls,
                 logprobs=[lp.token for c in chunks for lp in c.logprobs], finish=last.finish_reason,
                 stop=last.stop_sequence, usage=usage, token_ids=[t for c in chunks for t in c.token_ids])  # fmt: skip


def resumed_after(request: GenerateRequest, delivered: list[Chunk]) -> GenerateRequest:
    """`request` as a gateway republishes it once `delivered` reached its client."""
    resume = Resume(token_ids=[t for c in delivered for t in c.token_ids], seq=len(delivered), attempt=1)
    return msgspec.structs.replace(request, request_id=f"{request.request_id}-{len(delivered)}", resume=resume)


def check_every_cut(engine: Engine, request: GenerateRequest) -> Whole:
    """Resume `request` after each prefix of its chunks; each joined stream must equal the uninterrupted one."""
    chunks = run_all(engine, [request])[request.request_id]
    reference = whole(chunks)
    assert len(chunks) > 3 and reference.finish != "error", chunks[-1]
    cuts = range(1, len(chunks))
    continued = run_all(engine, [resumed_after(request, chunks[:k]) for k in cuts])
    for k in cuts:
        rest = continued[f"{request.request_id}-{k}"]
        status = rest[0]  # names the worker continuing the answer, covers no token
        assert (status.seq, status.worker_id, status.tokens, status.text) == (k, "resumer", 0, ""), status
        assert whole(chunks[:k] + rest) == reference, f"resumed after chunk {k}"
    return reference


def ask(request_id: str, content: str = "Tell me about Paris", **sampling: object) -> GenerateRequest:
    sampling.setdefault("temperature", 0.0)
    sampling.setdefault("max_tokens", 40)
    return GenerateRequest(request_id=request_id, model="tiny", messages=[Message(role="user", content=content)],
                           sampling=Sampling(**sampling))  # type: ignore[arg-type]  # fmt: skip


def test_a_resumed_answer_ends_as_the_uninterrupted_one(engine: Engine) -> None:
    got = check_every_cut(engine, ask("plain", "Ünïcödé têxt 🙂", max_tokens=30))
    assert got.finish == "length" and got.usage[1] == 30


def test_text_held_back_for_a_stop_string_is_neither_lost_nor_repeated(engine: Engine) -> None:
    text = whole(run_all(engine, [ask("free")])["free"]).text
    stop = text[len(text) * 2 // 3 : len(text) * 2 // 3 + 4]  # its start is held back while it might be the stop
    got = check_every_cut(engine, ask("stopped", stop=[stop]))
    assert got.finish == "stop" and got.stop == stop and got.text == text[: text.index(stop)]


def test_logprobs_one_per_token_none_repeated(engine: Engine) -> None:
    got = check_every_cut(engine, ask("logprobs", logprobs=True, top_logprobs=2, max_tokens=25))
    assert len(got.logprobs) == got.usage[1] == 25


def test_penalties_and_constrained_json_catch_up_on_the_resumed_tokens(engine: Engine) -> None:
    schema = {"type": "object", "properties": {"note": {"type": "string", "minLength": 20, "maxLength": 40}},
              "required": ["note"], "additionalProperties": False}  # fmt: skip
    request = msgspec.structs.replace(
        ask("json", max_tokens=80, presence_penalty=0.5),
        response_format=ResponseFormat(type="json_schema", schema=json.dumps(schema)),
    )
    got = check_every_cut(engine, request)
    assert got.finish == "stop" and 20 <= len(json.loads(got.text)["note"]) <= 40


def test_a_tool_call_cut_in_its_arguments_is_continued_whole(engine: Engine) -> None:
    params = {"type": "object", "properties": {"text": {"type": "string", "minLength": 20, "maxLength": 30}},
              "required": ["text"], "additionalProperties": False}  # fmt: skip
    request = msgspec.structs.replace(
        ask("tool", max_tokens=120),
        tools=[Tool(name="note", parameters=json.dumps(params))],
        tool_choice=ToolChoice(mode="function", name="note"),
    )
    got = check_every_cut(engine, request)
    ((name, arguments),) = got.calls.values()
    assert name == "note" and 20 <= len(json.loads(arguments)["text"]) <= 30


def test_resumed_tokens_that_already_end_the_answer_just_finish_it(engine: Engine) -> None:
    request = ask("ended", max_tokens=8)
    chunks = run_all(engine, [request])["ended"]
    (end,) = run_all(engine, [resumed_after(request, chunks)])["ended-" + str(len(chunks))]
    assert end.finish_reason == "length" and end.seq == len(chunks) and not end.text
    assert end.usage is not None and end.usage.completion_tokens == 8


def test_resumed_token_ids_the_model_does_not_have_are_refused(engine: Engine) -> None:
    request = msgspec.structs.replace(ask("bad"), resume=Resume(token_ids=[10**6], seq=3, attempt=1))
    (chunk,) = run_all(engine, [request])["bad"]
    assert chunk.seq == 3 and chunk.error is not None and chunk.error.code == "invalid_request"


# -- the relay: when an answer fails over, and with what ---------------------------------------------
#
# A real relay on the session's nats-server. The test plays the workers: it publishes their chunks to the
# relay's reply subjects and reads what the relay publishes (requests, cancels) with subscriptions of its own.
# Each test queues requests for a model of its own, with ids of its own (JetStream de-duplicates by id).


@dataclass
class Harness:
    relay: Relay
    bus: Bus
    rid: str
    """The request's id: its attempts are ``<rid>-1``, ``<rid>-2``..."""
    stream: ReplyStream
    requests: list[GenerateRequest] = field(default_factory=list)
    """What the relay queued, as a worker would read it."""
    cancels: list[str] = field(default_factory=list)
    failed_over: list[int] = field(default_factory=list)
    republished: asyncio.Event = field(default_factory=asyncio.Event)

    async def reply(self, request_id: str, seq: int, tokens: list[int], worker: str = "", **more: object) -> None:
        """A worker's chunk for attempt `request_id` (``""``: the first), on the relay's reply subject."""
        wire_id = self.rid + request_id
        chunk = Chunk(request_id=wire_id, seq=seq, tokens=len(tokens), token_ids=tokens, worker_id=worker, **more)  # type: ignore[arg-type]
        await self.bus.publish(self.relay.reply_subject(wire_id), codec.encode(chunk))

    async def settle(self) -> None:
        """Until every message published so far has reached this connection's subscriptions.

        The flush's round trip returns once the server has sent this connection everything published before it
        (the server answers a connection in order); the yields let each subscription's task take its messages.
        """
        await self.bus._nc.flush()
        for _ in range(3):
            await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def started(url: str, dead: frozenset[str] = frozenset(), failovers: int = 2) -> AsyncIterator[Harness]:
    """A relay on a real broker and a stream that has passed on chunks 0 and 1 (tokens 5, 6, 7) from worker w1."""
    bus = await Bus.open(url, name="relay test")
    model, rid = f"relay-{uuid.uuid4().hex[:8]}", f"r{uuid.uuid4().hex[:8]}"
    relay = Relay(bus, lambda worker, instance: worker not in dead)
    await relay.start()
    seen: list[GenerateRequest] = []
    cancels: list[str] = []
    republished = asyncio.Event()

    def on_request(subject: str, data: bytes) -> None:
        request = codec.decode_request(data)
        seen.append(request)
        if request.resume is not None:
            republished.set()

    await bus.subscribe(names.request_subject(model), on_request)
    await bus.subscribe(names.cancel_subject(), lambda subject, data: cancels.append(data.decode()))
    request = GenerateRequest(request_id=rid, model=model, messages=[Message(role="user", content="hi")],
                              deadline=time.time() + 120, reply_subject=relay.reply_subject(rid))  # fmt: skip
    counted: list[int] = []
    stream = await relay.submit(request, failovers=failovers, on_failover=lambda: counted.append(1))
    harness = Harness(relay, bus, rid, stream, seen, cancels, counted, republished)
    try:
        await harness.reply("", 0, [5], "w1")
        await harness.reply("", 1, [6, 7])
        assert [(await stream.next()).seq for _ in range(2)] == [0, 1]
        yield harness
    finally:
        await bus._js.purge_stream(names.REQUEST_STREAM, subject=names.request_subject(model))
        await bus.close()


def test_a_broken_sequence_fails_over_with_what_was_delivered(nats_server: EmbeddedNats) -> None:
    async def scenario() -> None:
        async with started(nats_server.url) as h:
            await h.reply("", 0, [5], "w1")  # the request started over somewhere: a break
            await h.reply("", 2, [8])  # the old attempt goes on, queued before the gateway gave it up (or not)
            waiting = asyncio.create_task(h.stream.next())
            await asyncio.wait_for(h.republished.wait(), 10)
            await h.reply("", 3, [9])  # the old attempt after it was given up: not even routed
            await h.reply("-1", 2, [], "w2")  # the new attempt's status chunk
            await h.reply("-1", 3, [8], text="x")
            assert [(c.seq, c.request_id, c.text) for c in [await waiting, await h.stream.next()]] == [
                (2, h.rid + "-1", ""), (3, h.rid + "-1", "x")
            ]  # fmt: skip
            (first, again) = h.requests
            assert again == msgspec.structs.replace(
                first, request_id=h.rid + "-1", reply_subject=h.relay.reply_subject(h.rid + "-1"),
                resume=Resume(token_ids=[5, 6, 7], seq=2, attempt=1),
            )  # fmt: skip
            await h.settle()
            assert h.cancels == [h.rid] and h.failed_over == [1] and h.stream.worker_id == "w2"
            h.stream.close()
            await wait_until(lambda: len(h.cancels) == 2)
            assert h.cancels == [h.rid, h.rid + "-1"]  # closing an unfinished stream cancels its current attempt

    asyncio.run(scenario())


def test_a_vanished_worker_fails_over_until_the_limit(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cortex.gateway.relay.LIVENESS_CHECK_S", 0.01)

    async def scenario() -> None:
        async with started(nats_server.url, dead=frozenset({"w1", "w2"}), failovers=1) as h:
            waiting = asyncio.create_task(h.stream.next())
            await asyncio.wait_for(h.republished.wait(), 10)
            await h.reply("-1", 2, [], "w2")
            assert (await waiting).worker_id == "w2"
            with pytest.raises(errors.UpstreamError, match=r"Worker w2 stopped answering.*continued elsewhere 1 times"):
                await h.stream.next()
            await h.settle()
            assert len(h.requests) == 2 and h.failed_over == [1]

    asyncio.run(scenario())


def test_no_worker_to_continue_on_is_the_dead_workers_502(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cortex.gateway.relay.LIVENESS_CHECK_S", 0.01)
    monkeypatch.setattr("cortex.gateway.relay.WAITING_CHECK_S", 0.01)

    async def nobody(model: str) -> None:
        raise errors.NoCapacity(f"The model `{model}` cannot be loaded: no live worker has it")

    async def scenario() -> None:
        async with started(nats_server.url, dead=frozenset({"w1"})) as h:
            h.relay.check_waiting = nobody
            with pytest.raises(errors.UpstreamError, match=r"w1 stopped answering.*No other worker can continue it"):
                await h.stream.next()

    asyncio.run(scenario())


def test_chunks_without_token_ids_cannot_be_continued(nats_server: EmbeddedNats) -> None:
    async def scenario() -> None:
        async with started(nats_server.url) as h:
            old = Chunk(request_id=h.rid, seq=2, tokens=1)  # an older worker's chunk: a token it does not name
            await h.bus.publish(h.relay.reply_subject(h.rid), codec.encode(old))
            await h.stream.next()
            await h.reply("", 0, [5], "w1")
            with pytest.raises(errors.UpstreamError, match="cannot be continued"):
                await h.stream.next()
            await h.settle()
            assert len(h.requests) == 1

    asyncio.run(scenario())


def test_an_abandoned_stream_never_fails_over(nats_server: EmbeddedNats) -> None:
    async def scenario() -> None:
        async with started(nats_server.url) as h:
            await h.reply("", 5, [9])  # a break, on its way...
            await h.settle()
            h.stream.abandon()  # ...as the client leaves
            with pytest.raises(Abandoned):
                await h.stream.next()
            await h.settle()
            assert len(h.requests) == 1 and h.cancels == []

    asyncio.run(scenario())


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)
