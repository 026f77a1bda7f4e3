"""Connecting to NATS with the reconnect behaviour every Cortex process shares."""

from __future__ import annotations

import asyncio
import logging

import nats
from nats.aio.client import Client as NATS

from cortex.broker.errors import BrokerUnavailable

log = logging.getLogger("cortex.broker")

DEFAULT_URL = "nats://127.0.0.1:4222"


async def connect(url: str = DEFAULT_URL, *, name: str, connect_timeout: float = 5.0) -> NATS:
    """Connect, then retry forever on disconnects (``max_reconnect_attempts=-1``).

    The first connection is not retried beyond `connect_timeout`: a wrong URL at
    start-up should fail loudly, not hang. `url` may list a cluster's servers,
    comma-separated; the client also learns the others from the one it reaches.

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

    async def on_reconnected() -> None:
        log.info("nats reconnected (%s)", name)

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
