"""A model's pull queue that lets go at once when the model is to unload, and gives back what it was brought.

The pull loop (`cortex.worker.inflight.Requests.pull_loop`) looks at its slot's
``leaving`` only between fetches, and an idle model's fetch waits up to
`FETCH_TIMEOUT_S` for a request: every unload, so every swap, waited that long
before the memory came free. Through this wrapper a fetch under way when
``leaving`` is set returns nothing at once (one started afterwards, a last look
on the way out, runs as asked). Cutting a fetch short loses nothing: the pull
request it waited on stays open at the broker (`cortex.broker.standing`), and
what it brings waits in the queue; a fetch that had taken requests when its
caller was cancelled puts them back first in line (`PullQueue.put_back`).

When the queue closes, its open pull requests are let run out (they live no
longer than the poll they were made for), and whatever they brought that no
fetch took goes back at once (in the background): nak'd to the shared queue,
or moved to the model's shared queue when it came from this worker's affine
one (conversation affinity), since nobody here pulls that any more; each move
is told to the request's gateway (`Taken`, ``moved``), as `AffinePull` tells its
own, so the gateway follows the copy instead of sending the request on again.
When the worker stops, those giving back are cancelled and waited for
(`Residency.stop_serving`): nothing is left to fail after the event loop has gone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from cortex.broker.pull import Delivery, Move, PullQueue
from cortex.worker.tasks import looked_at

log = logging.getLogger("cortex.worker")

Fetch = Callable[[int, float], Awaitable[list[Delivery]]]
Moved = Callable[[Delivery, int], Awaitable[None]]
"""Told of each request given back by a move: its delivery and the copy's stream sequence."""
WIND_DOWN_S = 1.5
"""The longest a closing queue waits for its open pull requests to run out (longer than any poll)."""


class LeavingPull:
    """`PullQueue`'s verbs over `queue`, its fetches cut short by `leaving`; anything else passes through."""

    def __init__(self, queue: PullQueue, leaving: asyncio.Event, background: set[asyncio.Task[None]]) -> None:
        self.model = queue.model
        self._queue = queue
        self._leaving = leaving
        self._background = background
        """Where the task giving back what the queue was brought at its close is kept (the owner's set of tasks)."""
        self._leave: asyncio.Future[Any] | None = None
        self.moved: Moved | None = None
        """Told of each affine request given back by a move at the close (the pull loop's `Taken` notice)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(self._queue, name)

    async def fetch(self, batch: int, timeout: float) -> list[Delivery]:
        return await self._fetch(self._queue.fetch, batch, timeout, affine=False)

    async def fetch_affine(self, batch: int, timeout: float) -> list[Delivery]:
        return await self._fetch(self._queue.fetch_affine, batch, timeout, affine=True)

    async def _fetch(self, call: Fetch, batch: int, timeout: float, *, affine: bool) -> list[Delivery]:
        if self._leaving.is_set():
            return await call(batch, timeout)
        if self._leave is None:  # one waiter shared by every fetch: a task each would cost on the hot path
            self._leave = asyncio.ensure_future(self._leaving.wait())
        fetch = asyncio.ensure_future(call(batch, timeout))
        handed = False
        try:
            await asyncio.wait((fetch, self._leave), return_when=asyncio.FIRST_COMPLETED)
            handed = True
        finally:
            if not fetch.done():  # leaving, or this task cancelled: the fetch goes, what it waited for stays queued
                fetch.cancel()
                await asyncio.wait((fetch,))
            looked_at(fetch)
            if not handed and (taken := _taken(fetch)):
                # Cancelled after the fetch had taken requests: they go back in line, for `wind_down` to give back.
                self._queue.put_back(taken, affine=affine)
        return [] if fetch.cancelled() else fetch.result()

    async def close(self) -> None:
        """Close the queue once its open pull requests have run out and what they brought has gone back (in the
        background)."""
        if self._leave is not None:
            self._leave.cancel()
        task = asyncio.create_task(self._give_back(), name=f"give-back-{self.model}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _give_back(self) -> None:
        try:
            shared, affine = await self._queue.wind_down(WIND_DOWN_S)
            for delivery in shared:
                await delivery.nak()
            let_go = 0
            for delivery in affine:
                outcome, seq = await self._queue.move(delivery)
                if outcome is not Move.DONE:
                    let_go += 1  # acked already (`PullQueue.move`): its gateway sends it on, as for a worker gone
                elif self.moved is not None:
                    await self.moved(delivery, seq)
            if shared or affine:
                log.info("gave %d request(s) back to the queue of %s, which is unloading", len(shared) + len(affine),
                         self.model)  # fmt: skip
            if let_go:
                log.warning("%d affine request(s) of %s not handed over; their gateways send them on", let_go,
                            self.model)  # fmt: skip
        finally:
            await self._queue.close()


def _taken(fetch: asyncio.Future[list[Delivery]]) -> list[Delivery]:
    """What a finished fetch brought (nothing if it was cancelled or failed)."""
    if fetch.cancelled() or fetch.exception() is not None:
        return []
    return fetch.result()
