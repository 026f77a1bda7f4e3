"""How every cortexctl command talks to NATS: a connection of its own for one action, a broker error said in one
line (``cortexctl <command>: ...``, exit status 1)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import typer

from cortex.broker.bus import Bus
from cortex.broker.errors import BrokerError

T = TypeVar("T")


async def on_bus(url: str, action: Callable[[Bus], Awaitable[T]]) -> T:
    """`action(bus)` on a connection of its own, closed afterwards."""
    bus = await Bus.open(url, name="cortexctl")
    try:
        return await action(bus)
    finally:
        await bus.close()


def run(what: str, work: Coroutine[Any, Any, T]) -> T:
    """Run `work`; a broker error ends the command `what` with its message and exit status 1."""
    try:
        return asyncio.run(work)
    except BrokerError as exc:
        typer.echo(f"cortexctl {what}: {exc}", err=True)
        raise typer.Exit(1) from None


def run_on_bus(url: str, what: str, action: Callable[[Bus], Awaitable[T]]) -> T:
    return run(what, on_bus(url, action))
