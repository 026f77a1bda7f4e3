"""A worker's side of the request stream: its pull consumers of one model, and the requests they hand it.

`PullQueue` holds the model's shared durable consumer and, for conversation
affinity, this worker's own consumer of its affine subject of the model; a
`Delivery` is one request taken from either, with JetStream's ack verbs.
nats-py exceptions are translated here, as in `cortex.broker.bus`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import APIError, NoStreamResponseError

from cortex.broker import provision
from cortex.broker.errors import BrokerUnavailable
from cortex.broker.standing import StandingPull
from cortex.protocol import names

log = logging.getLogger("cortex.broker")

MOVE_TRIES_S = 0.75 * provision.DUPLICATE_WINDOW_S
"""How long after its first try a move whose outcome is unknown may be tried again: the stream's duplicate window
drops the copy a try may have stored when a later try (the same ``Nats-Msg-Id``) comes inside it, not after."""


class Move(Enum):
    """What came of handing a request over to its model's shared queue (`PullQueue.move`)."""

    DONE = "moved"
    """The copy is in the shared queue (stored now, or by an earlier try: the broker says so)."""
    REFUSED = "refused"
    """The broker answered no (its shared queue full, no stream for it): no copy anywhere, the request is this
    worker's alone, to run here or move later."""
    UNSURE = "unsure"
    """No answer (a timeout, the connection lost): a copy may be stored. Only a move may be tried again (the same
    ``Nats-Msg-Id``, so never a second copy); running it here could run it twice."""


class Delivery:
    """One request taken from a pull consumer, with JetStream's ack verbs."""

    __slots__ = ("_handed_on", "_msg", "moving_since")

    def __init__(self, msg: Msg) -> None:
        self._msg = msg
        self._handed_on = False
        self.moving_since = 0.0
        """Monotonic time of the first try at moving it (0: none yet)."""

    @property
    def data(self) -> bytes:
        return self._msg.data

    @property
    def stream_seq(self) -> int:
        """The message's sequence in the request stream (0 if the broker did not say)."""
        try:
            return int(self._msg.metadata.sequence.stream)
        except Exception:  # not a JetStream delivery (no metadata in its reply subject)
            return 0

    @property
    def moved_by(self) -> str:
        """The worker that moved this request from its affine subject to the shared one ("" if none did)."""
        return (self._msg.headers or {}).get(names.MOVED_BY_HEADER, "")

    @property
    def handed_on(self) -> bool:
        """Whether a move acked its message: it is no longer in the stream, and the ack verbs do nothing."""
        return self._handed_on

    @property
    def age(self) -> float:
        """Seconds since the broker stored the message, by this host's clock against the broker's (0 if unknown)."""
        try:
            stored = self._msg.metadata.timestamp
        except Exception:
            return 0.0
        return max(0.0, time.time() - stored.timestamp())

    # A message a move acked is settled already: each verb does nothing then (nats-py would raise).

    async def ack(self) -> None:
        if not self._handed_on:
            await self._quietly(self._msg.ack())

    async def nak(self, delay: float | None = None) -> None:
        if not self._handed_on:
            await self._quietly(self._msg.nak(delay=delay))

    async def in_progress(self) -> None:
        if not self._handed_on:
            await self._quietly(self._msg.in_progress())

    async def term(self) -> None:
        if not self._handed_on:
            await self._quietly(self._msg.term())

    @staticmethod
    async def _quietly(call: Awaitable[None]) -> None:
        # An ack that cannot be delivered (broker away) is redelivered by
        # JetStream later; the caller has nothing better to do than log it.
        try:
            await call
        except Exception as exc:
            log.warning("ack verb failed: %s", exc)


