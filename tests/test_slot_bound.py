"""A worker never runs more requests than its slots, however they come (shared queue and affine subject at once).

A pull request stays open after its fetch returns (`cortex.broker.standing`), so
it may bring requests after affine ones filled the slots; those are nak'd at once
for another worker (`Outcome.NO_ROOM`), never run beside the others. Seen from
outside: a request's chunks start only after another's last chunk went out
(the worker releases a slot after the final chunk, on the same connection), so
the requests whose first chunk came and whose last did not are a lower bound of
what runs at once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import nats.js.errors
import pytest

from cortex.broker.bus import Bus
from cortex.broker.server import EmbeddedNats
from cortex.protocol import Chunk, GenerateRequest, Message, Sampling, codec, names
from tests.conftest import Gateway, on_bus, ready_models, start_worker, stop_process, wait_for

MODEL = "tiny-slot-bound"
WORKER = "slot-bound"
SLOTS = 2
TEST_GATEWAY = "gw-slot-bound-test"


@pytest.fixture(scope="module")
def bound_worker(
    nats_server: EmbeddedNats, gateway: Gateway, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory,
    logs_dir: Path,
) -> Iterator[None]:  # fmt: skip
    catalogue = tmp_path_factory.mktemp("bound") / "models.toml"
    catalogue.write_text(f'[[models]]\nid = "{MODEL}"\npath = "{tiny_model_dir}"\nkeep_alive = -1\n')
    proc = start_worker(nats_server.url, catalogue, logs_dir / "slot-bound-worker.log", "--model", MODEL,
                        "--synthetic-engine", "0.01", "--slots", str(SLOTS), "--worker-id", WORKER)  # fmt: skip
    wait_for(lambda: MODEL in ready_models(gateway.base_url), timeout=60, what=MODEL, proc=proc)
    yield
    stop_process(proc)


def request(max_tokens: int) -> GenerateRequest:
    request_id = uuid.uuid4().hex
    return GenerateRequest(
        request_id=request_id, model=MODEL, messages=[Message(role="user", content="go on")],
        sampling=Sampling(temperature=0, max_tokens=max_tokens, ignore_eos=True),
        reply_subject=names.reply_subject(TEST_GATEWAY, request_id), created=time.time(),
    )  # fmt: skip


async def burst(bus: Bus) -> tuple[int, int]:
    """Rounds of requests to the shared queue and the worker's affine subject at once; (most seen running, answered)."""
    running: set[str] = set()
    most = 0
    done: set[str] = set()
    arrived = asyncio.Event()

    def on_reply(_subject: str, data: bytes) -> None:
        nonlocal most
        chunk: Chunk = codec.decode_chunk(data)
        if chunk.final or chunk.error:
            running.discard(chunk.request_id)
            done.add(chunk.request_id)
            arrived.set()
        elif chunk.request_id not in done:
            running.add(chunk.request_id)
            most = max(most, len(running))

    await bus.subscribe(names.reply_wildcard(TEST_GATEWAY), on_reply)
    # Its affine consumer exists once it has made it (it then takes what comes there first).
    affine = names.affine_consumer_name(MODEL, WORKER)
    deadline = time.monotonic() + 30
    while not await _has_consumer(bus, affine):
        assert time.monotonic() < deadline, "the worker never made its affine consumer"
        await asyncio.sleep(0.1)
    sent: list[str] = []
    for _ in range(6):
        batch = [request(30) for _ in range(2 * SLOTS)]
        for i, one in enumerate(batch):  # the affine ones fill the slots the open shared fetch asked for
            await bus.publish_request(
                MODEL, codec.encode(one), msg_id=one.request_id, worker=WORKER if i < SLOTS else ""
            )
        sent += [one.request_id for one in batch]
        async with asyncio.timeout(120):  # the next round once these ran: an idle worker's shared fetch opens again
            while not done.issuperset(sent):
                arrived.clear()
                await arrived.wait()
    return most, len(done & set(sent))


async def _has_consumer(bus: Bus, durable: str) -> bool:
    try:
        await bus._js.consumer_info(names.REQUEST_STREAM, durable)
    except nats.js.errors.NotFoundError:  # not made yet; any other error is the broker's and fails the test
        return False
    return True


def test_a_worker_never_runs_more_than_its_slots(nats_server: EmbeddedNats, bound_worker: None) -> None:
    most, answered = on_bus(nats_server.url, burst)
    assert answered == 6 * 2 * SLOTS
    assert 1 <= most <= SLOTS, f"{most} requests ran at once on a worker of {SLOTS} slots"
