"""What one request's chunks wait in at the gateway: a deque and one waiter.

The relay's subscription handler puts every chunk (and `Taken` notice) of a
request here; its `ReplyStream` takes them one by one. An `asyncio.Queue` with
``asyncio.timeout`` around each get did the same with a timeout object, a
cancellation scope and a getter future per wait; this is a deque and a
`Waiter` (one future and one timer handle), on the path of every chunk of every
stream.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

from cortex.broker.waiter import Waiter

T = TypeVar("T")


class Inbox(Generic[T]):
    """Items put by a synchronous handler, taken by one reader (`get`) that may give up after a while."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._waiter = Waiter()

    def put_nowait(self, item: T) -> None:
        self._items.append(item)
        self._waiter.wake()

    def empty(self) -> bool:
        return not self._items

    def get_nowait(self) -> T:
        """The oldest item; IndexError when there is none."""
        return self._items.popleft()

    async def get(self, timeout: float) -> T:
        """The oldest item, waiting for one at most `timeout` seconds; TimeoutError if none came."""
        if not self._items:
            await self._waiter.wait(timeout)
            if not self._items:
                raise TimeoutError
        return self._items.popleft()