@dataclass
class PullQueue:
    """A worker's handle on one model's durable pull consumers: the shared one, and its own affine one (if any).

    Each is pulled through a `StandingPull` (`cortex.broker.standing`): one pull
    request stays open across fetches, so taking a request costs no JetStream
    call of its own.
    """

    model: str
    _shared: StandingPull
    _js: JetStreamContext
    _nc: NATS
    """The connection the standing pull requests go over (the JetStream context's own)."""
    worker_id: str = ""
    """The worker pulling (its affine consumer's, named on the requests it moves)."""
    _affine: StandingPull | None = None
    """The consumer of this worker's affine subject of the model (conversation affinity), once made."""
    _affine_warned: bool = False
    _on_arrival: Callable[[], None] | None = None

    @property
    def has_affine(self) -> bool:
        return self._affine is not None

    @property
    def waiting(self) -> int:
        """Requests of the shared queue delivered to this worker that no fetch has taken yet (a pull request made
        while it had free slots may bring some after they filled: see `take_waiting`)."""
        return self._shared.waiting

    def take_waiting(self) -> list[Delivery]:
        """Every request of the shared queue delivered and not taken yet (`waiting`)."""
        return [Delivery(m) for m in self._shared.take()]

    def outstanding(self) -> int:
        """Requests of the shared queue that its open pull request may still bring here."""
        return self._shared.outstanding()

    def open_for(self) -> float:
        """Seconds until the shared queue's open pull requests have ended at the broker (0: none open): a request nak'd
        with this delay goes to another worker, never back to one of them."""
        return self._shared.open_for()

    def put_back(self, deliveries: list[Delivery], *, affine: bool = False) -> None:
        """Return requests a fetch took and nobody used, first in line again (for the next fetch, or `wind_down`)."""
        pull = self._affine if affine else self._shared
        if pull is not None and deliveries:
            pull.put_back([d._msg for d in deliveries])

    def on_arrival(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever a request comes while no fetch waits for it (the pull loop should look again)."""
        self._on_arrival = callback
        for pull in (self._shared, self._affine):
            if pull is not None:
                pull.on_arrival = callback

    async def ensure_affine(self) -> bool:
        """Make and bind this worker's affine consumer of the model if it has none yet; whether it has one now.

        Cheap once made; tried again by the pull loop until then (a broker error, or a
        consumer of that name in another configuration: not one this worker can use).
        """
        if self._affine is not None:
            return True
        if not self.worker_id:
            return False
        try:
            durable = await provision.ensure_affine_consumer(self._js, self.model, self.worker_id)
            self._affine = await self._standing(self._nc, durable, self._shared.reconnects)
        except Exception as exc:
            # Warned once: the pull loop tries every few seconds, and serves from the shared queue meanwhile.
            level = logging.DEBUG if self._affine_warned else logging.WARNING
            log.log(level, "no affine consumer of %s for %s yet (serving from the shared queue only): %r",
                    self.model, self.worker_id, exc)  # fmt: skip
            self._affine_warned = True
            return False
        self._affine.on_arrival = self._on_arrival
        log.info("affine consumer of %s for %s ready", self.model, self.worker_id)
        return True

    @staticmethod
    async def _standing(nc: NATS, durable: str, reconnects: Callable[[], int]) -> StandingPull:
        pull = StandingPull(nc, names.pull_next_subject(names.REQUEST_STREAM, durable), reconnects, durable)
        return await pull.open()

    @classmethod
    async def bind(cls, nc: NATS, js: JetStreamContext, model: str, durable: str, worker_id: str,
                   reconnects: Callable[[], int]) -> PullQueue:  # fmt: skip
        """A queue on the model's shared consumer `durable` (already made); no affine consumer yet."""
        shared = await cls._standing(nc, durable, reconnects)
        return cls(model=model, _shared=shared, _js=js, _nc=nc, worker_id=worker_id)

    async def fetch(self, batch: int, timeout: float) -> list[Delivery]:
        """Up to `batch` requests from the shared queue; an empty list when none came within `timeout`."""
        return [Delivery(m) for m in await self._shared.fetch(batch, timeout)]

    async def fetch_affine(self, batch: int, timeout: float) -> list[Delivery]:
        """Up to `batch` requests meant for this worker first; an empty list when none came within `timeout`."""
        if self._affine is None:
            return []
        return [Delivery(m) for m in await self._affine.fetch(batch, timeout)]

    async def wind_down(self, limit: float) -> tuple[list[Delivery], list[Delivery]]:
        """Stop pulling: wait (at most `limit` s) for the open pull requests to end, and return what was delivered
        and never taken, from the shared queue and from the affine one, for the caller to give back."""
        shared = await self._shared.wind_down(limit)
        affine = await self._affine.wind_down(limit) if self._affine is not None else []
        return [Delivery(m) for m in shared], [Delivery(m) for m in affine]

    async def move(self, delivery: Delivery) -> tuple[Move, int]:
        """Hand an affine request over to the model's shared queue, for any worker: acked, then republished.

        In that order, so that no copy is ever left behind: a worker that dies between
        the two leaves nothing in the stream, and the request's gateway, which watches
        that its worker still serves the model until the request is taken, sends it on
        itself. The copy gets a new ``Nats-Msg-Id``, the same on every try for the one
        message (`names.moved_msg_id`), so a move tried again inside the stream's
        duplicate window never stores a second copy. The outcome (`Move`), and the
        copy's stream sequence once it is `Move.DONE` (else 0).
        """
        original = delivery._msg.headers or {}
        msg_id = names.moved_msg_id(original.get("Nats-Msg-Id", "request"), delivery.stream_seq)
        if not delivery.moving_since:
            delivery.moving_since = time.monotonic()
        await delivery.ack()  # nothing when an earlier try acked it
        delivery._handed_on = True
        headers = {"Nats-Msg-Id": msg_id, names.MOVED_BY_HEADER: self.worker_id}
        try:
            ack = await self._js.publish(names.request_subject(self.model), delivery.data, headers=headers)
        except (APIError, NoStreamResponseError, nats.errors.MaxPayloadError) as exc:  # the broker said no
            log.warning("request %s not moved to the shared queue of %s: %r", msg_id, self.model, exc)
            return Move.REFUSED, 0
        except Exception as exc:  # no answer: stored or not, nobody can tell yet
            log.warning("request %s moved to the shared queue of %s, or not: %r", msg_id, self.model, exc)
            return Move.UNSURE, 0
        return Move.DONE, int(ack.seq)

    async def pending(self) -> int:
        """Requests waiting in the model's queue and in this worker's affine queue, not yet given to a worker."""
        total = 0
        for pull in (self._shared, self._affine):
            if pull is None:
                continue
            try:
                info = await self._js.consumer_info(names.REQUEST_STREAM, pull.durable)
            except Exception as exc:
                raise BrokerUnavailable(f"cannot read the queue of {self.model}: {exc!r}") from exc
            total += int(info.num_pending or 0)
        return total

    async def close(self) -> None:
        """Stop pulling at once: what the open pull requests bring later is redelivered after the ack wait (a worker
        giving back what it holds first calls `wind_down`)."""
        for pull in (self._shared, self._affine):
            if pull is not None:
                await pull.close()
