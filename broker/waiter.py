"""One reader's wait for a synchronous producer, with a timeout: one future and one timer handle.

A subscription callback (or any code on the event loop that must not await) puts
something somewhere and calls `Waiter.wake`; the one reader waiting in
`Waiter.wait` resumes then, or when its time is up. ``asyncio.wait_for`` on an
``asyncio.Event`` does the same with a task, a timeout object and a cancellation
scope per wait; this sits on the path of every chunk a gateway relays
(`cortex.gateway.inbox`) and of every request a worker pulls
(`cortex.broker.standing`). No nats, no protocol: anything may import it.
"""

from __future__ import annotations

import asyncio


class Waiter:
    """At most one reader waiting at a time, woken by `wake` or by its timeout, whichever comes first."""

    __slots__ = ("_future",)

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None

    @property
    def waiting(self) -> bool:
        """Whether a reader waits now (a producer may then leave the telling to `wake`)."""
        return self._future is not None

    def wake(self) -> None:
        """Let the waiting reader, if any, resume (callable from synchronous code on the loop)."""
        future = self._future
        if future is not None and not future.done():
            future.set_result(None)

    async def wait(self, seconds: float) -> None:
        """Return when woken, or after `seconds` (at once if `seconds` <= 0); the caller looks for itself why."""
        if seconds <= 0:
            return
        loop = asyncio.get_running_loop()
        future = self._future = loop.create_future()
        timer = loop.call_later(seconds, _wake, future)
        try:
            await future
        finally:
            timer.cancel()
            self._future = None


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
