"""Conversation affinity: a prompt goes first to the worker that has its prefix cached, and never waits behind it.

Two real workers serve a tiny model of their own (two slots each, every decoding
step slowed a little so that long answers hold their slots): ``aff-a`` hands a
request meant for it on after the default window, ``aff-b`` only after 30 s (so
that its requests move only when the model leaves). Turns go through the
session's gateway with the OpenAI SDK; which worker answered shows in the fleet
bucket, where each worker advertises the prefix keys of the prompts it answered.
The window and the unload are checked on the wire (requests published to a
worker's affine subject by the test, which hears the workers' `Taken` notices);
the gateway's own hand-over of a request whose worker left, on the relay, with
the test playing the workers; a request taken before its worker stops serving
the model, and a worker that cannot make its affine consumer, with synthetic
workers of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import openai
import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from cortex.broker import fleet_ops, provision
from cortex.broker.bus import Bus
from cortex.broker.pull import Move
from cortex.broker.server import EmbeddedNats
from cortex.gateway.affinity import Affinity, Chain, prefix_chain
from cortex.gateway.anthropic_messages import AnthropicMessages
from cortex.gateway.openai_chat import OpenAIChat
from cortex.gateway.openai_completions import OpenAICompletions
from cortex.gateway.openai_responses import OpenAIResponses
from cortex.gateway.relay import Relay
from cortex.protocol import Chunk, GenerateRequest, Message, ModelState, Sampling, Usage, WorkerAdvert, codec, names
from cortex.protocol.messages import Taken
from tests.conftest import Gateway, get_json, on_bus, start_worker, stop_process, until, wait_for

MODEL = "affine-tiny"
QUICK, PATIENT = "aff-a", "aff-b"
"""The workers: ``aff-a`` hands a request meant for it on after the default window, ``aff-b`` after 30 s."""
SYSTEM = "You are a careful assistant. Answer in one short sentence, and say where the answer comes from. " * 3


def system(tag: str) -> dict[str, str]:
    """A system prompt long enough to be worth a key (its own per test, so no test finds another's cached)."""
    return {"role": "system", "content": f"{tag}: {SYSTEM}"}


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


# -- keys: the same prefix is the same key, whatever the dialect ----------------------------------------------


def keys_of(dialect: Any, body: dict[str, Any]) -> list[str]:
    request = dialect.parse(msgspec.json.encode(body)).request
    return prefix_chain(msgspec.structs.replace(request, model=MODEL)).keys


def test_prefix_keys_are_the_same_across_dialects_and_turns() -> None:
    turn1 = [system("keys"), user("Tell me about Paris.")]
    chat = keys_of(OpenAIChat(), {"model": MODEL, "messages": turn1})
    anthropic = keys_of(AnthropicMessages(), {"model": MODEL, "max_tokens": 8, "system": turn1[0]["content"],
                                              "messages": turn1[1:]})  # fmt: skip
    responses = keys_of(OpenAIResponses(), {"model": MODEL, "instructions": turn1[0]["content"],
                                            "input": [turn1[1]]})  # fmt: skip
    assert chat == anthropic == responses and len(chat) == 2  # the system part, then the whole prompt
    # The next turn repeats this one: its chain holds this turn's last key, which the worker advertises.
    turn2 = [*turn1, {"role": "assistant", "content": "It is in France."}, user("And Berlin?")]
    chain2 = prefix_chain(GenerateRequest(request_id="r", model=MODEL, messages=[Message(**m) for m in turn2]))
    assert chain2.keys[:2] == chat and chain2.system == chat[0] and chain2.wire == [chat[0], chain2.keys[-1]]
    # Another conversation with the same system part shares its system key, and only that.
    other = keys_of(OpenAIChat(), {"model": MODEL, "messages": [turn1[0], user("Hello")]})
    assert other[0] == chat[0] and other[1] != chat[1]
    # Another model's cache is another cache; a short prompt is worth no key.
    elsewhere = GenerateRequest(request_id="r", model="other", messages=[Message(**m) for m in turn1])
    assert set(prefix_chain(elsewhere).keys).isdisjoint(chat)
    assert keys_of(OpenAIChat(), {"model": MODEL, "messages": [user("Hi")]}) == []
    # A raw prompt is chained by blocks: a longer one that starts the same holds the shorter one's keys.
    short = keys_of(OpenAICompletions(), {"model": MODEL, "prompt": SYSTEM * 2})
    longer = keys_of(OpenAICompletions(), {"model": MODEL, "prompt": SYSTEM * 2 + " and then some more text."})
    assert short and longer[: len(short)] == short


# -- the stream: affine subjects, in place of an older configuration; counted in the queue -------------------


def test_an_older_request_stream_takes_the_affine_subjects_and_counts_them(private_nats: EmbeddedNats) -> None:
    server = private_nats

    async def scenario() -> None:
        bus = await Bus.open(server.url, name="provision test")
        try:
            # As an older release provisioned it: one token per model, so no affine subject is in the stream.
            older = provision.request_stream_config()
            older.subjects = ["cortex.req.*"]
            await bus._js.update_stream(older)
            queued = await bus.publish_request(MODEL, b"{}", msg_id="queued-before")
            await provision.ensure_request_stream(bus._js)
            info = await bus._js.stream_info(names.REQUEST_STREAM)
            assert info.config.subjects == [names.request_subject_wildcard()] and info.state.messages == 1
            affine = await bus.publish_request(MODEL, b"{}", msg_id="meant-for-w", worker="w")
            assert await bus.queued_seqs(MODEL, 10) == [queued, affine]  # queue positions count both
            pull = await bus.pull_queue(MODEL, "w")
            assert pull.has_affine and await pull.pending() == 2  # and so does the advertised queue depth
            await pull.close()
        finally:
            await bus.close()

    asyncio.run(scenario())


# -- two workers behind the gateway -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(
    nats_server: EmbeddedNats, gateway: Gateway, tiny_model_dir: Path, logs_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[openai.OpenAI]:  # fmt: skip
    catalogue = tmp_path_factory.mktemp("affinity") / "models.toml"
    catalogue.write_text(f'[[models]]\nid = "{MODEL}"\npath = "{tiny_model_dir}"\ndtype = "float32"\n'
                         f"keep_alive = -1\nmax_replicas = 2\n")  # fmt: skip
    common = ["--model", MODEL, "--device", "cpu", "--slots", "2", "--step-delay", "0.01"]
    procs = [
        start_worker(nats_server.url, catalogue, logs_dir / f"{QUICK}.log", *common, "--worker-id", QUICK),
        start_worker(nats_server.url, catalogue, logs_dir / f"{PATIENT}.log", *common, "--worker-id", PATIENT,
                     "--affinity-window", "30"),
    ]  # fmt: skip
    try:
        wait_for(lambda: sorted(ready_on(gateway)) == [QUICK, PATIENT], timeout=120, what="both workers ready")
        yield openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0, timeout=60)
    finally:
        for proc in procs:
            stop_process(proc)


