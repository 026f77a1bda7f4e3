"""Chunks from the outbox to their reply subjects, and the settling of a request once its end is out."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import msgspec

from cortex.broker.bus import Bus
from cortex.broker.errors import BrokerError
from cortex.protocol import Chunk, codec
from cortex.worker.inflight import Outcome
from cortex.worker.outbox import Outbox

log = logging.getLogger("cortex.worker")


@dataclass
class ChunkPublisher:
    bus: Bus
    outbox: Outbox
    reply_subject: Callable[[str], str | None]
    """A request's reply subject, or None once it is no longer held (cancelled meanwhile)."""
    release: Callable[[str, Outcome], Awaitable[None]]
    """Forgets a request and settles its message."""
    instance: str = ""
    """This start of the worker process: stamped on the chunks that name the worker (`Chunk.instance`)."""

    async def run(self) -> None:
        while True:
            for chunk in await self.outbox.get_batch():
                await self._publish_safely(chunk)

    async def drain(self) -> None:
        """Publish what the engine has queued so far (on shutdown, once the publisher task is no longer needed)."""
        for chunk in self.outbox.take_all():
            await self._publish_safely(chunk)

    async def _publish_safely(self, chunk: Chunk) -> None:
        try:
            await self._publish(chunk)
        except Exception:
            # One bad request must not stop the chunks of all the others.
            log.exception("publishing a chunk of %s failed", chunk.request_id)
            await self.release(chunk.request_id, Outcome.BROKEN)

    async def _publish(self, chunk: Chunk) -> None:
        subject = self.reply_subject(chunk.request_id)
        if subject is None:
            return  # cancelled meanwhile
        if chunk.worker_id and self.instance:
            chunk = msgspec.structs.replace(chunk, instance=self.instance)
        try:
            await self.bus.publish(subject, codec.encode(chunk))
        except BrokerError as exc:
            log.warning("chunk for %s not published: %s", chunk.request_id, exc)
            if chunk.final:
                # The gateway never saw the end: give the request back rather than
                # let the client wait for its deadline.
                await self.release(chunk.request_id, Outcome.UNDELIVERED)
            return
        if chunk.final:
            await self.release(chunk.request_id, Outcome.DONE)
