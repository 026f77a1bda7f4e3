"""A model's pull queue that lets go at once when the model is to unload.

The pull loop (`cortex.worker.inflight.Requests.pull_loop`) looks at its slot's
``leaving`` only between fetches, and an idle model's fetch waits up to
`FETCH_TIMEOUT_S` for a request: every unload, so every swap, waited that long
before the memory came free. Through this wrapper a fetch under way when
``leaving`` is set returns nothing at once (one started afterwards, a last look
on the way out, runs as asked). The fetch cut short is not cancelled (a request
the broker was handing over would be stranded until JetStream's ack wait
passed): it finishes in the background and whatever it brings goes back at
once, nak'd to the queue it came from, or moved to the model's shared queue
when it came from this worker's affine one (conversation affinity), since
nobody here pulls that any more. When the worker stops, those still fetching
are cancelled and waited for (`Residency.stop_serving`), their errors seen:
nothing is left to fail after the event loop has gone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from cortex.broker.pull import Delivery, Move, PullQueue

log = logging.getLogger("cortex.worker")

Fetch = Callable[[int, float], Awaitable[list[Delivery]]]


class LeavingPull:
    """`PullQueue`'s verbs over `queue`, its fetches cut short by `leaving`; anything else passes through."""

    def __init__(self, queue: PullQueue, leaving: asyncio.Event, background: set[asyncio.Task[None]]) -> None:
        self.model = queue.model
        self._queue = queue
        self._leaving = leaving
        self._background = background
        """Where the tasks giving back what a fetch cut short brought are kept (the owner's set of tasks)."""
        self._cut_short: list[asyncio.Task[None]] = []
        self._leave: asyncio.Future[Any] | None = None

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
        try:
            await asyncio.wait((fetch, self._leave), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._give_back_later(fetch, affine)
            raise
        if fetch.done():
            return fetch.result()
        self._give_back_later(fetch, affine)
        return []

    def _give_back_later(self, fetch: asyncio.Future[list[Delivery]], affine: bool) -> None:
        self._cut_short.append(self._in_background(self._give_back(fetch, affine), f"give-back-{self.model}"))

    def _in_background(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _give_back(self, fetch: asyncio.Future[list[Delivery]], affine: bool) -> None:
        try:
            await asyncio.wait((fetch,))
        except asyncio.CancelledError:  # the worker stops: the fetch goes too, quietly (its queue closes anyway)
            fetch.cancel()
            await asyncio.wait((fetch,))
            _looked_at(fetch)
            raise
        _looked_at(fetch)
        if fetch.cancelled() or fetch.exception() is not None:
            return
        let_go = 0
        for delivery in fetch.result():
            if not affine:
                await delivery.nak()
            elif (await self._queue.move(delivery))[0] is not Move.DONE:
                let_go += 1  # acked already (`PullQueue.move`): its gateway sends it on, as for a worker gone
        if fetch.result():
            log.info("gave %d request(s) back to the queue of %s, which is unloading", len(fetch.result()), self.model)
        if let_go:
            log.warning("%d affine request(s) of %s not handed over; their gateways send them on", let_go, self.model)

    async def close(self) -> None:
        """Close the queue once what the fetches cut short brought has gone back (in the background if need be)."""
        if self._leave is not None:
            self._leave.cancel()
        pending = [task for task in self._cut_short if not task.done()]
        if not pending:
            await self._queue.close()
            return
        self._in_background(self._close_after(pending), f"close-pull-{self.model}")

    async def _close_after(self, pending: list[asyncio.Task[None]]) -> None:
        await asyncio.wait(pending)
        await self._queue.close()


def _looked_at(fetch: asyncio.Future[list[Delivery]]) -> None:
    """Mark a fetch's error as seen: a fetch cut short belongs to nobody who could report it."""
    if fetch.done() and not fetch.cancelled():
        fetch.exception()
