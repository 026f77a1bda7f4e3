"""The requests a worker holds: pulling them per model, handing them to the engine, settling their messages.

A worker takes from a model's durable consumer only as many requests as it has
free slots, so warm load balancing needs no router: idle workers pull, busy
ones don't. While a request runs, ``in_progress`` keeps JetStream from giving
it to another worker; once it is done its message is settled by one of the
named `Outcome`s, which are the worker's whole ack policy.

Which models have a pull loop is not decided here: `cortex.worker.residency`
runs `Requests.pull_loop` for each model it has loaded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal, Protocol

from cortex.broker.bus import Delivery, PullQueue
from cortex.broker.errors import BrokerError
from cortex.protocol import GenerateRequest, codec
from cortex.worker.engine import Engine
from cortex.worker.sequence import Emit
from cortex.worker.synthetic import SyntheticEngine

log = logging.getLogger("cortex.worker")

FETCH_TIMEOUT_S = 1.0
PROGRESS_INTERVAL_S = 10.0
NAK_DELAY_S = 1.0
"""A nak'd request waits this long before JetStream offers it again (here or to another worker)."""
CANCELLED_KEEP_S = 600.0
CANCELLED_MAX = 10_000

Verb = Literal["ack", "nak", "term"]


class Outcome(Enum):
    """How a request's message is settled, and why.

    ``ack``: consumed, never delivered again; ``nak``: redelivered (after
    `NAK_DELAY_S`), here or elsewhere; ``term``: poison, never delivered again.
    """

    DONE = ("ack", "its last chunk is published")
    SEEN = ("ack", "it is already running here, or its client has gone")
    CANCELLED = ("ack", "its client has gone: the request is consumed, not redelivered")
    UNDELIVERED = ("nak", "its final chunk was not published: the gateway never saw the end")
    STOPPING = ("nak", "the worker stopped before it finished: another worker takes it up")
    POISON = ("term", "it does not decode")
    NO_REPLY = ("term", "it has no reply subject")
    BROKEN = ("term", "publishing one of its chunks failed unexpectedly")

    def __init__(self, verb: Verb, reason: str) -> None:
        self.verb: Verb = verb
        self.reason = reason


async def settle(delivery: Delivery, outcome: Outcome) -> None:
    """Apply `outcome` to a request's message: the one place the ack verbs are called."""
    if outcome.verb == "ack":
        await delivery.ack()
    elif outcome.verb == "nak":
        await delivery.nak(delay=NAK_DELAY_S)
    else:
        await delivery.term()


class Served(Protocol):
    """The model a pull loop takes requests for, as the request side sees it (a residency `ModelSlot`)."""

    leaving: asyncio.Event
    """Set when the model is to unload: its pull loop stops taking requests."""
    in_flight: int

    @property
    def model(self) -> str: ...


Settled = Callable[[str], None]
"""Told the model of each request of a pull loop once its message is settled (the model's owner counts them)."""


@dataclass
class InFlight:
    delivery: Delivery
    request: GenerateRequest
    model: str
    settled: Settled


