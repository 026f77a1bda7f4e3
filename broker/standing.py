"""One durable pull consumer's standing pull request: the requests it brings wait here until the worker takes them.

nats-py's `fetch` asks JetStream anew on every call (a ``no_wait`` probe, then a
lingering request), and a worker calls it once per request it takes: on the
broker hop's path, that cost 0.41 to 0.57 ms a request here. A `StandingPull`
keeps one request open instead (``$JS.API.CONSUMER.MSG.NEXT`` with ``batch`` =
the slots asked for and ``expires`` = the caller's poll), its messages coming to
a private inbox of its own, and asks again only when that request is spent or
ends (0.19 to 0.22 ms). Flow control is the same as a fetch's: a request never
asks for more than the free slots the caller named, and lives no longer than
the poll it was made for; what it brings after its caller stopped waiting stays
here (`waiting`, `take`) and the caller is told (``on_arrival``).

Status messages (a header ``Status``) are never requests: 100 (idle heartbeat,
flow control) is ignored; 404 and 408 (no messages, expired) and 409 (consumer
deleted, leader changed, too many waiting requests...) end the request they
answer, and the next fetch asks again (at once after an expiry, at its next
call otherwise, never in a loop); a 409 is logged as a warning (at most once a
minute per consumer: "Exceeded MaxWaiting" says the consumer's ``max_waiting``
is too small for its fleet); any other status is raised by the next fetch as
`BrokerUnavailable`. After a reconnect every request made before it counts as
gone (the server may have dropped it) and is asked for again.

Stopping (`wind_down`) loses nothing: the server times each request from when
it receives it, so one can still bring a request a little after this side's
clock says it expired. `wind_down` waits for each open request's closing status
(at most `STATUS_GRACE_S` past its expiry here: a status comes after every
message its request brought), then unsubscribes and returns everything never
taken, for the caller to give back. A request whose status never came (a broken
connection) may still bring one later: the server redelivers it after the ack
wait.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from cortex.broker.errors import BrokerUnavailable
from cortex.broker.waiter import Waiter

log = logging.getLogger("cortex.broker")

MIN_EXPIRES_S = 0.05
"""The shortest life a pull request is given (a poll shorter than this asks for this long)."""
STATUS_GRACE_S = 0.5
"""How long past its expiry here an open request's closing status is waited for (`wind_down`), and counted open: the
server starts its clock when the request reaches it, so it may deliver a little later than this side expects."""
LATE_S = 0.1
"""How much later than this side's clock says a pull request ends at the server, at most on any sane network (its
trip there): the nak delay of a request one brought too many (`open_for`)."""
CONFLICT_WARN_S = 60.0
"""A consumer's 409 statuses (too many waiting requests...) are warned of at most this often."""
_ENDED = frozenset({"404", "408", "409"})


@dataclass
class _Asked:
    remaining: int
    expires_at: float
    reconnects: int


