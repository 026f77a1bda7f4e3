"""The worker's asyncio side: pull requests, hand them to the engine, relay chunks, advertise.

A worker takes from a model's durable consumer only as many requests as it has
free slots, so warm load balancing needs no router: idle workers pull, busy
ones don't. Each request is acked once its last chunk is published; while it
runs, ``in_progress`` keeps JetStream from giving it to another worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cortex.broker.bus import Bus, Delivery, PullQueue
from cortex.broker.errors import BrokerError
from cortex.protocol import Chunk, GenerateRequest, ModelState, WorkerAdvert, codec, names
from cortex.protocol import messages as m
from cortex.worker.catalogue import ModelSpec
from cortex.worker.device import DeviceInfo
from cortex.worker.engine import Engine
from cortex.worker.outbox import Outbox
from cortex.worker.synthetic import SyntheticEngine

log = logging.getLogger("cortex.worker")

FETCH_TIMEOUT_S = 1.0
PROGRESS_INTERVAL_S = 10.0
DRAIN_TIMEOUT_S = 30.0
"""On shutdown, how long in-flight requests may run before they go back to the queue."""
CANCELLED_KEEP_S = 600.0
CANCELLED_MAX = 10_000
VERSION = "0.1.0"


@dataclass
class InFlight:
    delivery: Delivery
    request: GenerateRequest
    model: str


@dataclass
class ModelSlot:
    spec: ModelSpec
    state: str = m.MODEL_LOADING
    error: str = ""
    context_length: int = 0
    in_flight: int = 0
    reasoning: bool = False


@dataclass
class WorkerService:
    bus: Bus
    engine: Engine | SyntheticEngine
    device: DeviceInfo
    catalogue: list[ModelSpec]
    serve: list[ModelSpec]
    worker_id: str
    slots: int
    loader: Callable[[ModelSpec], Any]
    """Loads a catalogue entry on the engine thread (the transformers loader, or the synthetic one)."""
    _models: dict[str, ModelSlot] = field(default_factory=dict)
    _in_flight: dict[str, InFlight] = field(default_factory=dict)
    _reserved: int = 0
    _outbox: Outbox | None = None
    _slot_freed: asyncio.Event = field(default_factory=asyncio.Event)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _started_at: float = field(default_factory=time.time)
    _background: set[asyncio.Task[None]] = field(default_factory=set)
    _cancelled: dict[str, float] = field(default_factory=dict)
    _pulling: int = 0

    @property
    def free_slots(self) -> int:
        return self.slots - len(self._in_flight) - self._reserved

    async def run(self) -> None:
        """Serve until `stop` is called; then finish what is in flight and withdraw."""
        self._outbox = Outbox(asyncio.get_running_loop())
        self._models = {s.id: ModelSlot(spec=s) for s in self.serve}
        await self._advertise()
        cancel_sub = await self.bus.subscribe(names.cancel_subject(), self._on_cancel)
        tasks = [
            asyncio.create_task(self._publisher(), name="chunk-publisher"),
            asyncio.create_task(self._advert_loop(), name="advert"),
            asyncio.create_task(self._progress_loop(), name="in-progress"),
        ]
        tasks += [
            asyncio.create_task(self._serve_model(slot), name=f"serve-{slot.spec.id}") for slot in self._models.values()
        ]
        serving = tasks[3:]
        await self._stopping.wait()
        # Pull loops notice the stop within one fetch; a model still loading is abandoned.
        _, loading = await asyncio.wait(serving, timeout=FETCH_TIMEOUT_S + 5.0)
        for task in loading:
            task.cancel()
        await self._wait_in_flight(timeout=DRAIN_TIMEOUT_S)
        for request_id in list(self._in_flight):
            self.engine.cancel(request_id)
        await cancel_sub.unsubscribe()
        await self._drain_outbox()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for request_id in list(self._in_flight):
            await self._release(request_id, outcome="nak")  # another worker takes it up
        try:
            await self.bus.delete_advert(names.worker_key(self.worker_id))
        except BrokerError as exc:
            log.warning("could not withdraw advert: %s", exc)

    def stop(self) -> None:
        self._stopping.set()
        self._slot_freed.set()  # wake pull loops waiting for a slot

    # -- models ---------------------------------------------------------------

    async def _serve_model(self, slot: ModelSlot) -> None:
        try:
            loaded = await asyncio.wrap_future(self.engine.call(lambda: self.loader(slot.spec)))
        except Exception as exc:
            log.exception("loading %s failed", slot.spec.id)
            slot.state, slot.error = m.MODEL_FAILED, f"{type(exc).__name__}: {exc}"
            await self._advertise()
            return
        self.engine.add_model(loaded)
        pull = await self._open_pull_queue(slot)
        slot.state, slot.context_length = m.MODEL_READY, loaded.context_length
        slot.reasoning = getattr(loaded, "reasoning", None) is not None  # the synthetic model has no tags
        await self._advertise()
        try:
            await self._pull_loop(slot, pull)
        finally:
            await pull.close()

    async def _open_pull_queue(self, slot: ModelSlot) -> PullQueue:
        """The model's consumer; retried while the broker is away (the worker is useless without it)."""
        while True:
            try:
                return await self.bus.pull_queue(slot.spec.id)
            except BrokerError as exc:
                log.warning("cannot bind the consumer of %s yet: %s", slot.spec.id, exc)
                await asyncio.sleep(1.0)

    async def _pull_loop(self, slot: ModelSlot, pull: PullQueue) -> None:
        self._pulling += 1
        try:
            while not self._stopping.is_set():
                free = self.free_slots
                if free <= 0:
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
                    continue
                # With several models, each pull takes a fair share of the free
                # slots so that an idle model's long poll cannot starve the others.
                share = -(-free // max(1, self._pulling))
                self._reserved += share
                try:
                    deliveries = await pull.fetch(share, timeout=FETCH_TIMEOUT_S)
                except BrokerError as exc:
                    log.warning("fetch for %s failed: %s", slot.spec.id, exc)
                    deliveries = []
                    await asyncio.sleep(0.5)
                finally:
                    self._reserved -= share
                    self._slot_freed.set()
                for delivery in deliveries:
                    await self._accept(slot, delivery)
        finally:
            self._pulling -= 1

    async def _accept(self, slot: ModelSlot, delivery: Delivery) -> None:
        try:
            request = codec.decode_request(delivery.data)
        except codec.DecodeError as exc:
            log.error("poison request on %s: %s", slot.spec.id, exc)
            await delivery.term()
            return
        if request.request_id in self._in_flight or request.request_id in self._cancelled:
            await delivery.ack()  # already running here, or its client has gone
            return
        if not request.reply_subject:
            log.error("request %s has no reply subject; dropped", request.request_id)
            await delivery.term()
            return
        self._in_flight[request.request_id] = InFlight(delivery=delivery, request=request, model=slot.spec.id)
        slot.in_flight += 1
        assert self._outbox is not None
        self.engine.submit(request, self._outbox.put)

    # -- chunks -----------------------------------------------------------------

    async def _publisher(self) -> None:
        assert self._outbox is not None
        while True:
            for chunk in await self._outbox.get_batch():
                await self._publish_safely(chunk)

    async def _drain_outbox(self) -> None:
        if self._outbox is not None:
            for chunk in self._outbox.take_all():
                await self._publish_safely(chunk)

    async def _publish_safely(self, chunk: Chunk) -> None:
        try:
            await self._publish(chunk)
        except Exception:
            # One bad request must not stop the chunks of all the others.
            log.exception("publishing a chunk of %s failed", chunk.request_id)
            await self._release(chunk.request_id, outcome="term")

    async def _publish(self, chunk: Chunk) -> None:
        flight = self._in_flight.get(chunk.request_id)
        if flight is None:
            return  # cancelled meanwhile
        try:
            await self.bus.publish(flight.request.reply_subject, codec.encode(chunk))
        except BrokerError as exc:
            log.warning("chunk for %s not published: %s", chunk.request_id, exc)
            if chunk.final:
                # The gateway never saw the end: give the request back rather than
                # let the client wait for its deadline.
                await self._release(chunk.request_id, outcome="nak")
            return
        if chunk.final:
            await self._release(chunk.request_id, outcome="ack")

    async def _release(self, request_id: str, *, outcome: str) -> None:
        """Forget a request and settle its message: ``ack``, ``nak`` or ``term``."""
        flight = self._in_flight.pop(request_id, None)
        if flight is None:
            return
        slot = self._models.get(flight.model)
        if slot is not None:
            slot.in_flight -= 1
        if outcome == "ack":
            await flight.delivery.ack()
        elif outcome == "nak":
            await flight.delivery.nak(delay=1.0)
        else:
            await flight.delivery.term()
        self._slot_freed.set()

    def _on_cancel(self, _subject: str, payload: bytes) -> None:
        request_id = payload.decode("utf-8", "replace")
        self._remember_cancelled(request_id)
        if request_id in self._in_flight:
            self.engine.cancel(request_id)
            # The client is gone: the request is consumed, not redelivered.
            task = asyncio.get_running_loop().create_task(self._release(request_id, outcome="ack"))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _remember_cancelled(self, request_id: str) -> None:
        """Keep cancelled ids a while: the cancel may arrive before the request does."""
        now = time.monotonic()
        self._cancelled[request_id] = now
        if len(self._cancelled) > CANCELLED_MAX:
            cutoff = now - CANCELLED_KEEP_S
            self._cancelled = {rid: t for rid, t in self._cancelled.items() if t > cutoff}
            while len(self._cancelled) > CANCELLED_MAX:
                self._cancelled.pop(next(iter(self._cancelled)))

    async def _wait_in_flight(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._in_flight and time.monotonic() < deadline:
            self._slot_freed.clear()
            try:
                await asyncio.wait_for(self._slot_freed.wait(), timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                break

    async def _progress_loop(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            for flight in list(self._in_flight.values()):
                await flight.delivery.in_progress()

    # -- adverts ----------------------------------------------------------------

    def advert(self) -> WorkerAdvert:
        total, free = self.device.memory()
        return WorkerAdvert(
            worker_id=self.worker_id,
            host=socket.gethostname(),
            device=self.device.label,
            device_name=self.device.name,
            memory_total=total,
            memory_free=free,
            models=[
                ModelState(
                    id=s.spec.id,
                    state=s.state,
                    in_flight=s.in_flight,
                    context_length=s.context_length,
                    error=s.error,
                    reasoning=s.reasoning,
                )
                for s in self._models.values()
            ],
            catalogue=[spec.card() for spec in self.catalogue],
            slots_total=self.slots,
            slots_free=max(0, self.slots - len(self._in_flight)),
            version=VERSION,
            started_at=self._started_at,
            updated_at=time.time(),
            pid=os.getpid(),
        )

    async def _advertise(self) -> None:
        try:
            await self.bus.put_advert(names.worker_key(self.worker_id), codec.encode(self.advert()))
        except BrokerError as exc:
            log.warning("advert not written: %s", exc)

    async def _advert_loop(self) -> None:
        while True:
            await asyncio.sleep(names.ADVERT_INTERVAL_S)
            await self._advertise()