@dataclass
class Requests:
    engine: Engine | SyntheticEngine
    slots: int
    emit: Emit
    """Where the engine sends each request's chunks (the outbox, read by the chunk publisher)."""
    stopping: asyncio.Event
    draining: asyncio.Event
    """While set, no pull loop takes requests."""
    slot_freed: asyncio.Event
    """Set whenever a slot may have come free or pull loops should look again (drain, unload, stop)."""
    _in_flight: dict[str, InFlight] = field(default_factory=dict)
    _reserved: int = 0
    _pulling: int = 0
    _cancelled: dict[str, float] = field(default_factory=dict)
    _background: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def free_slots(self) -> int:
        return self.slots - len(self._in_flight) - self._reserved

    def busy(self) -> int:
        """Requests running now (for the advert's free slots)."""
        return len(self._in_flight)

    def reply_subject(self, request_id: str) -> str | None:
        """Where the request's chunks go; None once it is no longer held here (cancelled meanwhile)."""
        flight = self._in_flight.get(request_id)
        return flight.request.reply_subject if flight is not None else None

    async def pull_loop(self, slot: Served, pull: PullQueue, settled: Settled) -> None:
        """Take requests for `slot` while it stays and the worker runs; `settled` hears of each one settled."""
        self._pulling += 1
        try:
            while not self.stopping.is_set() and not slot.leaving.is_set():
                free = self.free_slots
                if self.draining.is_set():
                    self.slot_freed.clear()
                    await self.slot_freed.wait()
                    continue
                if free <= 0:
                    self.slot_freed.clear()
                    await self.slot_freed.wait()
                    continue
                # With several models, each pull takes a fair share of the free
                # slots so that an idle model's long poll cannot starve the others.
                share = -(-free // max(1, self._pulling))
                self._reserved += share
                try:
                    deliveries = await pull.fetch(share, timeout=FETCH_TIMEOUT_S)
                except BrokerError as exc:
                    log.warning("fetch for %s failed: %s", slot.model, exc)
                    deliveries = []
                    await asyncio.sleep(0.5)
                finally:
                    self._reserved -= share
                    self.slot_freed.set()
                for delivery in deliveries:
                    await self._accept(slot, delivery, settled)
        finally:
            self._pulling -= 1

    async def _accept(self, slot: Served, delivery: Delivery, settled: Settled) -> None:
        try:
            request = codec.decode_request(delivery.data)
        except codec.DecodeError as exc:
            log.error("poison request on %s: %s", slot.model, exc)
            await settle(delivery, Outcome.POISON)
            return
        if request.request_id in self._in_flight or request.request_id in self._cancelled:
            await settle(delivery, Outcome.SEEN)
            return
        if not request.reply_subject:
            log.error("request %s has no reply subject; dropped", request.request_id)
            await settle(delivery, Outcome.NO_REPLY)
            return
        self._in_flight[request.request_id] = InFlight(
            delivery=delivery, request=request, model=slot.model, settled=settled
        )
        slot.in_flight += 1
        self.engine.submit(request, self.emit)

    async def release(self, request_id: str, outcome: Outcome) -> None:
        """Forget a request and settle its message."""
        flight = self._in_flight.pop(request_id, None)
        if flight is None:
            return
        flight.settled(flight.model)
        await settle(flight.delivery, outcome)
        self.slot_freed.set()

    def on_cancel(self, _subject: str, payload: bytes) -> None:
        """The handler of the cancel subject: a client has gone, or a gateway gave up an attempt (failover).

        Each failover attempt is a request of its own id (``<request-id>-<n>``), so
        cancelling, remembering and de-duplicating one attempt never touches another.
        """
        request_id = payload.decode("utf-8", "replace")
        self._remember_cancelled(request_id)
        if request_id in self._in_flight:
            self.engine.cancel(request_id)
            task = asyncio.get_running_loop().create_task(self.release(request_id, Outcome.CANCELLED))
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

    async def progress_loop(self) -> None:
        """Tell JetStream every `PROGRESS_INTERVAL_S` that each running request is still being worked on."""
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            for flight in list(self._in_flight.values()):
                await flight.delivery.in_progress()

    async def wait_in_flight(self, timeout: float) -> None:
        """Return when nothing is running, or after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self._in_flight and time.monotonic() < deadline:
            self.slot_freed.clear()
            try:
                await asyncio.wait_for(self.slot_freed.wait(), timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                break

    def cancel_all(self) -> None:
        """Stop the engine working on every request still held (their messages are settled later)."""
        for request_id in list(self._in_flight):
            self.engine.cancel(request_id)

    async def release_all(self, outcome: Outcome) -> None:
        for request_id in list(self._in_flight):
            await self.release(request_id, outcome)
