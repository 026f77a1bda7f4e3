"""The requests a worker holds: pulling them per model, handing them to the engine, settling their messages.

A worker asks a model's durable consumer only for as many requests as it has
free slots, so warm load balancing needs no router: idle workers pull, busy
ones don't. It never runs more than its slots: a pull request stays open after
its fetch returns, and what it brings once the slots have filled (affine
requests took them meanwhile), or while the worker drains, is nak'd at once
(`Outcome.NO_ROOM`), for another worker. While a request runs, ``in_progress`` keeps JetStream from giving
it to another worker; once it is done its message is settled by one of the
named `Outcome`s, which are the worker's whole ack policy.

Which models have a pull loop is not decided here: `cortex.worker.residency`
runs `Requests.pull_loop` for each model it has loaded.

Conversation affinity: beside the shared fetch, each pull loop takes the
requests a gateway sent to this worker first (`cortex.worker.affine`). Every
request this worker starts is told to its gateway at once (`Taken`, `tell`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal, Protocol

import msgspec

from cortex.broker.bus import Bus
from cortex.broker.errors import BrokerError
from cortex.broker.pull import Delivery, PullQueue
from cortex.protocol import Chunk, GenerateRequest, codec, names
from cortex.protocol.messages import Taken
from cortex.worker.affine import AFFINITY_WINDOW_S as AFFINITY_WINDOW_S  # re-exported: main and service take it here
from cortex.worker.affine import AffinePull
from cortex.worker.conversations import Conversations
from cortex.worker.engine import Engine
from cortex.worker.pull_guard import LeavingPull
from cortex.worker.sequence import Emit
from cortex.worker.synthetic import SyntheticEngine

log = logging.getLogger("cortex.worker")

FETCH_TIMEOUT_S = 1.0
PROGRESS_INTERVAL_S = 10.0
NAK_DELAY_S = 1.0
"""A nak'd request waits this long before JetStream offers it again (here or to another worker)."""
CANCELLED_KEEP_S = 600.0
CANCELLED_MAX = 10_000
AFFINE_RECENT_S = 30.0
"""For this long after its last affine request, a worker polls the shared queue in shorter fetches
(`Requests._shared_poll_s`)."""

Verb = Literal["ack", "nak", "term"]


class Outcome(Enum):
    """How a request's message is settled, and why.

    ``ack``: consumed, never delivered again; ``nak``: redelivered (after
    `NAK_DELAY_S`), here or elsewhere; ``term``: poison, never delivered again.
    """

    DONE = ("ack", "its last chunk is published")
    SEEN = ("ack", "it is already running here, or its client has gone, or its gateway sent it on as another attempt")
    CANCELLED = ("ack", "its client has gone: the request is consumed, not redelivered")
    UNDELIVERED = ("nak", "its final chunk was not published: the gateway never saw the end")
    STOPPING = ("nak", "the worker stopped before it finished: another worker takes it up")
    NO_ROOM = (
        "nak",
        "a pull request of this worker made while it had free slots brought it after they filled, or while it "
        "drains: another worker takes it once this worker's open pull requests have ended (so none brings it back)",
    )
    RETURNED = (
        "nak",
        "this worker moved it to the shared queue for want of a slot, and a fetch of its own from "
        "before it filled up caught it: after the nak delay (longer than a fetch) another worker takes it",
    )
    POISON = ("term", "it does not decode")
    NO_REPLY = ("term", "it has no reply subject")
    BROKEN = ("term", "publishing one of its chunks failed unexpectedly")

    def __init__(self, verb: Verb, reason: str) -> None:
        self.verb: Verb = verb
        self.reason = reason


async def settle(delivery: Delivery, outcome: Outcome, *, delay: float = NAK_DELAY_S) -> None:
    """Apply `outcome` to a request's message (a nak redelivers it after `delay`): the one place the ack verbs are
    called."""
    if outcome.verb == "ack":
        await delivery.ack()
    elif outcome.verb == "nak":
        await delivery.nak(delay=delay)
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
    answered: bool = False
    """Its final chunk went out without an error (set from the engine thread): its prompt is in the prefix cache."""