def ready_on(gateway: Gateway) -> list[str]:
    try:
        entry = get_json(f"{gateway.base_url}/models/{MODEL}")
    except OSError:
        return []
    return list(entry.get("loaded_on", [])) if isinstance(entry, dict) else []


def states(url: str) -> dict[str, ModelState]:
    """Each live worker's state of the model, as it advertises it."""
    out = {}
    for key, value in on_bus(url, Bus.read_fleet).items():
        if names.is_worker_key(key):
            advert = codec.decode_advert(value)
            state = advert.state_of(MODEL)
            if state is not None:
                out[advert.worker_id] = state
    return out


def answered_by(url: str, messages: list[dict[str, str]]) -> str:
    """The worker that answered `messages`: the one that advertises their prefix key once it has."""
    key = prefix_chain(GenerateRequest(request_id="r", model=MODEL, messages=[Message(**m) for m in messages])).keys[-1]
    found: list[str] = []

    def advertised() -> bool:
        found[:] = [worker for worker, state in states(url).items() if key in state.prefix_keys]
        return bool(found)

    wait_for(advertised, timeout=10, what="the answering worker's advert")
    assert len(found) == 1, found
    return found[0]


def turn(client: openai.OpenAI, messages: list[dict[str, str]]) -> tuple[str, int]:
    """The answer to `messages` and its cached prompt tokens."""
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)  # type: ignore[arg-type]
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    return reply.choices[0].message.content or "", reply.usage.prompt_tokens_details.cached_tokens or 0