class StandingPull:
    """One consumer's standing pull request and the messages it brought (see the module's docstring)."""

    def __init__(self, nc: NATS, next_subject: str, reconnects: Callable[[], int], durable: str) -> None:
        self._nc = nc
        self._next_subject = next_subject
        self.reconnects = reconnects
        """How many times the connection has come back (`cortex.broker.connection.Link`)."""
        self.durable = durable
        self._inbox = nc.new_inbox()
        self._sub: Subscription | None = None
        self._ready: deque[Msg] = deque()
        self._asked: dict[str, _Asked] = {}
        self._count = 0
        self._waiter = Waiter()
        self._error = ""
        self._ended_early = False
        self._closed = False
        self._conflict_warned = float("-inf")
        self.on_arrival: Callable[[], None] | None = None
        """Called when a request comes while no fetch waits for one (the caller's loop should look again)."""

    async def open(self) -> StandingPull:
        self._sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_msg, pending_msgs_limit=1_000_000,
                                             pending_bytes_limit=-1)  # fmt: skip
        return self

    @property
    def waiting(self) -> int:
        """Requests delivered here that no fetch has taken yet."""
        return len(self._ready)

    def outstanding(self, now: float | None = None) -> int:
        """Requests the open pull requests may still bring (those not expired yet by this side's clock)."""
        now = time.monotonic() if now is None else now
        self._forget_lost(now)
        return sum(asked.remaining for asked in self._asked.values() if asked.expires_at > now)

    def open_for(self) -> float:
        """Seconds until every pull request open now has ended at the server too (0 if none is open; `LATE_S` added
        for the server's later start of its clock): a request given back (nak'd) with this delay goes to another
        worker, never back here through one of them."""
        now = time.monotonic()
        self._forget_lost(now)
        return max(0.0, max((a.expires_at + LATE_S - now for a in self._asked.values()), default=0.0))

    def take(self, limit: int = 0) -> list[Msg]:
        """The requests delivered and not yet taken, at most `limit` of them (0: all)."""
        count = len(self._ready) if limit <= 0 else min(limit, len(self._ready))
        return [self._ready.popleft() for _ in range(count)]

    def put_back(self, msgs: list[Msg]) -> None:
        """Return requests taken and never used to the front of the queue, in their order (a fetch cut short after
        it took them: `wind_down` then hands them over with the rest)."""
        self._ready.extendleft(reversed(msgs))

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        """Up to `batch` requests: those waiting here, else the first to come within `timeout` (an empty list if none
        did). Asks JetStream only for what the open requests do not cover already."""
        self._raise_if_refused()
        if self._ready or self._closed:
            return self.take(batch)
        now = time.monotonic()
        deadline = now + timeout
        asked_here = False
        while True:
            if deadline - now < MIN_EXPIRES_S:
                return []
            want = batch - self.outstanding(now)
            if want > 0 and not (asked_here and self._ended_early):
                await self._ask(want, deadline - now)
                asked_here = True
            first_end = min((a.expires_at for a in self._asked.values() if a.expires_at > now), default=deadline)
            await self._waiter.wait(min(deadline, first_end + 0.002) - now)
            self._raise_if_refused()
            if self._ready:
                return self.take(batch)
            now = time.monotonic()

    async def wind_down(self, limit: float) -> list[Msg]:
        """Stop pulling and take everything brought and not taken: wait (at most `limit` seconds) for each open
        request's closing status (at most `STATUS_GRACE_S` past its expiry), asking for none, then unsubscribe.
        Statuses come after the messages their requests brought, so once every one is in, nothing more can come;
        what a request given up on brings later is redelivered after the ack wait. Fetches return only what is
        left here from then on."""
        self._closed = True
        give_up = time.monotonic() + limit
        while (now := time.monotonic()) < give_up:
            self._forget_lost(now)  # those made before a reconnect, or past their grace: no status to wait for
            if not self._asked:
                break
            await self._waiter.wait(
                min(give_up, max(a.expires_at for a in self._asked.values()) + STATUS_GRACE_S) - now
            )
        await self._unsubscribe()
        return self.take()

    async def close(self) -> None:
        """Unsubscribe at once: the server drops the open requests (nobody listens), what they brought later is
        redelivered after the ack wait (`wind_down` first gives nothing up)."""
        self._closed = True
        self._asked.clear()
        await self._unsubscribe()

    async def _unsubscribe(self) -> None:
        if self._sub is None:
            return
        sub, self._sub = self._sub, None
        try:
            # Not a drain: its flush waits for a PONG that a broken connection never brings, and a drain that
            # fails leaves the subscription in the client, to be made again at every reconnect.
            await sub.unsubscribe()
        except Exception as exc:  # the connection gone: the server dropped the requests with it
            log.debug("standing pull unsubscribe: %r", exc)

    async def _ask(self, batch: int, expires: float) -> None:
        self._count += 1
        token = str(self._count)
        body = json.dumps({"batch": batch, "expires": int(expires * 1e9)}).encode()
        self._asked[token] = _Asked(batch, time.monotonic() + expires, self.reconnects())
        self._ended_early = False
        try:
            await self._nc.publish(self._next_subject, body, reply=f"{self._inbox}.{token}")
        except Exception as exc:  # reconnecting, closed...: the caller retries
            self._asked.pop(token, None)
            raise BrokerUnavailable(f"pull from {self._next_subject} failed: {exc!r}") from exc

    def _raise_if_refused(self) -> None:
        """Raise the error the server answered a pull request with, once."""
        if self._error:
            error, self._error = self._error, ""
            raise BrokerUnavailable(f"pull from {self._next_subject} refused: {error}")

    def _forget_lost(self, now: float) -> None:
        reconnects = self.reconnects()
        # Gone past its expiry and grace whether or not its 408 came: which request brought each message is a guess
        # (see `_on_msg`), so one counted as open may be spent already, and the server says nothing of a spent one.
        lost = [t for t, a in self._asked.items() if a.reconnects != reconnects or a.expires_at + STATUS_GRACE_S <= now]
        for token in lost:
            del self._asked[token]

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if not status:
            # A request comes on its own subject, so which pull request brought it is not told: the server serves
            # them oldest first, and so are they counted down.
            for token, asked in self._asked.items():
                asked.remaining -= 1
                if asked.remaining <= 0:
                    del self._asked[token]
                break
            self._ready.append(msg)
            if not self._waiter.waiting:
                if self.on_arrival is not None:
                    self.on_arrival()
                return
        elif status == "100":
            return
        else:  # a status comes on the subject its pull request named
            self._asked.pop(msg.subject.rsplit(".", 1)[-1], None)
            description = msg.headers.get("Description", "") if msg.headers else ""
            if status not in _ENDED:
                self._error = f"{status} {description}".strip()
            elif status != "408":
                self._ended_early = True
                if status == "409":
                    self._warn_conflict(description)
        self._waiter.wake()

    def _warn_conflict(self, description: str) -> None:
        now = time.monotonic()
        if now - self._conflict_warned >= CONFLICT_WARN_S:
            self._conflict_warned = now
            log.warning("pull request on consumer %s ended by the server: 409 %s (warned at most once a minute)",
                        self.durable, description)  # fmt: skip
