"""KV watches that outlive broker faults, and when a process may believe what they say.

A KV watch is an ordered push consumer that the server keeps in memory. nats-py
sends its subscription again after a reconnect, but does not notice that the
consumer itself is gone (a restarted server; in a cluster, the node that held
it killed, or its stream electing a new leader) until its idle heartbeats stay
away, 10 to 20 s; all that while the watch says nothing, and to its reader
every worker's heartbeat seems to have stopped. A bucket whose stream has no
leader (a cluster electing one) takes no writes either: the watch may be
there, with nothing to say. So a `Watch` is made again after every reconnect,
and whenever it has been quiet for `PROBE_S` it asks after its consumer and its
stream: unless both answer within `PROBE_TIMEOUT_S`, it is made again too,
retried until the broker takes it.

While a watch is down, being made again, or was made again less than `SETTLE_S`
ago, it is *settling*: its reader missed what changed meanwhile, and the
workers' heartbeats, which could not be written or heard, come back only with
their next beats. `Bus.settling` is true while any watch is; no worker should
be judged dead by its silence then, nor any placement decided.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from cortex.broker.connection import Link
from cortex.protocol import names

log = logging.getLogger("cortex.broker")

PROBE_S = 1.0
"""A watch quiet for this long asks whether its consumer is still there (heartbeats come every 0.5 s)."""
PROBE_TIMEOUT_S = 2.0
"""A consumer that does not answer within this is taken for lost (a healthy one answers in milliseconds)."""
SLOW_PROBE_S = 0.5
"""A probe unanswered this long makes the watch settle at once: a worker's heartbeat counts 2 s after it was heard."""
REMAKE_WAIT_S = 1.0
"""How long one try at making a watch again is waited for before the next starts (a try without a JetStream meta
leader hangs for nats-py's whole 5 s timeout; a cluster elects one in several seconds)."""
SETTLE_S = float(names.HEARTBEAT_TTL_S)
"""After a watch is made again, how long what it says is taken for stale: in this time every live worker beats again."""

REMAKE_GAP_S = 2.0
REMAKE_GAP_MAX_S = 30.0
REMAKE_RECENT_S = 60.0
"""A watch made again for a failed probe less than `REMAKE_RECENT_S` after the last time is not made again for a
failed probe sooner than `REMAKE_GAP_S` after, doubling each time up to `REMAKE_GAP_MAX_S` (it settles meanwhile):
a process too loaded to hear its probes is not loaded further by re-deliveries of the whole bucket. A reconnect
makes it again at once, as ever."""
OWN_TIME_STEP_S = 0.1
"""`_within_own_time` looks at the event loop's lateness this often."""
OWN_TIME_CAP_S = 20.0
"""However late this process's event loop, a probe unanswered this long (wall clock) has failed."""

FleetHandler = Callable[[str, bytes | None], None]
"""Called with (key, value) for a put and (key, None) for a delete or expiry."""

KV_DELETE_OPS = frozenset({"DEL", "PURGE"})
"""The operations of a KV entry that removes its key (a delete, a purge), for every reader of a bucket."""


