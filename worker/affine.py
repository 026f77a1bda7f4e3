"""The affine half of a model's pull loop: the requests a gateway sent to this worker first (conversation affinity).

A gateway publishes a request to this worker's affine subject of a model when
the worker likely holds the prompt's prefix in its cache (`cortex.gateway.affinity`).
`AffinePull` runs beside the shared fetch of `cortex.worker.inflight.Requests.pull_loop`:

- It first makes this worker's consumer of that subject, and tries again every
  `AFFINE_RETRY_S` until it has one; only then are the model's prefix keys
  advertised (`Conversations.affine`), and gateways send affine requests only to
  a worker that advertises keys, so none waits on a subject nobody reads.
- It takes its requests first, whenever the worker runs fewer than its slots,
  even while the shared fetch holds the free slots reserved (the engine batches:
  a bounded over-commit). One that finds the worker full is parked here at most
  the window (`AFFINITY_WINDOW_S`), runs if a slot frees meanwhile, else is moved
  to the model's shared subject (`PullQueue.move`), where any worker takes it.
- When the model leaves or the worker stops, it moves what it holds and what is
  still queued for it (`hand_over`).

Each request taken or moved is told to its gateway at once (`Taken`), so the
gateway never sends on a request that already runs, however long its prefill.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from cortex.broker.errors import BrokerError
from cortex.broker.pull import MOVE_TRIES_S, Delivery, Move, PullQueue
from cortex.protocol import GenerateRequest
from cortex.worker.conversations import Conversations

if TYPE_CHECKING:
    from cortex.worker.inflight import Served, Settled

log = logging.getLogger("cortex.worker")

AFFINITY_WINDOW_S = 0.3
"""How long a request meant for this worker first waits for one of its slots before any worker may take it.

Measured (``bench/affinity.py``, three CPU workers, 12 conversations): a slot
comes free within 0.3 s for most turns that find their worker full, and a
longer wait bought little more reuse while it delayed every such turn; a GPU
prefill that the cache saves is of the same order."""
AFFINE_POLL_S = 1.0
"""How long one fetch from the affine consumer waits for a request."""
AFFINE_RETRY_S = 2.0
"""How often a pull loop without its affine consumer tries to make it again (a broker error, a consumer of that name
in another configuration); it serves from the shared queue meanwhile."""
HAND_OVER_ROUNDS = 4
MOVE_RETRY_S = 1.0
"""A request whose move the broker refused or did not answer is tried again this often."""


class Host(Protocol):
    """What an `AffinePull` needs of the worker's requests (`cortex.worker.inflight.Requests`)."""

    slot_freed: asyncio.Event
    draining: asyncio.Event
    stopping: asyncio.Event
    conversations: Conversations
    affine_at: float
    """Monotonic time at which an affine fetch last brought requests."""

    def affine_room(self) -> int: ...
    def was_cancelled(self, request_id: str) -> bool: ...
    async def admit(self, model: str, delivery: Delivery) -> GenerateRequest | None: ...
    async def accept(self, slot: Served, delivery: Delivery, settled: Settled, request: GenerateRequest) -> None: ...
    async def discard(self, delivery: Delivery) -> None: ...
    async def tell(self, request: GenerateRequest, stream_seq: int, *, moved: bool = False) -> None: ...


@dataclass
class Parked:
    """A request meant for this worker first that found it full: it runs here if a slot frees in time, else moves."""

    delivery: Delivery
    request: GenerateRequest
    until: float
    """Monotonic time at which it goes to the shared queue (or its move is tried again)."""
    since: float = 0.0
    """Monotonic time at which it was fetched."""
    unsure: bool = False
    """A move of it got no answer: a copy may be in the shared queue, so it is only ever moved again, never run here
    (the same ``Nats-Msg-Id`` makes the move idempotent; a run here could be a second one)."""


