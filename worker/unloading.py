"""How a model leaves this worker: claimed at once, its memory counted until it is free.

An unload begins the moment it is decided (`Unloads.begin`): the slot is
``unloading`` at once, so no planner counts it as evictable or its memory as
free again; its pull loop lets go (`cortex.worker.pull_guard`); a load under
way is told to stop at its next phase. Then, in the background, the requests
running finish and the model is parked in the host tier or freed
(`cortex.worker.loading`); only then does the slot go, and its memory with it.

A loader thread cannot be stopped mid-phase: transformers building the model,
``model.to(device)``, weights streaming onto several GPUs for minutes. Until
the thread ends, the slot stays, ``unloading``, its memory counted; then what
it built is freed, or parked again when it came from the host tier. Letting
the slot go sooner let the next load reserve memory the thread was still
filling (a CUDA out-of-memory error), and queue behind the loader thread it
still held.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from cortex.protocol import messages as m
from cortex.worker.advert import WorkerMetrics
from cortex.worker.inflight import FETCH_TIMEOUT_S
from cortex.worker.loading import Loads
from cortex.worker.placements import Placements
from cortex.worker.slot import ModelSlot

log = logging.getLogger("cortex.worker")

LOAD_STOP_S = 1.0
"""How long an unload waits for a load it called off before saying that it waits for the loader thread."""


@dataclass
class Unloads:
    models: dict[str, ModelSlot]
    """The residency's slots (the same dict): a slot leaves it when its unload ends."""
    loads: Loads
    placements: Placements
    metrics: WorkerMetrics
    advertise: Callable[[], Awaitable[None]]
    stopping: asyncio.Event
    slot_freed: asyncio.Event
    """Set when a request ends (the unload waits for those running) and to make pull loops look again."""
    pending: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    """The unloads under way, by model: the memory of each comes free when it ends."""
    kinds: dict[str, str] = field(default_factory=dict)
    """Why a model is about to unload, for the evictions metric (set where the decision is made)."""

    def begin(self, slot: ModelSlot, why: str, kind: str, *, unplace: bool = False) -> None:
        """Start unloading `slot` unless it already is; `kind` labels the evictions metric (a kind set earlier wins).

        With `unplace`, the unload first takes the model off this worker's
        placement, with `why` (an eviction, a load called off), so that once it
        is gone the model does not look wanted here. All of it starts now, in
        `pending`, so a load planning at the same time counts that memory as
        coming free, never as there to evict.
        """
        model = slot.spec.id
        if model in self.pending:
            return
        self._claim(slot)
        self.kinds.setdefault(model, kind)
        self.pending[model] = asyncio.create_task(self._unload(slot, why, unplace), name=f"unload-{model}")

    def _claim(self, slot: ModelSlot) -> None:
        """Mark `slot` as going, at once: no planner counts it as evictable or its memory as free again, its pull
        loop lets go, its load (if any) stops at its next phase."""
        if slot.state != m.MODEL_FAILED:
            slot.state = m.MODEL_UNLOADING
        slot.leaving.set()
        slot.abort.set()
        slot.load_over.set()
        self.slot_freed.set()

    async def _unload(self, slot: ModelSlot, reason: str, unplace: bool) -> None:
        """Stop taking requests for the model, let those running finish, wait for its load to end, then free its
        memory (or park it)."""
        model = slot.spec.id
        try:
            if unplace:
                await self.placements.unplace_here(model, reason)
            await self.advertise()
            await self._load_ended(slot)
            if slot.task is not None:  # its pull loop lets go at once (`LeavingPull`)
                await asyncio.wait([slot.task], timeout=FETCH_TIMEOUT_S + 2.0)
            while slot.in_flight > 0 and not self.stopping.is_set():
                self.slot_freed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.slot_freed.wait(), timeout=1.0)
            if slot.task is not None:
                slot.task.cancel()
                await asyncio.gather(slot.task, return_exceptions=True)
            kind = self.kinds.pop(model, "unplaced")
            park = kind != "drain" and not self.stopping.is_set()
            built = _built(slot)
            if slot.in_engine:
                freed, outcome = await self.loads.put_away(model, park=park and slot.served)
            elif built:
                # Loaded, never served: freed, unless it came from the host tier (then it goes back there).
                freed, outcome = await self.loads.discard(built, park=park and getattr(built[0], "from_host", False))
                log.info("the load of %s ended after it was called off: %s", model, outcome)
                return
            else:
                return
            log.info("unloaded %s (%s); %s", model, reason, outcome)
            if slot.served or freed:
                self.metrics.evicted(kind)
        finally:
            if self.models.get(model) is slot:
                del self.models[model]
            self.pending.pop(model, None)
            self.kinds.pop(model, None)
            self.placements.changed.set()  # it may have been placed here again meanwhile
            await self.advertise()

    async def _load_ended(self, slot: ModelSlot) -> None:
        """Wait for the slot's load to end: at its next phase once called off, or when its thread has finished a
        phase that cannot be called off (its memory counted meanwhile: the slot is still here)."""
        if slot.load is None or slot.load.done():
            return
        done, _ = await asyncio.wait([slot.load], timeout=LOAD_STOP_S)  # waits; never cancels the load
        if not done:
            log.info("the load of %s cannot stop before its current phase ends: its memory stays counted until then",
                     slot.spec.id)  # fmt: skip
            await asyncio.wait([slot.load])


def _built(slot: ModelSlot) -> list[Any]:
    """What the slot's load built that the engine never got (a load called off in a phase it could not stop), in
    a list holding the only reference to it (the slot lets go of its load here), so that freeing it frees its
    memory; empty if nothing."""
    load, slot.load = slot.load, None
    if slot.in_engine or load is None or not load.done() or load.cancelled() or load.exception() is not None:
        return []  # the exception is the serving task's to report: retrieved here too, never logged as lost
    return [load.result()]