class Watch:
    """Every change of one KV bucket, passed to a handler, across reconnects and lost consumers.

    ::

        watch = Watch(js, "cortex-fleet", bucket, handler, "cortex-fleet-watch", link)
        await watch.start()       # raises if the bucket cannot be watched now
        watch.settling(time.monotonic())
        await watch.stop()
    """

    def __init__(
        self, js: JetStreamContext, bucket_name: str, bucket: KeyValue, handler: FleetHandler, name: str, link: Link
    ) -> None:
        self._js = js
        self._stream = f"KV_{bucket_name}"
        self._bucket = bucket
        self._handler = handler
        self.name = name
        self._link = link
        self._made_at = 0
        """The connection's reconnect count when the watch was last made."""
        self._remaking = False
        self._settled_at = 0.0
        """When (monotonic) the watch was last made again, or its consumer answered after being slow to."""
        self._remade_at = 0.0
        """When (monotonic) the watch was last made again."""
        self._slow_probe = False
        """A probe is late now (`_answers`): heartbeats may be late too."""
        self._doubted = False
        """The last probe failed and the watch was not made again (`_may_remake`): what it says may be stale."""
        self._probe_remade_at = 0.0
        """When (monotonic) the watch was last made again for a probe that failed."""
        self._remake_gap = 0.0
        """How long after `_probe_remade_at` a failed probe may make the watch again."""
        self._heard = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self.caught_up = asyncio.Event()
        """Set once the watch has brought every key's value as it was when the watch began (and stays set)."""
        self._late: set[asyncio.Future[Any]] = set()
        """Tries at making the watch again that were not waited for: each one stops its watch if it ever comes."""

    async def start(self) -> None:
        watcher = await self._bucket.watchall()
        self._made_at = self._link.reconnects
        self._task = asyncio.create_task(self._run(watcher), name=self.name)

    async def stop(self) -> None:
        for late in list(self._late):
            late.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def settling(self, now: float) -> bool:
        """Whether what the watch says may be stale (see the module's docstring)."""
        if self.lost(now) or self._slow_probe or self._doubted:
            return True
        return bool(self._settled_at) and now - self._settled_at < SETTLE_S

    def lost(self, now: float) -> bool:
        """Whether the watch is down, being made again, or was made again less than `SETTLE_S` ago: its reader has no
        view of the fleet it can answer from (workers not heard since look gone). A probe that was merely slow, as it
        is when this process's own event loop lags under load, leaves the view standing: that is only `settling`."""
        if self._remaking or self._made_at != self._link.reconnects:
            return True
        return bool(self._remade_at) and now - self._remade_at < SETTLE_S

    async def _run(self, watcher: KeyValue.KeyWatcher) -> None:
        while True:
            feeding = asyncio.create_task(self._feed(watcher), name=f"{self.name}-feed")
            try:
                await self._until_lost(watcher, feeding)
            finally:
                self._remaking = True
                feeding.cancel()
                (fed,) = await asyncio.gather(feeding, return_exceptions=True)
                if isinstance(fed, Exception):
                    log.error("watch %s: its handler failed: %r", self.name, fed)
                with contextlib.suppress(Exception):
                    await watcher.stop()  # type: ignore[no-untyped-call]  # nats-py leaves it unannotated
            watcher = await self._make_again()

    async def _feed(self, watcher: KeyValue.KeyWatcher) -> None:
        async for entry in watcher:
            self._heard = time.monotonic()
            if entry is None:  # the mark after the initial values
                self.caught_up.set()
                continue
            if entry.operation in KV_DELETE_OPS:
                self._handler(entry.key, None)
            else:
                self._handler(entry.key, entry.value)

    async def _until_lost(self, watcher: KeyValue.KeyWatcher, feeding: asyncio.Task[None]) -> None:
        """Return once the watch must be made again: the connection came back, or its consumer is lost."""
        while self._made_at == self._link.reconnects and not feeding.done():
            quiet = time.monotonic() - self._heard
            if quiet < PROBE_S or self._link.up_since is None:  # down: the reconnect will tell
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.1, PROBE_S - quiet)):
                        await self._link.reconnected(self._made_at)
                continue
            if not await self._answers(watcher):
                if not self._may_remake(time.monotonic()):  # it was made again moments ago: give it longer
                    self._doubted = True
                    log.info("watch %s: its consumer does not answer; made again %.0fs ago, so not yet", self.name,
                             time.monotonic() - self._probe_remade_at)  # fmt: skip
                    self._heard = time.monotonic()
                    continue
                log.warning("watch %s: its consumer or its stream does not answer (a server or cluster node went "
                            "away?): making it again", self.name)  # fmt: skip
                self._probe_remade(time.monotonic())
                return
            self._doubted = False
            self._heard = time.monotonic()

    async def _answers(self, watcher: KeyValue.KeyWatcher) -> bool:
        """Whether the watch's consumer and its stream (its leader) answer; a slow answer makes the watch settle.

        The wait counts this process's own time only (`_within_own_time`): while its event loop is what is late
        (blocked, or starved of CPU), the answer may be sitting unread in the socket, and remaking the watch would
        only add a full re-delivery of the bucket to the load.
        """
        sub = watcher._sub  # nats-py keeps the watch's subscription only here
        if sub is None:
            return False
        probe = asyncio.ensure_future(asyncio.gather(sub.consumer_info(), self._js.stream_info(self._stream)))
        done, _ = await asyncio.wait({probe}, timeout=SLOW_PROBE_S)
        slow = not done
        if slow:
            self._slow_probe = True
        try:
            await _within_own_time(probe, PROBE_TIMEOUT_S - SLOW_PROBE_S)
        except Exception as exc:  # gone (not found), no answer (the node, or the stream's leader, away), closed
            log.debug("watch %s: consumer did not answer: %r", self.name, exc)
            return False
        finally:
            self._slow_probe = False
        if slow:
            self._settled_at = time.monotonic()
        return True

    def _may_remake(self, now: float) -> bool:
        """Whether a watch whose probe failed may be made again now: not sooner than `_remake_gap` after the last
        time it was, for the same reason (the gap doubles while such remakes follow each other)."""
        return now - self._probe_remade_at >= self._remake_gap

    def _probe_remade(self, now: float) -> None:
        recent = self._probe_remade_at and now - self._probe_remade_at < REMAKE_RECENT_S
        self._remake_gap = min(max(2 * self._remake_gap, REMAKE_GAP_S), REMAKE_GAP_MAX_S) if recent else 0.0
        self._probe_remade_at = now

    async def _make_again(self) -> KeyValue.KeyWatcher:
        """A new watch of the bucket (each key's latest value first), retried until the broker takes it."""
        self._remaking = True
        delay = 0.1
        while True:
            reconnects = self._link.reconnects
            attempt = asyncio.ensure_future(self._bucket.watchall())
            await asyncio.wait({attempt}, timeout=REMAKE_WAIT_S)
            if not attempt.done():
                self._late.add(attempt)
                attempt.add_done_callback(self._stop_late)
                continue
            try:
                watcher = attempt.result()
            except Exception as exc:  # not connected yet, JetStream not ready, no stream leader yet...
                log.debug("watch %s not made again yet: %r", self.name, exc)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 1.0)
                continue
            self._made_at, self._remaking, self._settled_at = reconnects, False, time.monotonic()
            self._doubted = False
            self._remade_at = self._settled_at
            self._heard = self._settled_at
            log.info("watch %s made again", self.name)
            return watcher

    def _stop_late(self, attempt: asyncio.Future[Any]) -> None:
        self._late.discard(attempt)
        if not attempt.cancelled() and attempt.exception() is None:
            stopping = asyncio.ensure_future(attempt.result().stop())
            self._late.add(stopping)
            stopping.add_done_callback(self._late.discard)


async def _within_own_time(future: asyncio.Future[Any], budget: float) -> Any:
    """`future`'s result, waited for up to `budget` seconds of this event loop's own time (TimeoutError after that).

    Time the loop spent late, as a wait of `OWN_TIME_STEP_S` that returned later than that shows, does not count:
    that was this process (blocked, starved of CPU, busy with a burst of messages), not the broker. The wait ends
    after `OWN_TIME_CAP_S` of wall clock whatever the lateness.
    """
    start, spent = time.monotonic(), 0.0
    try:
        while not future.done():
            step = min(OWN_TIME_STEP_S, budget - spent)
            if step <= 0 or time.monotonic() - start >= OWN_TIME_CAP_S:
                raise TimeoutError
            before = time.monotonic()
            await asyncio.wait({future}, timeout=step)
            spent += min(time.monotonic() - before, step)  # beyond `step`, the loop was late
    finally:
        if not future.done():
            future.cancel()
    return future.result()