@dataclass
class AffinePull:
    """The affine half of one model's pull loop on this worker (see the module's docstring)."""

    host: Host
    slot: Served
    pull: PullQueue
    settled: Settled
    slots: int
    window: float = AFFINITY_WINDOW_S
    parked: list[Parked] = field(default_factory=list)

    def _serving(self) -> bool:
        return not self.host.stopping.is_set() and not self.slot.leaving.is_set()

    async def run(self) -> None:
        """Make the affine consumer (tried again until made), then take and hold its requests while the model stays."""
        while not await self.pull.ensure_affine():
            if not await self._pause(AFFINE_RETRY_S):
                return
        self.host.conversations.affine(self.slot.model)  # advertised from now on: gateways may send here
        # A TaskGroup: if one loop fails, the other is stopped too, never left running for a model that left.
        async with asyncio.TaskGroup() as loops:
            loops.create_task(self._fetch())
            loops.create_task(self._hold())

    async def _pause(self, seconds: float) -> bool:
        """Wait `seconds`, or less if the model leaves or the worker stops; whether it still serves the model."""
        ends = [asyncio.ensure_future(self.slot.leaving.wait()), asyncio.ensure_future(self.host.stopping.wait())]
        try:
            await asyncio.wait(ends, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for end in ends:
                end.cancel()
        return self._serving()

    async def _fetch(self) -> None:
        """Long-poll the affine queue, holding at most `slots` of its requests at a time; each is parked."""
        while self._serving():
            want = self.slots - len(self.parked)
            if want <= 0:
                self.host.slot_freed.clear()
                await self.host.slot_freed.wait()
                continue
            try:
                deliveries = await self.pull.fetch_affine(want, timeout=AFFINE_POLL_S)
            except BrokerError as exc:
                log.warning("affine fetch for %s failed: %s", self.slot.model, exc)
                await asyncio.sleep(0.5)
                continue
            if deliveries:
                self.host.affine_at = time.monotonic()
                await self._park(deliveries, self.window)
                self.host.slot_freed.set()  # the holding loop takes them from here

    async def _park(self, deliveries: Iterable[Delivery], window: float) -> None:
        now = time.monotonic()
        for delivery in deliveries:
            request = await self.host.admit(self.slot.model, delivery)
            if request is None:
                continue  # settled already: poison, or seen before
            # Timed from when the broker stored it, never beyond the window from now (clocks may differ).
            wait = 0.0 if self.host.draining.is_set() else min(window, max(0.0, window - delivery.age))
            self.parked.append(Parked(delivery, request, now + wait, now))

    async def _hold(self) -> None:
        """Run parked requests, oldest first, while there is room; move those whose window has passed."""
        while self._serving():
            await self._forget_cancelled()
            while self._serving() and self.host.affine_room() > 0 and (taken := self._runnable()) is not None:
                self.parked.remove(taken)
                if (waited := time.monotonic() - taken.since) > 0.01:
                    log.debug("affine request %s ran here after waiting %.3fs for a slot",
                              taken.request.request_id, waited)  # fmt: skip
                await self.host.accept(self.slot, taken.delivery, self.settled, taken.request)
            now = time.monotonic()
            for waiting in [p for p in self.parked if p.until <= now]:
                await self._move(waiting)
            if not self._serving() or (self.host.affine_room() > 0 and self._runnable() is not None):
                continue
            # No await between the checks above and this clear: nothing can set the event unseen in between.
            self.host.slot_freed.clear()
            timeout = min(p.until for p in self.parked) - time.monotonic() if self.parked else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.host.slot_freed.wait()

    def _runnable(self) -> Parked | None:
        return next((p for p in self.parked if not p.unsure), None)

    async def _forget_cancelled(self) -> None:
        """Let go of parked requests whose attempt was cancelled (the client left, or the gateway sent it on)."""
        for gone in [p for p in self.parked if self.host.was_cancelled(p.request.request_id)]:
            self.parked.remove(gone)
            await self.host.discard(gone.delivery)

    async def _move(self, waiting: Parked) -> None:
        """Move one parked request to the shared queue; it stays parked unless it went, or is let go (see `Move`)."""
        outcome, seq = await self.pull.move(waiting.delivery)
        now = time.monotonic()
        if outcome is Move.DONE:
            self.parked.remove(waiting)
            self.host.slot_freed.set()  # room to fetch more
            await self.host.tell(waiting.request, seq, moved=True)
            log.info("request %s moved to the shared queue of %s (as %d): no slot here in time, or leaving",
                     waiting.request.request_id, self.slot.model, seq)  # fmt: skip
        elif outcome is Move.UNSURE and now - waiting.delivery.moving_since > MOVE_TRIES_S:
            # Past the duplicate window a try could store a second copy. A worker whose publishes all go unanswered
            # this long has lost its heartbeat too: the request's gateway has sent it on already.
            self.parked.remove(waiting)
            log.error("request %s let go: its move to the shared queue got no answer for %.0fs",
                      waiting.request.request_id, MOVE_TRIES_S)  # fmt: skip
        else:
            waiting.unsure = waiting.unsure or outcome is Move.UNSURE
            waiting.until = now + MOVE_RETRY_S

    async def hand_over(self) -> None:
        """The model leaves or the worker stops: its affine requests, held or still queued, go to the shared queue.

        A few rounds at most (gateways stop sending here once the advert says so).
        A request not moved (the broker refused it or did not answer; one still
        coming) is let go: its gateway sends it on itself, as for a worker that
        died, once it sees this worker no longer serve the model (the advert,
        within seconds), having heard of no `Taken` for it.
        """
        if not self.pull.has_affine:
            return
        try:
            await self._forget_cancelled()
            for _ in range(HAND_OVER_ROUNDS):
                for waiting in [p for p in self.parked if not p.delivery.moving_since]:  # each tried once here
                    await self._move(waiting)
                fresh = await self.pull.fetch_affine(self.slots, timeout=0.1)
                if not fresh:
                    break
                await self._park(fresh, 0.0)
            for waiting in list(self.parked):  # a last try: what the last round brought, what was not moved
                await self._move(waiting)
        except BrokerError as exc:
            log.warning("affine requests of %s not handed over: %s", self.slot.model, exc)
        if self.parked:
            log.warning("%d affine request(s) of %s not handed over; their gateways send them on",
                        len(self.parked), self.slot.model)  # fmt: skip
            self.parked.clear()