def test_the_next_turn_goes_to_the_worker_that_answered_the_last(
    pair: openai.OpenAI, nats_server: EmbeddedNats
) -> None:
    for tag in ("first conversation", "second conversation"):
        messages = [system(tag), user("Tell me about Paris.")]
        answer, _ = turn(pair, messages)
        worker = answered_by(nats_server.url, messages)
        for question in ("And Berlin?", "What does the fox do?"):
            prompt_before = len(messages)
            messages += [{"role": "assistant", "content": answer}, user(question)]
            answer, cached = turn(pair, messages)
            assert cached > 0, f"turn {prompt_before // 2 + 1} found nothing cached"
            assert answered_by(nats_server.url, messages) == worker


def test_a_shared_system_prompt_goes_to_a_worker_that_has_it(pair: openai.OpenAI, nats_server: EmbeddedNats) -> None:
    first = [system("agent"), user("Hello")]
    turn(pair, first)
    worker = answered_by(nats_server.url, first)
    for question in ("The quick brown fox.", "Paris is the capital of France."):
        messages = [system("agent"), user(question)]
        _, cached = turn(pair, messages)
        assert cached > 0 and answered_by(nats_server.url, messages) == worker


def test_a_turn_whose_worker_is_full_is_answered_by_the_other(pair: openai.OpenAI, nats_server: EmbeddedNats) -> None:
    messages = [system("full"), user("Hello")]
    answer, _ = turn(pair, messages)
    busy = answered_by(nats_server.url, messages)
    messages.append({"role": "assistant", "content": answer})
    holds = []
    try:
        for i in range(2):  # two long turns of the same conversation: affinity sends both to its worker
            stream = pair.chat.completions.create(model=MODEL, messages=[*messages, user(f"Go on ({i})")],  # type: ignore[arg-type]
                                                  max_tokens=2000, temperature=0, stream=True)  # fmt: skip
            next(iter(stream))  # it runs
            holds.append(stream)
        wait_for(lambda: states(nats_server.url)[busy].in_flight == 2, timeout=10, what=f"{busy} full")
        messages.append(user("Quick question."))
        turn(pair, messages)  # not held up by its worker being full
        assert answered_by(nats_server.url, messages) != busy
        assert states(nats_server.url)[busy].in_flight == 2  # the long turns still run there
    finally:
        for stream in holds:
            stream.close()
    wait_for(lambda: all(s.in_flight == 0 for s in states(nats_server.url).values()), timeout=20, what="all idle")


# -- on the wire: the window, and a model that leaves -----------------------------------------------------------


@dataclass
class Wire:
    """The test as a gateway: it publishes requests (to a worker's affine subject) and reads their chunks."""

    bus: Bus
    gateway_id: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:8]}")
    chunks: dict[str, asyncio.Queue[Chunk]] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)
    notices: dict[str, list[Taken]] = field(default_factory=dict)
    """The workers' word on each request: taken, or moved (`Taken`), in the order heard."""

    def on_reply(self, subject: str, data: bytes) -> None:
        chunk = codec.decode_chunk(data)
        if chunk.final:
            self.done.add(chunk.request_id)
        self.chunks[chunk.request_id].put_nowait(chunk)

    def on_taken(self, subject: str, data: bytes) -> None:
        notice = codec.decode_taken(data)
        self.notices.setdefault(notice.request_id, []).append(notice)

    async def send(self, text: str, worker: str, max_tokens: int, *, model: str = MODEL,
                   keys: tuple[str, ...] = ()) -> tuple[str, int]:  # fmt: skip
        """A request to `worker`'s affine subject ("": the shared one): its id and stream sequence."""
        rid = f"w{uuid.uuid4().hex[:12]}"
        self.chunks[rid] = asyncio.Queue()
        request = GenerateRequest(request_id=rid, model=model, messages=[Message(role="user", content=text)],
                                  sampling=Sampling(temperature=0.0, max_tokens=max_tokens), deadline=time.time() + 60,
                                  reply_subject=names.reply_subject(self.gateway_id, rid),
                                  prefix_keys=list(keys))  # fmt: skip
        seq = await self.bus.publish_request(model, codec.encode(request), msg_id=rid, worker=worker)
        return rid, seq

    async def next(self, rid: str) -> Chunk:
        return await asyncio.wait_for(self.chunks[rid].get(), 20)

    async def answer(self, rid: str) -> Chunk:
        """The first chunk, once the whole answer has come."""
        first = chunk = await self.next(rid)
        while not chunk.final:
            chunk = await self.next(rid)
        assert chunk.error is None, chunk.error
        return first

    async def hold(self, worker: str) -> list[str]:
        """Fill `worker`'s two slots with long answers; their ids once both run there."""
        holds = [(await self.send("Tell me a long story.", worker, 2000))[0] for _ in range(2)]
        assert [(await self.next(rid)).worker_id for rid in holds] == [worker, worker]
        return holds

    async def cancel(self, rids: list[str]) -> None:
        for rid in rids:
            await self.bus.publish(names.cancel_subject(), rid.encode())


