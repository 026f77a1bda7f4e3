"""A model as the residency holds it on this worker: its state, its memory, its load and its pull loop."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from cortex.broker.pull import PullQueue
from cortex.protocol import messages as m
from cortex.worker.catalogue import ModelSpec


@dataclass
class ModelSlot:
    spec: ModelSpec
    state: str = m.MODEL_LOADING
    error: str = ""
    context_length: int = 0
    in_flight: int = 0
    reasoning: bool = False
    memory: int = 0
    last_used: float = 0.0
    queue_depth: int = 0
    failed_at: float = 0.0
    loading_since: float = 0.0
    expected_load_s: float = 0.0
    leaving: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the model is to unload: its pull loop stops taking requests."""
    abort: threading.Event = field(default_factory=threading.Event)
    """Set to call its load off: the loader raises `LoadAborted` before its next phase."""
    load_over: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once its load has ended, whichever way, or it is leaving (the watch on its queue stops)."""
    served: bool = False
    """It became ready here (so its unload counts as an eviction, and it may be parked)."""
    in_engine: bool = False
    """Its model was handed to the engine: an unload takes it out of there."""
    load: asyncio.Future[Any] | None = None
    """Its load on a loader thread (`cortex.worker.loading.Loads.start`): awaited shielded, never cancelled, and
    until it is done its memory is in use, whatever became of the slot."""
    task: asyncio.Task[None] | None = None
    pull: PullQueue | None = None

    @property
    def model(self) -> str:
        return self.spec.id


def progress(slot: ModelSlot) -> float:
    """How far a load has got, judged by the time the last load of the model took (transformers reports none)."""
    if slot.state == m.MODEL_READY:
        return 1.0
    if slot.state != m.MODEL_LOADING or not slot.expected_load_s:
        return 0.0
    return min(0.99, (time.monotonic() - slot.loading_since) / slot.expected_load_s)
