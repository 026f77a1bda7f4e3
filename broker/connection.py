"""Connecting to NATS with the reconnect behaviour every Cortex process shares."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

from nats.aio.client import Client as NATS
from nats.protocol.parser import AUTHORIZATION_VIOLATION, PERMISSIONS_ERR

from cortex.broker import settings
from cortex.broker.access import CREDS_ENV, TLS_CA_ENV, TLS_CERT_ENV, Access
from cortex.broker.errors import BrokerUnavailable

log = logging.getLogger("cortex.broker")

DEFAULT_URL = settings.shared("nats", "nats://127.0.0.1:4222")
"""Every process's ``--nats`` default: ``$CORTEX_NATS_URL``, else ``nats`` in cortex.toml, else the local broker."""


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


async def connect(
    url: str = DEFAULT_URL,
    *,
    name: str,
    connect_timeout: float = 5.0,
    link: Link | None = None,
    access: Access | None = None,
) -> NATS:
    """Connect, then retry forever on disconnects (``max_reconnect_attempts=-1``).

    The first connection is not retried beyond `connect_timeout`: a wrong URL at
    start-up should fail loudly, not hang, and a refused user or an untrusted
    certificate fails at once. `url` may list a cluster's servers,
    comma-separated; the client also learns the others from the one it reaches.
    `link`, if given, follows the connection's breaks and returns. `access` is
    the user and TLS files (default: `Access.from_env`, that is ``--nats-creds``
    or ``CORTEX_NATS_CREDS``, and ``CORTEX_NATS_TLS_*``).

    ::

        nc = await connect("nats://127.0.0.1:4222", name="cortex-gateway")
        nc = await connect("nats://10.0.0.1:4222,nats://10.0.0.2:4222,nats://10.0.0.3:4222", name="cortex-worker")
        nc = await connect("nats://broker:4222", name="cortex-worker", access=Access.from_env(creds="worker.auth"))
    """
    servers = [part.strip() for part in url.split(",") if part.strip()]
    access = access if access is not None else Access.from_env()
    refused: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()

    async def on_error(exc: Exception) -> None:
        # The server's -ERR lines carry no code: nats-py itself tells them by their words (its constants).
        text = str(exc).lower()
        if not refused.done() and (isinstance(exc, ssl.SSLError) or AUTHORIZATION_VIOLATION in text):
            refused.set_result(exc)  # retrying cannot help a first connection: the user or certificate is wrong
        if PERMISSIONS_ERR in text:
            log.warning("nats (%s) as %s: %s", name, access.user or "anonymous", exc)
            return
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

    options: dict[str, Any] = {
        "name": name,
        "connect_timeout": connect_timeout,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "ping_interval": 10,
        "max_outstanding_pings": 3,
        "error_cb": on_error,
        "disconnected_cb": on_disconnected,
        "reconnected_cb": on_reconnected,
    }
    nc = NATS()
    connecting = asyncio.ensure_future(nc.connect(servers, **options, **access.connect_options()))
    # nats-py keeps retrying a first connection that never succeeded when
    # reconnects are unlimited: bound it.
    first: set[asyncio.Future[Any]] = {connecting, refused}
    await asyncio.wait(first, timeout=connect_timeout, return_when=asyncio.FIRST_COMPLETED)
    failure: str | None = None
    if connecting.done() and connecting.exception() is None:
        if access.tls and not nc._server_info.get("tls_required"):  # nats-py keeps the server's INFO only here
            failure = f"NATS at {url} does not use TLS, though {TLS_CA_ENV} or {TLS_CERT_ENV} is set"
    elif refused.done() and isinstance(refused.result(), ssl.SSLError):
        hint = "" if access.tls_ca else f" ({TLS_CA_ENV} names the CA that signed the server's certificate)"
        failure = f"cannot connect to NATS at {url} over TLS: {refused.result()}{hint}"
    elif refused.done():
        who = f"user {access.user!r}" if access.user else (
            f"an anonymous connection (a locked-down broker wants a user: --nats-creds FILE or {CREDS_ENV})"
        )  # fmt: skip
        failure = f"NATS at {url} refused {who}: {refused.result()}"
    elif connecting.done():  # nats-py raises several unrelated types here
        failure = f"cannot connect to NATS at {url}: {connecting.exception()}"
    else:
        failure = f"cannot connect to NATS at {url}: no server answered within {connect_timeout:.0f}s"
    if failure is None:
        return nc
    connecting.cancel()
    await asyncio.wait({connecting})
    with contextlib.suppress(Exception):
        await nc.close()
    raise BrokerUnavailable(failure)