@contextlib.asynccontextmanager
async def wire(url: str) -> AsyncIterator[Wire]:
    bus = await Bus.open(url, name="affinity test")
    w = Wire(bus)
    await bus.subscribe(names.reply_wildcard(w.gateway_id), w.on_reply)
    await bus.subscribe(names.taken_wildcard(w.gateway_id), w.on_taken)
    try:
        yield w
    finally:
        await bus.close()


def test_a_full_worker_hands_a_request_meant_for_it_on_after_its_window(
    pair: openai.OpenAI, nats_server: EmbeddedNats
) -> None:
    async def scenario() -> None:
        async with wire(nats_server.url) as w:
            holds = await w.hold(QUICK)
            try:
                rid, seq = await w.send("Quick question.", QUICK, 4)
                first = await w.answer(rid)
                assert first.worker_id == PATIENT  # the other worker took it, moved to the shared subject
                assert first.stream_seq > seq and await w.bus.request_settled(seq)
                assert not w.done & set(holds)  # while its own worker was still full
                # Each worker told the gateway at once: the one that moved it, and the one that took it.
                await until(lambda: len(w.notices.get(rid, [])) == 2, 5, "both workers' word")
                said = {(n.worker_id, n.moved, n.stream_seq) for n in w.notices[rid]}
                assert said == {(QUICK, True, first.stream_seq), (PATIENT, False, first.stream_seq)}
                assert all(w.notices[hold][0].worker_id == QUICK and not w.notices[hold][0].moved for hold in holds)
            finally:
                await w.cancel(holds)

    asyncio.run(scenario())


def test_a_model_leaving_hands_its_waiting_requests_on(pair: openai.OpenAI, nats_server: EmbeddedNats) -> None:
    async def scenario() -> None:
        async with wire(nats_server.url) as w:
            holds = await w.hold(PATIENT)
            try:
                rid, _ = await w.send("Quick question.", PATIENT, 4)  # waits there: its window is 30 s
                assert not (await fleet_ops.unload(w.bus, MODEL, worker=PATIENT)).startswith("refused")
                assert (await w.answer(rid)).worker_id == QUICK  # handed on when the model left, not after 30 s
                assert not w.done & set(holds)  # the long answers still run: the unload waits for them
            finally:
                await w.cancel(holds)
            await fleet_ops.load(w.bus, MODEL, worker=PATIENT)

    asyncio.run(scenario())


# -- the gateway's half: a worker that left before taking its request -----------------------------------------


