"""Chunks from the engine thread to the event loop, one wake-up per burst rather than per chunk.

A decoding step of a batch of 16 produces 16 chunks at once; waking the loop
for each would cost 16 cross-thread signals. `put` signals only when the loop
has not been signalled since it last took the chunks.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque

from cortex.protocol import Chunk


class Outbox:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: deque[Chunk] = deque()
        self._lock = threading.Lock()
        self._signalled = False
        self._ready = asyncio.Event()

    def put(self, chunk: Chunk) -> None:
        """Any thread; never blocks."""
        with self._lock:
            self._items.append(chunk)
            if self._signalled:
                return
            self._signalled = True
        self._loop.call_soon_threadsafe(self._ready.set)

    def take_all(self) -> list[Chunk]:
        """Loop thread: everything queued so far, in order."""
        with self._lock:
            self._ready.clear()
            self._signalled = False
            items = list(self._items)
            self._items.clear()
        return items

    async def get_batch(self) -> list[Chunk]:
        """Loop thread: wait until something is queued, then take all of it."""
        await self._ready.wait()
        return self.take_all()
