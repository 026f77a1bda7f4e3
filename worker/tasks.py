"""Small helpers for the worker's background futures."""

from __future__ import annotations

import asyncio
from typing import Any


def looked_at(future: asyncio.Future[Any]) -> None:
    """Mark a finished future's error as seen (asyncio logs one nobody retrieved): a fetch cut short, or a load called
    off, belongs to nobody who could report it. Usable as a done callback."""
    if future.done() and not future.cancelled():
        future.exception()