def test_a_request_whose_worker_left_goes_to_the_shared_queue(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cortex.gateway.relay.LIVENESS_CHECK_S", 0.01)
    monkeypatch.setattr("cortex.gateway.relay.SILENCE_CHECK_S", 0.01)

    async def scenario() -> None:
        bus = await Bus.open(nats_server.url, name="affinity relay test")
        model = f"aff-relay-{uuid.uuid4().hex[:8]}"
        relay = Relay(bus, lambda worker, instance: True)
        adverts: list[WorkerAdvert] = []
        relay.affinity = Affinity(lambda: list(adverts))
        await relay.start()
        shared: asyncio.Queue[GenerateRequest] = asyncio.Queue()
        cancels: list[str] = []
        await bus.subscribe(names.request_subject(model), lambda subject, data: shared.put_nowait(
            codec.decode_request(data)))  # fmt: skip
        await bus.subscribe(names.cancel_subject(), lambda subject, data: cancels.append(data.decode()))

        async def ask(rid: str) -> tuple[Any, int]:
            messages = [Message(**system("relay")), Message(role="user", content=rid)]
            request = GenerateRequest(request_id=rid, model=model, messages=messages, deadline=time.time() + 60,
                                      reply_subject=relay.reply_subject(rid))  # fmt: skip
            # w1 holds the system part of the prompt, has the model ready and a free slot.
            state = ModelState(id=model, state="ready", prefix_keys=[prefix_chain(request).system], affine=True)
            adverts[:] = [WorkerAdvert(worker_id="w1", host="h", device="cpu", models=[state], slots_total=2,
                                       slots_free=2)]  # fmt: skip
            stream = await relay.submit(request)  # no failovers: a hand-over is none
            seq = max(await bus.queued_seqs(model, 10))  # the newest (answers the test played were never acked)
            assert (await bus._js.get_msg(names.REQUEST_STREAM, seq)).subject == names.affine_subject(model, "w1")
            return stream, seq

        async def answer(stream: Any, wire_id: str) -> None:
            waiting = asyncio.create_task(stream.next())
            attempt = await asyncio.wait_for(shared.get(), 10)
            assert attempt.request_id == wire_id and attempt.resume is None  # sent on as it was
            done = Chunk(request_id=wire_id, seq=0, worker_id="w2", finish_reason="stop",
                         usage=Usage(prompt_tokens=1, completion_tokens=0, total_tokens=1))  # fmt: skip
            await bus.publish(relay.reply_subject(wire_id), codec.encode(done))
            assert (await asyncio.wait_for(waiting, 10)).worker_id == "w2"

        try:
            # w1 leaves the fleet before taking its request: the gateway sends it on, and deletes it from w1's queue.
            stream, seq = await ask(f"a{uuid.uuid4().hex[:8]}")
            adverts.clear()
            await answer(stream, stream.request.request_id + "-1")
            assert cancels == [stream.request.request_id] and await bus.request_settled(seq)
            # w1 moved its request to the shared subject itself, and the gateway reconnected meanwhile: the request
            # left the stream before any chunk came, which is not an answer lost: it is sent on, never failed over.
            stream, seq = await ask(f"b{uuid.uuid4().hex[:8]}")
            data = (await bus._js.get_msg(names.REQUEST_STREAM, seq)).data or b""
            await bus.publish_request(model, data, msg_id=names.moved_msg_id(stream.request.request_id, seq))
            await shared.get()  # the moved copy (this test plays no worker that takes it)
            await bus.drop_request(seq)
            bus._link.reconnects += 1
            await answer(stream, stream.request.request_id + "-1")
            assert cancels[-1] == stream.request.request_id  # the moved copy is cancelled: answered once
            # w1 stays in the fleet serving the model, but neither takes its request nor moves it (a worker whose
            # moves went unanswered lets one go silently): past its patience the gateway sends it on, not at the
            # request's deadline.
            monkeypatch.setattr("cortex.gateway.affinity.TAKE_PATIENCE_S", 0.5)
            stream, seq = await ask(f"c{uuid.uuid4().hex[:8]}")
            await answer(stream, stream.request.request_id + "-1")
            assert cancels[-1] == stream.request.request_id and await bus.request_settled(seq)
        finally:
            await bus._js.purge_stream(names.REQUEST_STREAM, subject=names.affine_wildcard(model))
            await bus._js.purge_stream(names.REQUEST_STREAM, subject=names.request_subject(model))
            await bus.close()

    asyncio.run(scenario())


# -- the gateway's view: which workers take affine requests, kept per advert ---------------------------------


def advert_of(
    worker: str, keys: list[str], updated_at: float = 1.0, model: str = MODEL, affine: bool = True
) -> WorkerAdvert:
    state = ModelState(id=model, state="ready", prefix_keys=keys, affine=affine)
    return WorkerAdvert(worker_id=worker, host="h", device="cpu", models=[state], slots_total=2, slots_free=2,
                        updated_at=updated_at)  # fmt: skip


def test_the_gateway_follows_each_advert_and_sends_nothing_to_a_worker_not_taking_affine_requests() -> None:
    adverts = {"w1": advert_of("w1", ["k1"]), "w2": advert_of("w2", ["k2"])}
    affinity = Affinity(lambda: list(adverts.values()))
    assert affinity.choose(MODEL, Chain(["k1"])) == "w1" and affinity.choose(MODEL, Chain(["k2"])) == "w2"
    adverts["w1"] = advert_of("w1", ["k3"], updated_at=2.0)  # w1's cache moved on: only its keys are read again
    assert affinity.choose(MODEL, Chain(["k1"])) == "" and affinity.choose(MODEL, Chain(["k3"])) == "w1"
    del adverts["w2"]  # gone from the fleet: its keys with it
    assert affinity.choose(MODEL, Chain(["k2"])) == ""
    # A worker ready for the model that does not say it takes affine requests (older, or without its affine
    # consumer yet) is sent none, not even by what this gateway remembers of it; one that does is, before its
    # advert lists what it answered (the first answer of a model there).
    adverts["w3"] = advert_of("w3", ["k4"], affine=False)
    affinity.remember(MODEL, ["k4"], "w3")
    assert affinity.choose(MODEL, Chain(["k4"])) == ""
    adverts["w4"] = advert_of("w4", [])
    affinity.remember(MODEL, ["k4"], "w4")
    assert affinity.choose(MODEL, Chain(["k4"])) == "w4"


# -- moves: stored once however often tried, refused by a full queue -------------------------------------------


def test_a_move_is_stored_once_however_often_tried_and_a_refused_one_stays_with_its_worker(
    private_nats: EmbeddedNats,
) -> None:
    server = private_nats

    async def scenario() -> None:
        bus = await Bus.open(server.url, name="move test")
        try:
            small = provision.request_stream_config()
            small.max_msgs_per_subject = 1  # the shared queue is full with one request
            await bus._js.update_stream(small)
            pull = await bus.pull_queue(MODEL, "w")
            await bus.publish_request(MODEL, b"{}", msg_id="first", worker="w")
            [first] = await pull.fetch_affine(1, timeout=5)
            outcome, seq = await pull.move(first)
            assert outcome is Move.DONE and await bus.queued_seqs(MODEL, 10) == [seq]
            # A try again (as after a publish that got no answer) finds the copy stored, and stores no other.
            assert await pull.move(first) == (Move.DONE, seq) and await bus.queued_seqs(MODEL, 10) == [seq]
            await bus.publish_request(MODEL, b"{}", msg_id="second", worker="w")
            [second] = await pull.fetch_affine(1, timeout=5)
            # The shared queue is full: the broker refuses the copy. The request is acked (its worker holds it, to
            # run or move later), and its ack verbs do nothing more.
            assert await pull.move(second) == (Move.REFUSED, 0)
            assert second.handed_on
            # An ack is a message with no answer: the broker removes the request once it has read it.
            await until_async(lambda: settled_or_none(bus, second.stream_seq), 10, "the refused request acked")
            await second.ack()
            assert await bus.queued_seqs(MODEL, 10) == [seq]
            await pull.close()
        finally:
            await bus.close()

    asyncio.run(scenario())


# -- synthetic workers of their own: a request taken early, a worker without its affine consumer -------------


def synthetic_worker(url: str, folder: Path, model: str, worker: str, *args: str) -> Any:
    catalogue = folder / f"{worker}.toml"
    catalogue.write_text(f'[[models]]\nid = "{model}"\npath = "{folder}"\nkeep_alive = -1\n')
    return start_worker(url, catalogue, folder / f"{worker}.log", "--model", model, "--synthetic-engine", "0.01",
                        "--slots", "2", "--worker-id", worker, *args)  # fmt: skip


async def state_on(bus: Bus, worker: str, model: str, after: float = 0.0) -> ModelState | None:
    """`worker`'s advertised state of `model` once ready, from an advert written after `after` (Unix time); None
    until then."""
    for advert in await fleet_ops.live_adverts(bus):
        state = advert.state_of(model)
        if advert.worker_id == worker and advert.updated_at > after and state is not None and state.state == "ready":
            return state
    return None


def test_a_request_its_worker_took_is_answered_there_though_the_worker_stops_serving_the_model(
    nats_server: EmbeddedNats, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every 10 ms the stream asks whether its worker still serves the model: a request not known to be taken would be
    # sent on at once.
    monkeypatch.setattr("cortex.gateway.relay.LIVENESS_CHECK_S", 0.01)
    model, worker = f"aff-early-{uuid.uuid4().hex[:6]}", f"early-{uuid.uuid4().hex[:6]}"
    proc = synthetic_worker(nats_server.url, tmp_path, model, worker, "--synthetic-prefill", "3")

    async def scenario() -> None:
        bus = await Bus.open(nats_server.url, name="affinity early test")
        try:
            await until_async(lambda: state_on(bus, worker, model), 30, f"{model} ready on {worker}")
            relay = Relay(bus, lambda worker, instance: True)
            adverts: list[WorkerAdvert] = []
            relay.affinity = Affinity(lambda: list(adverts))
            await relay.start()
            cancels: list[str] = []
            await bus.subscribe(names.cancel_subject(), lambda subject, data: cancels.append(data.decode()))
            rid = f"e{uuid.uuid4().hex[:8]}"
            request = GenerateRequest(request_id=rid, model=model, sampling=Sampling(max_tokens=3),
                                      messages=[Message(**system("early")), Message(role="user", content="Hello")],
                                      deadline=time.time() + 30, reply_subject=relay.reply_subject(rid))  # fmt: skip
            adverts[:] = [advert_of(worker, [prefix_chain(request).system], model=model)]
            stream = await relay.submit(request)
            first = asyncio.create_task(stream.next())
            await until(lambda: stream.worker_id == worker, 10, f"{worker}'s word that it took the request")
            assert not first.done()  # in its prefill (3 s)
            # The gateway sees the worker no longer serve the model (as after an unload or a drain, or a gap in its
            # adverts), and it is unloaded there indeed: the request it runs runs on, and is answered once.
            adverts.clear()
            assert not (await fleet_ops.unload(bus, model, worker=worker)).startswith("refused")
            chunk = await asyncio.wait_for(first, 15)
            while not chunk.final:
                chunk = await asyncio.wait_for(stream.next(), 15)
            assert chunk.error is None and chunk.worker_id in ("", worker) and stream.worker_id == worker
            assert stream.attempt == 0 and rid not in cancels  # never sent on, never cancelled
            stream.close()
        finally:
            await bus.close()

    try:
        asyncio.run(scenario())
    finally:
        stop_process(proc)


async def settled_or_none(bus: Bus, seq: int) -> bool | None:
    """True once the request at `seq` has left the stream; None until then (for `until_async`)."""
    return True if await bus.request_settled(seq) else None


async def until_async(probe: Callable[[], Any], timeout: float, what: str) -> Any:
    """Await `probe()` every 0.1 s until it returns something; fail with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (found := await probe()) is None:
        assert time.monotonic() < deadline, f"timed out after {timeout:.0f}s waiting for {what}"
        await asyncio.sleep(0.1)
    return found


def test_a_worker_without_its_affine_consumer_is_sent_no_affine_request_until_it_has_one(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    model, worker = f"aff-lone-{uuid.uuid4().hex[:6]}", f"lone-{uuid.uuid4().hex[:6]}"
    durable, key = names.affine_consumer_name(model, worker), "k-lone"

    async def scenario() -> None:
        async with wire(nats_server.url) as w:
            # A consumer by the name of the worker's affine one that reads another subject (another configuration):
            # the worker cannot make its own while it stands, so it serves from the shared queue only.
            other = ConsumerConfig(durable_name=durable, filter_subject=names.affine_subject(model, "other"),
                                   ack_policy=AckPolicy.EXPLICIT)  # fmt: skip
            await w.bus._js.add_consumer(names.REQUEST_STREAM, other)
            proc = synthetic_worker(nats_server.url, tmp_path, model, worker)
            try:
                await until_async(lambda: state_on(w.bus, worker, model), 30, f"{model} ready on {worker}")
                rid, _ = await w.send("Hello", "", 2, model=model, keys=(key,))  # the shared subject
                assert (await w.answer(rid)).worker_id == worker
                answered = time.time()
                state = await until_async(lambda: state_on(w.bus, worker, model, answered), 10, "an advert")
                assert not state.affine and not state.prefix_keys  # it answered, but says it takes no affine request
                adverts = await fleet_ops.live_adverts(w.bus)
                affinity = Affinity(lambda: adverts)
                affinity.remember(model, [key], worker)
                assert affinity.choose(model, Chain([key])) == ""
                # Once the name is free, the worker makes its consumer (it tries every few seconds) and advertises.
                await w.bus._js.delete_consumer(names.REQUEST_STREAM, durable)

                async def advertised() -> ModelState | None:
                    state = await state_on(w.bus, worker, model)
                    return state if state is not None and state.affine and key in state.prefix_keys else None

                await until_async(advertised, 15, f"{worker} advertising its keys")
                rid, _ = await w.send("Hello again", worker, 2, model=model)
                assert (await w.answer(rid)).worker_id == worker  # taken from its affine subject
            finally:
                stop_process(proc)

    asyncio.run(scenario())
