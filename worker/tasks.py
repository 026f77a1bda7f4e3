"""Small helpers for the worker's background futures."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("cortex.worker")


def looked_at(future: asyncio.Future[Any]) -> None:
    """Mark a finished future's error as seen (asyncio logs one nobody retrieved): a fetch cut short, or a load called
    off, belongs to nobody who could report it. Usable as a done callback."""
    if future.done() and not future.cancelled():
        future.exception()


CANCEL_AGAIN_S = 0.5
"""How long `cancel_and_wait` waits for a cancelled task before it cancels it again."""


async def cancel_and_wait(tasks: list[asyncio.Task[Any]]) -> None:
    """Cancel `tasks` and wait until every one has ended, cancelling again any that goes on.

    A cancellation can be lost on Python 3.11: `asyncio.wait_for` (inside
    nats-py's requests) drops it when its future completes at the same moment,
    and the task carries on with its loop; a shutdown that waited once would
    wait for ever.
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=CANCEL_AGAIN_S)
    for task in tasks:
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("%s had failed before it was stopped: %r", task.get_name(), error)