@dataclass
class _Claim:
    """The free slots one model's shared pull loop holds for its pull requests: the share its fetch under way asked
    for, and after the fetch returned, what its still open pull request may bring."""

    pull: PullQueue
    fetching: int = 0

    def held(self) -> int:
        return max(self.fetching, self.pull.outstanding())


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
    affinity_window: float = AFFINITY_WINDOW_S
    conversations: Conversations = field(default_factory=Conversations)
    """The prefix keys of the requests answered here, per model (advertised: conversation affinity)."""
    bus: Bus | None = None
    """Where each request taken is told to its gateway (`Taken`); None: nowhere."""
    worker_id: str = ""
    instance: str = ""
    """This start of the worker process (`Heartbeat.instance`), named in each `Taken`."""
    affine_at: float = float("-inf")
    """Monotonic time at which an affine fetch last brought requests (`_shared_poll_s`)."""
    _in_flight: dict[str, InFlight] = field(default_factory=dict)
    _claims: list[_Claim] = field(default_factory=list)
    _cancelled: dict[str, float] = field(default_factory=dict)
    _background: set[asyncio.Task[None]] = field(default_factory=set)

    def _free_for(self, claim: _Claim) -> int:
        """The free slots a shared pull loop may ask for: those neither running a request nor held by another pull
        loop's pull requests, and those it holds itself (its fetch asks only for what its open pull request does not
        cover: `StandingPull.fetch`)."""
        return self.slots - len(self._in_flight) - sum(other.held() for other in self._claims if other is not claim)

    def busy(self) -> int:
        """Requests running now (for the advert's free slots)."""
        return len(self._in_flight)

    def reply_subject(self, request_id: str) -> str | None:
        """Where the request's chunks go; None once it is no longer held here (cancelled meanwhile)."""
        flight = self._in_flight.get(request_id)
        return flight.request.reply_subject if flight is not None else None

    def _serving(self, slot: Served) -> bool:
        return not self.stopping.is_set() and not slot.leaving.is_set()

    async def pull_loop(self, slot: Served, pull: PullQueue, settled: Settled) -> None:
        """Take requests for `slot` while it stays and the worker runs; `settled` hears of each one settled.

        The shared queue's, and those meant for this worker first (`AffinePull`);
        when it ends, those still waiting here for it go to the shared queue.
        """
        affine = AffinePull(self, slot, pull, settled, self.slots, self.affinity_window)
        if isinstance(pull, LeavingPull):  # what it gives back when it closes is told like any move
            pull.moved = self._tell_moved
        try:
            # A TaskGroup: if one loop fails, the other is stopped too, never left running for a model that left.
            async with asyncio.TaskGroup() as loops:
                loops.create_task(self._shared_loop(slot, pull, settled))
                loops.create_task(affine.run())
        except Exception:
            # Logged here: the model's task keeps the error unseen until someone awaits it.
            log.exception("the pull loop of %s failed: this worker takes no more requests for it", slot.model)
            raise
        finally:
            self.conversations.forget(slot.model)  # the model's cache leaves with it, and its keys the advert
            await affine.hand_over()

    async def _shared_loop(self, slot: Served, pull: PullQueue, settled: Settled) -> None:
        claim = _Claim(pull)
        self._claims.append(claim)
        # A pull request made while slots were free may bring requests after they filled (affine requests took
        # them meanwhile): the loop hears of them even while it waits for a slot, and runs or naks them at once.
        pull.on_arrival(self.slot_freed.set)
        try:
            while self._serving(slot):
                free = self._free_for(claim)
                if self.draining.is_set() or free <= 0:
                    if pull.waiting:
                        await self._take(slot, pull, pull.take_waiting(), settled)
                        continue
                    self.slot_freed.clear()
                    await self.slot_freed.wait()
                    continue
                # With several models, each pull takes a fair share of the free
                # slots so that an idle model's long poll cannot starve the others.
                share = -(-free // max(1, len(self._claims)))
                claim.fetching = share
                try:
                    deliveries = await pull.fetch(share, timeout=self._shared_poll_s())
                except BrokerError as exc:
                    log.warning("fetch for %s failed: %s", slot.model, exc)
                    deliveries = []
                    await asyncio.sleep(0.5)
                finally:
                    claim.fetching = 0
                    self.slot_freed.set()
                await self._take(slot, pull, deliveries, settled)
        finally:
            self._claims.remove(claim)

    async def _take(self, slot: Served, pull: PullQueue, deliveries: list[Delivery], settled: Settled) -> None:
        """Run each request while a slot is free (never more than `slots` at once), and nak the rest at once."""
        no_room_delay: float | None = None  # how long the pull's open requests may still bring messages (once)
        for delivery in deliveries:
            if len(self._in_flight) < self.slots and not self.draining.is_set() and self._serving(slot):
                await self._accept(slot, delivery, settled)  # no await before it counts the request in flight
            elif delivery.moved_by and delivery.moved_by == pull.worker_id:
                await settle(delivery, Outcome.RETURNED)
            else:
                no_room_delay = pull.open_for() if no_room_delay is None else no_room_delay
                await settle(delivery, Outcome.NO_ROOM, delay=no_room_delay)

    def _shared_poll_s(self) -> float:
        """How long one shared fetch waits.

        While this worker has had affine requests lately (`AFFINE_RECENT_S`), less than
        its affinity window: a fetch made before they filled the worker has then expired
        by the time it moves one of them (else it would catch it back: `Outcome.RETURNED`).
        Otherwise the usual `FETCH_TIMEOUT_S`: shorter polls on every idle worker of a
        fleet (or one whose gateways run ``--no-affinity``) would only cost pull requests.
        """
        if time.monotonic() - self.affine_at > AFFINE_RECENT_S:
            return FETCH_TIMEOUT_S
        return min(FETCH_TIMEOUT_S, max(0.1, 0.8 * self.affinity_window))

    def affine_room(self) -> int:
        """Slots an affine request may take now: running requests count, the shared fetch's reservation does not."""
        return 0 if self.draining.is_set() else self.slots - len(self._in_flight)

    def _emit_for(self, flight: InFlight) -> Emit:
        """The engine's emit for one request: the chunk naming the worker also names the message served, and the
        final chunk's outcome is noted (engine thread)."""
        stream_seq = _serving_seq(flight.delivery)

        def emit(chunk: Chunk) -> None:
            if chunk.worker_id and stream_seq:
                chunk = msgspec.structs.replace(chunk, stream_seq=stream_seq)
            if chunk.final and chunk.error is None:
                flight.answered = True
            self.emit(chunk)

        return emit

    async def admit(self, model: str, delivery: Delivery) -> GenerateRequest | None:
        """The request `delivery` brings, or None once its message is settled: it does not decode, has no reply
        subject, or is running here already or cancelled."""
        try:
            request = codec.decode_request(delivery.data)
        except codec.DecodeError as exc:
            log.error("poison request on %s: %s", model, exc)
            await settle(delivery, Outcome.POISON)
            return None
        if not request.reply_subject:
            log.error("request %s has no reply subject; dropped", request.request_id)
            await settle(delivery, Outcome.NO_REPLY)
            return None
        if self._seen(request.request_id):
            await settle(delivery, Outcome.SEEN)
            return None
        return request

    async def accept(self, slot: Served, delivery: Delivery, settled: Settled, request: GenerateRequest) -> None:
        """Start a request `admit` let through (parked meanwhile, perhaps: it is looked at again)."""
        if self._seen(request.request_id):
            await settle(delivery, Outcome.SEEN)
            return
        flight = InFlight(delivery=delivery, request=request, model=slot.model, settled=settled)
        self._in_flight[request.request_id] = flight
        slot.in_flight += 1
        try:
            await self.tell(request, _serving_seq(delivery))  # before any chunk can be sent: they share the connection
        finally:
            # Run even if the notice failed or this task was cancelled meanwhile: a request counted here but never
            # submitted would never be released, and its model's unload would wait for it until the worker stops.
            if self._in_flight.get(request.request_id) is flight:  # else cancelled meanwhile (and settled)
                self.engine.submit(request, self._emit_for(flight))

    async def _accept(self, slot: Served, delivery: Delivery, settled: Settled) -> None:
        request = await self.admit(slot.model, delivery)
        if request is not None:
            await self.accept(slot, delivery, settled, request)

    async def discard(self, delivery: Delivery) -> None:
        """Settle a request that will not run here, its attempt being cancelled."""
        await settle(delivery, Outcome.SEEN)

    async def tell(self, request: GenerateRequest, stream_seq: int, *, moved: bool = False) -> None:
        """Tell the request's gateway at once that this worker took it, or moved it to the shared queue (`Taken`).

        So the gateway knows where the request is before its first chunk (a long
        prefill sends none for a while): it never sends on one that already runs.
        A core message, no more: a gateway that does not hear it (an older one, a
        broken connection) goes by the worker's advert, as without it.
        """
        if self.bus is None:
            return
        notice = Taken(request_id=request.request_id, worker_id=self.worker_id, instance=self.instance,
                       stream_seq=stream_seq, moved=moved)  # fmt: skip
        try:
            await self.bus.publish(names.taken_subject(request.reply_subject), codec.encode(notice))
        except Exception as exc:  # a notice is a hint: nothing about it may stop the request itself
            log.debug("request %s: its gateway not told: %r", request.request_id, exc)

    async def _tell_moved(self, delivery: Delivery, seq: int) -> None:
        try:
            request = codec.decode_request(delivery.data)
        except codec.DecodeError:
            return  # poison: whoever takes the copy terms it
        if request.reply_subject:
            await self.tell(request, seq, moved=True)

    async def release(self, request_id: str, outcome: Outcome) -> None:
        """Forget a request and settle its message."""
        flight = self._in_flight.pop(request_id, None)
        if flight is None:
            return
        if flight.answered and outcome is Outcome.DONE and not flight.request.count_only:
            self.conversations.remember(flight.model, flight.request.prefix_keys)
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

    def _seen(self, request_id: str) -> bool:
        """Whether `request_id` runs here already, or this worker has heard it cancelled."""
        return request_id in self._in_flight or request_id in self._cancelled

    def was_cancelled(self, request_id: str) -> bool:
        """Whether this worker has heard `request_id` cancelled (a cold load goes by it: `cortex.worker.load_watch`)."""
        return request_id in self._cancelled


def _serving_seq(delivery: Delivery) -> int:
    """The stream sequence of the message a request runs from; 0 when a move acked it (the broker refused the copy,
    so this worker holds the only one): its gateway then has nothing in the stream to ask after."""
    return 0 if delivery.handed_on else delivery.stream_seq
