"""Loads on loader threads: side by side, never holding up decoding, called off when nobody waits any more.

One worker process whose loads of the ``held-*`` models are held for a minute
(``--load-delay held-a=60,...``: the wait ends at once when the load is called
off), and whose ``quick`` model is loaded at start without delay. Every test
sees a held load begin in the worker's log ("holding the load of ..."), which
the loader thread writes as the load starts: a load queued behind another
would not write it until that one had finished, a minute later.

Then workers run in the test's own process (`WorkerService`, the real engine
and loader), for what needs a loader thread that cannot be called off, or a
memory budget and a host tier two models fill.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from cortex.broker.bus import Bus
from cortex.broker.decisions import change_placement, read_placement
from cortex.broker.server import EmbeddedNats
from cortex.protocol import GenerateRequest, Message, Pin, WorkerAdvert, codec, names
from cortex.protocol.placement import add_worker, remove_worker
from cortex.worker.catalogue import ModelSpec
from cortex.worker.device import pick_device
from cortex.worker.engine import Engine
from cortex.worker.load_watch import QUIET_S, WATCH_S
from cortex.worker.loader import load_model
from cortex.worker.service import WorkerService
from tests.conftest import Gateway, get_json, on_bus, start_worker, stop_process, wait_for, write_catalogue

WORKER = "loads-w"
HELD = ["held-a", "held-b", "held-c", "held-d", "held-e", "held-f", "held-p"]
MiB = 2**20


@pytest.fixture(scope="module")
def loads_log(
    nats_server: EmbeddedNats, gateway: Gateway, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory,
    logs_dir: Path,
) -> Iterator[Path]:  # fmt: skip
    catalogue = write_catalogue(tmp_path_factory.mktemp("loads") / "models.toml", tiny_model_dir, ["quick", *HELD],
                                memory="10MiB")  # fmt: skip
    log = logs_dir / "loads.log"
    delays = ",".join(f"{m}=60" for m in HELD)
    proc = start_worker(nats_server.url, catalogue, log, "--device", "cpu", "--slots", "4", "--worker-id", WORKER,
                        "--memory-budget", "1GiB", "--model", "quick", "--load-delay", delays)  # fmt: skip
    wait_for(lambda: "quick" in ready_on(gateway), timeout=60, what="quick ready", proc=proc)
    yield log
    stop_process(proc)
    # Fetches cut short when the worker stopped ended quietly, before its event loop did.
    assert "Traceback" not in log.read_text()


def ready_on(gateway: Gateway) -> set[str]:
    data = get_json(f"{gateway.base_url}/models")
    return {m["id"] for m in data["data"] if WORKER in m.get("loaded_on", [])}  # type: ignore[index]


def advert(nats_server: EmbeddedNats) -> WorkerAdvert:
    raw = on_bus(nats_server.url, Bus.read_fleet)
    return codec.decode_advert(raw[names.worker_key(WORKER)])


def states(nats_server: EmbeddedNats) -> dict[str, str]:
    return {s.id: s.state for s in advert(nats_server).models}


def place(nats_server: EmbeddedNats, model: str, worker: str = WORKER) -> None:
    on_bus(nats_server.url, partial(placed, model=model, worker=worker))


def unplace(nats_server: EmbeddedNats, model: str, worker: str = WORKER) -> None:
    on_bus(nats_server.url, partial(unplaced, model=model, worker=worker))


async def placed(bus: Bus, model: str, worker: str) -> None:
    await change_placement(bus, model, partial(add_worker, model=model, worker=worker, reason="test"), by="test")


async def unplaced(bus: Bus, model: str, worker: str) -> None:
    await change_placement(bus, model, partial(remove_worker, worker=worker, reason="test done"), by="test")


def holding(log: Path, model: str) -> bool:
    return f"holding the load of {model} " in log.read_text()


def gone(nats_server: EmbeddedNats, model: str) -> bool:
    """The worker holds nothing of `model`, and nothing is reserved for a load."""
    now = advert(nats_server)
    return now.state_of(model) is None and now.memory_reserved == 0


def test_two_models_load_at_the_same_time(nats_server: EmbeddedNats, loads_log: Path) -> None:
    place(nats_server, "held-a")
    place(nats_server, "held-b")
    # Both loads have begun on loader threads (neither can end for a minute), and the advert says so.
    wait_for(lambda: holding(loads_log, "held-a") and holding(loads_log, "held-b"), timeout=20, what="two held loads")
    wait_for(lambda: {"held-a": "loading", "held-b": "loading"}.items() <= states(nats_server).items(), timeout=10,
             what="both loading in the advert")  # fmt: skip
    assert advert(nats_server).memory_reserved == 20 * MiB
    unplace(nats_server, "held-a")
    unplace(nats_server, "held-b")  # an unload calls a held load off at once
    wait_for(lambda: gone(nats_server, "held-a") and gone(nats_server, "held-b"), timeout=10, what="loads given up")


def test_a_worker_decodes_while_another_model_loads(
    nats_server: EmbeddedNats, gateway: Gateway, loads_log: Path
) -> None:
    place(nats_server, "held-c")
    wait_for(lambda: holding(loads_log, "held-c"), timeout=20, what="held load")
    client = openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0, timeout=30)
    stream = client.chat.completions.create(model="quick", messages=[{"role": "user", "content": "Hello"}],
                                            max_tokens=64, temperature=0, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 64
    assert states(nats_server).get("held-c") == "loading"  # the whole answer came while it loaded
    unplace(nats_server, "held-c")
    wait_for(lambda: gone(nats_server, "held-c"), timeout=10, what="held-c given up")


def test_a_load_whose_only_request_was_cancelled_is_called_off(
    nats_server: EmbeddedNats, gateway: Gateway, loads_log: Path
) -> None:
    body = {"model": "held-d", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{gateway.base_url}/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200  # headers sent while the model loads: the request waits in its queue
        wait_for(lambda: "1 request(s) wait for the load of held-d" in loads_log.read_text(), timeout=20,
                 what="the load's watch seeing the request wait")  # fmt: skip
    # The client has gone: the gateway cancels, the worker calls the load off and cleans up after it.
    wait_for(lambda: gone(nats_server, "held-d"), timeout=15, what="the load called off")
    assert "called off the load of held-d: the 1 request(s) waiting for it were cancelled or timed out" in (
        loads_log.read_text()
    )
    placement, _ = on_bus(nats_server.url, lambda bus: read_placement(bus, "held-d"))
    assert placement is not None and WORKER not in placement.workers and "called off" in placement.reason


def publish(nats_server: EmbeddedNats, model: str, deadline: float = 0.0) -> None:
    request = GenerateRequest(request_id=uuid.uuid4().hex, model=model, deadline=deadline,
                              messages=[Message(role="user", content="Hi")], reply_subject="test.nobody")  # fmt: skip
    payload = codec.encode(request)
    on_bus(nats_server.url, lambda bus: bus.publish_request(model, payload, msg_id=request.request_id))


def test_a_load_whose_only_request_timed_out_is_called_off(nats_server: EmbeddedNats, loads_log: Path) -> None:
    place(nats_server, "held-e")
    wait_for(lambda: holding(loads_log, "held-e"), timeout=20, what="held load")
    publish(nats_server, "held-e", deadline=time.time() + 1.0)  # it passes its deadline while the load runs
    wait_for(lambda: gone(nats_server, "held-e"), timeout=15, what="the load called off")
    assert "called off the load of held-e: the 1 request(s)" in loads_log.read_text()


def test_a_replica_whose_queue_another_worker_drained_loads_on(nats_server: EmbeddedNats, loads_log: Path) -> None:
    place(nats_server, "held-f")  # as the gateway adds a replica for load, the model served elsewhere
    wait_for(lambda: holding(loads_log, "held-f"), timeout=20, what="held load")
    publish(nats_server, "held-f")
    wait_for(lambda: "1 request(s) wait for the load of held-f" in loads_log.read_text(), timeout=10,
             what="the load's watch seeing the request wait")  # fmt: skip

    async def drain(bus: Bus) -> int:  # as the model's other worker does: the request taken, answered, acked
        queue = await bus.pull_queue("held-f", "loads-other-w")
        try:
            deliveries = await queue.fetch(10, timeout=5.0)
            for delivery in deliveries:
                await delivery.ack()
            return len(deliveries)
        finally:
            await queue.close()

    assert on_bus(nats_server.url, drain) == 1
    # Nothing to wait for: the check is that nothing happens where the old rule (a queue empty for QUIET_S)
    # called the load off.
    time.sleep(QUIET_S + 3 * WATCH_S)
    assert states(nats_server).get("held-f") == "loading"
    assert "called off the load of held-f" not in loads_log.read_text()
    unplace(nats_server, "held-f")
    wait_for(lambda: gone(nats_server, "held-f"), timeout=10, what="held-f given up")


def test_a_pinned_models_held_load_is_not_called_off(nats_server: EmbeddedNats, loads_log: Path) -> None:
    pin = codec.encode(Pin(model="held-p", worker=WORKER))
    on_bus(nats_server.url, lambda bus: bus.put_decision(names.pin_key("held-p"), pin))
    try:
        wait_for(lambda: holding(loads_log, "held-p"), timeout=20, what="the pinned model's held load")
        publish(nats_server, "held-p", deadline=time.time() + 0.5)
        wait_for(lambda: "nobody waits for held-p any more, but it is pinned" in loads_log.read_text(), timeout=15,
                 what="the watch deciding")  # fmt: skip
        assert states(nats_server).get("held-p") == "loading"
    finally:
        on_bus(nats_server.url, lambda bus: bus.delete_decision(names.pin_key("held-p")))
        unplace(nats_server, "held-p")
    wait_for(lambda: gone(nats_server, "held-p"), timeout=10, what="held-p given up")


# -- workers in the test's process -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def worker_here(
    url: str, worker_id: str, catalogue: list[ModelSpec], loader: Callable[[ModelSpec, threading.Event], Any],
    **options: Any,
) -> AsyncIterator[Bus]:  # fmt: skip
    """A `WorkerService` on the CPU with the real engine, running until the block ends; a bus for the test."""
    bus = await Bus.open(url, name=f"test {worker_id}")
    engine = Engine(worker_id=worker_id)
    engine.start()
    service = WorkerService(bus=bus, engine=engine, device=pick_device([0], "cpu"), catalogue=catalogue, serve=[],
                            worker_id=worker_id, slots=1, loader=loader, **options)  # fmt: skip
    run = asyncio.create_task(service.run(), name=f"worker {worker_id}")
    try:
        yield bus
    finally:
        service.stop()
        await run
        engine.stop()
        await bus.close()


async def advert_of(bus: Bus, worker_id: str) -> WorkerAdvert | None:
    raw = (await bus.read_fleet()).get(names.worker_key(worker_id))
    return codec.decode_advert(raw) if raw else None


async def until(check: Callable[[], Any], *, timeout: float, what: str) -> Any:
    """Poll the coroutine function `check` until it returns something true; that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := await check():
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def test_an_unload_keeps_the_memory_of_a_load_it_cannot_stop_until_its_thread_ends(
    nats_server: EmbeddedNats, tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A loader thread in a phase the abort cannot end (weights streaming onto GPUs: here, a wait that ignores it)
    keeps its slot, unloading, its memory counted, until it ends; then what it built is freed."""
    caplog.set_level(logging.INFO, logger="cortex.worker")
    worker_id, model = f"stuck-w-{uuid.uuid4().hex[:6]}", f"stuck-{uuid.uuid4().hex[:6]}"
    building, release = threading.Event(), threading.Event()

    def loader(spec: ModelSpec, _abort: threading.Event) -> Any:
        building.set()
        release.wait(30)
        return load_model(spec, pick_device([0], "cpu").device)

    async def scenario() -> None:
        spec = ModelSpec(id=model, path=str(tiny_model_dir), dtype="float32", memory="10MiB")
        async with worker_here(nats_server.url, worker_id, [spec], loader, memory_budget=1024 * MiB) as bus:
            await placed(bus, model, worker_id)
            assert await asyncio.to_thread(building.wait, 20)
            await unplaced(bus, model, worker_id)

            async def waiting_for_the_thread() -> bool:
                return f"the load of {model} cannot stop" in caplog.text

            await until(waiting_for_the_thread, timeout=10, what="the unload waiting for the loader thread")
            advert = await advert_of(bus, worker_id)
            state = advert.state_of(model) if advert else None
            assert state is not None and state.state == "unloading" and advert and advert.memory_used == 10 * MiB
            release.set()

            async def freed() -> bool:
                now = await advert_of(bus, worker_id)
                return now is not None and now.state_of(model) is None and now.memory_used == 0

            await until(freed, timeout=15, what="the slot gone once the thread ended")
            assert f"the load of {model} ended after it was called off" in caplog.text

    try:
        asyncio.run(scenario())
    finally:
        release.set()


def test_two_loads_that_each_evict_at_once_fit_the_budget_and_the_host_tier(
    nats_server: EmbeddedNats, tiny_model_dir: Path
) -> None:
    """Four tiny models, room for two on the device and one in the host tier: the two models placed last evict
    the first two side by side (their parks may run at once); both end ready within the budget, and the tier's
    size is never exceeded."""
    worker_id = f"evict-w-{uuid.uuid4().hex[:6]}"
    first, last = [f"ev-{n}-{uuid.uuid4().hex[:6]}" for n in "ab"], [f"ev-{n}-{uuid.uuid4().hex[:6]}" for n in "cd"]
    catalogue = [ModelSpec(id=m, path=str(tiny_model_dir), dtype="float32", memory="10MiB") for m in first + last]
    one_model = (tiny_model_dir / "model.safetensors").stat().st_size  # float32 as saved: its weights' bytes
    host_cache = one_model * 3 // 2

    def loader(spec: ModelSpec, _abort: threading.Event) -> Any:
        return load_model(spec, pick_device([0], "cpu").device)

    async def ready(bus: Bus, models: list[str]) -> WorkerAdvert | None:
        advert = await advert_of(bus, worker_id)
        if advert is None:
            return None
        assert advert.host_cache_used <= host_cache  # at every look
        states = {s.id: s.state for s in advert.models}
        return advert if all(states.get(m) == "ready" for m in models) and len(states) == len(models) else None

    async def scenario() -> None:
        async with worker_here(nats_server.url, worker_id, catalogue, loader, memory_budget=20 * MiB,
                               host_cache=host_cache) as bus:  # fmt: skip
            await asyncio.gather(*(placed(bus, m, worker_id) for m in first))
            await until(lambda: ready(bus, first), timeout=30, what="the first two ready")
            await asyncio.gather(*(placed(bus, m, worker_id) for m in last))
            advert = await until(lambda: ready(bus, last), timeout=30, what="the last two ready, the first two gone")
            # A reservation shows as it is made, its evictions still running: the sum is the budget once they end.
            assert advert.memory_used + advert.memory_reserved == 20 * MiB
            assert len(advert.host_cached) == 1 and advert.host_cached[0] in first  # the tier holds one of them

    asyncio.run(scenario())
