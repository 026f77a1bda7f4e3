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
from dataclasses import dataclass, field

from cortex.broker.bus import Bus, Delivery, PullQueue
from cortex.broker.errors import BrokerError
from cortex.protocol import Chunk, GenerateRequest, ModelState, WorkerAdvert, codec, names
from cortex.protocol import messages as m
from cortex.worker.catalogue import ModelSpec
from cortex.worker.device import DeviceInfo
from cortex.worker.engine import Engine
from cortex.worker.loader import LoadedModel, load_model

log = logging.getLogger("cortex.worker")

FETCH_TIMEOUT_S = 1.0
PROGRESS_INTERVAL_S = 10.0
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


@dataclass
class WorkerService:
    bus: Bus
    engine: Engine
    device: DeviceInfo
    catalogue: list[ModelSpec]
    serve: list[ModelSpec]
    worker_id: str
    slots: int
    _models: dict[str, ModelSlot] = field(default_factory=dict)
    _in_flight: dict[str, InFlight] = field(default_factory=dict)
    _reserved: int = 0
    _outbox: asyncio.Queue[Chunk] = field(default_factory=asyncio.Queue)
    _slot_freed: asyncio.Event = field(default_factory=asyncio.Event)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _started_at: float = field(default_factory=time.time)
    _background: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def free_slots(self) -> int:
        return self.slots - len(self._in_flight) - self._reserved

    async def run(self) -> None:
        """Serve until `stop` is called; then finish what is in flight and withdraw."""
        loop = asyncio.get_running_loop()
        self._models = {s.id: ModelSlot(spec=s) for s in self.serve}
        await self._advertise()
        cancel_sub = await self.bus.subscribe(names.cancel_subject(), self._on_cancel)
        tasks = [
            asyncio.create_task(self._publisher(), name="chunk-publisher"),
            asyncio.create_task(self._advert_loop(), name="advert"),
            asyncio.create_task(self._progress_loop(), name="in-progress"),
        ]
        tasks += [
            asyncio.create_task(self._serve_model(slot, loop), name=f"serve-{slot.spec.id}")
            for slot in self._models.values()
        ]
        await self._stopping.wait()
        await cancel_sub.unsubscribe()
        await self._wait_in_flight(timeout=30.0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._drain_outbox()
        for flight in list(self._in_flight.values()):
            await flight.delivery.nak()  # another worker takes it up
        try:
            await self.bus.delete_advert(names.worker_key(self.worker_id))
        except BrokerError as exc:
            log.warning("could not withdraw advert: %s", exc)

    def stop(self) -> None:
        self._stopping.set()

    # -- models ---------------------------------------------------------------

    async def _serve_model(self, slot: ModelSlot, loop: asyncio.AbstractEventLoop) -> None:
        try:
            loaded: LoadedModel = await asyncio.wrap_future(
                self.engine.call(lambda: load_model(slot.spec, self.device.device))
            )
        except Exception as exc:
            log.exception("loading %s failed", slot.spec.id)
            slot.state, slot.error = m.MODEL_FAILED, f"{type(exc).__name__}: {exc}"
            await self._advertise()
            return
        self.engine.add_model(loaded)
        pull = await self._open_pull_queue(slot)
        slot.state, slot.context_length = m.MODEL_READY, loaded.context_length
        await self._advertise()
        try:
            await self._pull_loop(slot, pull, loop)
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

    async def _pull_loop(self, slot: ModelSlot, pull: PullQueue, loop: asyncio.AbstractEventLoop) -> None:
        while not self._stopping.is_set():
            free = self.free_slots
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            self._reserved += free
            try:
                deliveries = await pull.fetch(free, timeout=FETCH_TIMEOUT_S)
            except BrokerError as exc:
                log.warning("fetch for %s failed: %s", slot.spec.id, exc)
                deliveries = []
                await asyncio.sleep(0.5)
            finally:
                self._reserved -= free
            for delivery in deliveries:
                await self._accept(slot, delivery, loop)

    async def _accept(self, slot: ModelSlot, delivery: Delivery, loop: asyncio.AbstractEventLoop) -> None:
        try:
            request = codec.decode_request(delivery.data)
        except codec.DecodeError as exc:
            log.error("poison request on %s: %s", slot.spec.id, exc)
            await delivery.term()
            return
        if request.request_id in self._in_flight:
            await delivery.ack()  # a duplicate delivery of something already running here
            return
        self._in_flight[request.request_id] = InFlight(delivery=delivery, request=request, model=slot.spec.id)
        slot.in_flight += 1
        outbox = self._outbox

        def emit(chunk: Chunk) -> None:
            loop.call_soon_threadsafe(outbox.put_nowait, chunk)

        self.engine.submit(request, emit)

    # -- chunks -----------------------------------------------------------------

    async def _publisher(self) -> None:
        while True:
            chunk = await self._outbox.get()
            await self._publish(chunk)

    async def _drain_outbox(self) -> None:
        while not self._outbox.empty():
            await self._publish(self._outbox.get_nowait())

    async def _publish(self, chunk: Chunk) -> None:
        flight = self._in_flight.get(chunk.request_id)
        if flight is None:
            return  # cancelled meanwhile
        try:
            await self.bus.publish(flight.request.reply_subject, codec.encode(chunk))
        except BrokerError as exc:
            log.warning("chunk for %s not published: %s", chunk.request_id, exc)
        if chunk.final:
            await self._release(chunk.request_id, ack=True)

    async def _release(self, request_id: str, *, ack: bool) -> None:
        flight = self._in_flight.pop(request_id, None)
        if flight is None:
            return
        slot = self._models.get(flight.model)
        if slot is not None:
            slot.in_flight -= 1
        if ack:
            await flight.delivery.ack()
        self._slot_freed.set()

    def _on_cancel(self, _subject: str, payload: bytes) -> None:
        request_id = payload.decode("utf-8", "replace")
        if request_id in self._in_flight:
            self.engine.cancel(request_id)
            # The client is gone: the request is consumed, not redelivered.
            task = asyncio.get_running_loop().create_task(self._release(request_id, ack=True))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

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
                    id=s.spec.id, state=s.state, in_flight=s.in_flight, context_length=s.context_length, error=s.error
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
