"""Connecting to NATS with the reconnect behaviour every Cortex process shares."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import nats
from nats.aio.client import Client as NATS

from cortex.broker.errors import BrokerUnavailable

log = logging.getLogger("cortex.broker")

DEFAULT_URL = "nats://127.0.0.1:4222"


@dataclass
class Link:
    """What a connection's callbacks report: whether it is up, since when, and each time it comes back.

    nats-py sends a connection's core subscriptions again by itself after a
    reconnect, and flushes what was published meanwhile; state the server kept
    in memory (the ordered consumers behind KV watches) may be gone, though:
    whoever holds such state waits on `reconnected` and builds it again.
    """

    up_since: float | None = field(default_factory=time.monotonic)
    """When (monotonic) the connection last came up; None while it is down."""
    reconnects: int = 0
    _came_back: asyncio.Event = field(default_factory=asyncio.Event)

    def lost(self) -> None:
        self.up_since = None

    def regained(self) -> None:
        self.up_since = time.monotonic()
        self.reconnects += 1
        self._came_back.set()
        self._came_back = asyncio.Event()

    async def reconnected(self, after: int) -> None:
        """Return once the connection has come back more than `after` times in all."""
        while self.reconnects <= after:
            await self._came_back.wait()


async def connect(url: str = DEFAULT_URL, *, name: str, connect_timeout: float = 5.0, link: Link | None = None) -> NATS:
    """Connect, then retry forever on disconnects (``max_reconnect_attempts=-1``).

    The first connection is not retried beyond `connect_timeout`: a wrong URL at
    start-up should fail loudly, not hang. `url` may list a cluster's servers,
    comma-separated; the client also learns the others from the one it reaches.
    `link`, if given, follows the connection's breaks and returns.

    ::

        nc = await connect("nats://127.0.0.1:4222", name="cortex-gateway")
        nc = await connect("nats://10.0.0.1:4222,nats://10.0.0.2:4222,nats://10.0.0.3:4222", name="cortex-worker")
    """
    servers = [part.strip() for part in url.split(",") if part.strip()]

    async def on_error(exc: Exception) -> None:
        # Reconnect attempts report every refused connection here; the
        # disconnect and reconnect callbacks already tell the story.
        log.debug("nats error (%s): %s", name, exc)

    async def on_disconnected() -> None:
        log.info("nats disconnected (%s)", name)
        if link is not None:
            link.lost()

    async def on_reconnected() -> None:
        log.info("nats reconnected (%s)", name)
        if link is not None:
            link.regained()

    try:
        connecting = nats.connect(
            servers,
            name=name,
            connect_timeout=connect_timeout,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            ping_interval=10,
            max_outstanding_pings=3,
            error_cb=on_error,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
        )
        # nats-py keeps retrying a first connection that never succeeded when
        # reconnects are unlimited: bound it.
        return await asyncio.wait_for(connecting, timeout=connect_timeout)
    except TimeoutError as exc:
        raise BrokerUnavailable(
            f"cannot connect to NATS at {url}: no server answered within {connect_timeout:.0f}s"
        ) from exc
    except Exception as exc:  # nats-py raises several unrelated types here
        raise BrokerUnavailable(f"cannot connect to NATS at {url}: {exc}") from exc
