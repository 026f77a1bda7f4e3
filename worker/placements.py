"""The fleet's decisions as this worker watches them, and the placement changes this worker writes.

The worker keeps a copy of the fleet bucket (adverts) and of the decision
bucket (placements, pins, drains), fed by the watches; `cortex.worker.residency`
reads it to know what to hold. Every write is a transition of
`cortex.protocol.placement` applied by `cortex.broker.decisions.change_placement`,
so a worker changes a placement exactly as a gateway or cortexctl would.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from functools import partial

from cortex.broker.bus import Bus
from cortex.broker.decisions import change_placement
from cortex.broker.errors import BrokerError
from cortex.protocol import Pin, Placement, WorkerAdvert, codec, names
from cortex.protocol.placement import (
    Transition,
    add_worker,
    failed_recently,
    leave_above_minimum,
    pick_worker,
    pinned_models,
    recent_failures,
    record_failed_load,
    remove_worker,
)
from cortex.worker.catalogue import ModelSpec

log = logging.getLogger("cortex.worker")


@dataclass
class Placements:
    bus: Bus
    worker_id: str
    catalogue: list[ModelSpec]
    draining: asyncio.Event
    """Set while a `Drain` names this worker (set and cleared here only)."""
    slot_freed: asyncio.Event
    """Shared with the request side: set so that pull loops look again when the worker starts or stops draining."""
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when what this worker should hold may have changed (the residency side reconciles)."""
    _fleet: dict[str, WorkerAdvert] = field(default_factory=dict)
    _placements: dict[str, Placement] = field(default_factory=dict)
    _pins: dict[str, Pin] = field(default_factory=dict)

    # -- what the buckets say -----------------------------------------------------

    def on_advert(self, key: str, value: bytes | None) -> None:
        """The handler of the fleet bucket's watch."""
        if not names.is_worker_key(key):
            return
        if value is None:
            self._fleet.pop(key, None)
            return
        try:
            self._fleet[key] = codec.decode_advert(value)
        except codec.DecodeError:
            self._fleet.pop(key, None)

    def on_decision(self, key: str, value: bytes | None) -> None:
        """The handler of the decision bucket's watch."""
        parsed = names.parse_placement_key(key)
        if parsed is None:
            return
        kind, name = parsed
        try:
            if kind == "placement":
                if value is None:
                    self._placements.pop(name, None)
                else:
                    self._placements[name] = codec.decode_placement(value)
            elif kind == "pin":
                if value is None:
                    self._pins.pop(name, None)
                else:
                    self._pins[name] = codec.decode_pin(value)
            elif name == self.worker_id:
                # Presence is the flag (a `Drain` says only since when): even a hand-written value drains.
                if value is not None:
                    self.draining.set()
                else:
                    self.draining.clear()
                self.slot_freed.set()  # pull loops look again
        except codec.DecodeError:
            log.warning("ignoring malformed %s", key)
            return
        self.changed.set()

    def wanted(self) -> set[str]:
        """The models placed on this worker (none while it drains)."""
        if self.draining.is_set():
            return set()
        return {model for model, p in self._placements.items() if self.worker_id in p.workers}

    def placement(self, model: str) -> Placement:
        """The placement of a model in `wanted`."""
        return self._placements[model]

    def pins(self) -> Collection[Pin]:
        return self._pins.values()

    def pinned_here(self) -> set[str]:
        return pinned_models(self._pins.values(), self.worker_id)

    # -- what this worker writes --------------------------------------------------

    async def _change(self, model: str, change: Transition, failure: str) -> None:
        """Apply `change`; a broker that does not answer is logged (`failure`, with the model and the error)."""
        try:
            await change_placement(self.bus, model, change, by=self.worker_id)
        except BrokerError as exc:
            log.warning(failure, model, exc)

    async def place_here(self, model: str, reason: str) -> None:
        change = partial(add_worker, model=model, worker=self.worker_id, reason=f"{self.worker_id}: {reason}")
        await self._change(model, change, "cannot place %s here: %s")

    async def unplace_here(self, model: str, reason: str) -> None:
        change = partial(remove_worker, worker=self.worker_id, reason=reason)
        await self._change(model, change, "cannot take %s off this worker's placement: %s")

    async def leave_idle(self, model: str, reason: str, min_replicas: int) -> None:
        """Leave the placement of a model idle here, only while its other live workers keep `min_replicas`."""
        live = {a.worker_id for a in self._fleet.values() if not a.draining}
        change = partial(leave_above_minimum, worker=self.worker_id, live=live, min_replicas=min_replicas,
                         reason=reason)  # fmt: skip
        await self._change(model, change, "cannot take idle %s off this worker: %s")

    async def load_failed(self, model: str, reason: str) -> None:
        """Leave the placement with the reason, and hand the model to the next best worker (or record why none)."""
        change = partial(record_failed_load, model=model, worker=self.worker_id, error=reason,
                         adverts=self._fleet.values(), pins=self._pins.values(),
                         placements=self._placements.values())  # fmt: skip
        await self._change(model, change, "cannot record the failed load of %s: %s")

    async def keep_min_replicas(self) -> None:
        """Place models with ``min_replicas`` or a pin before anyone asks.

        Every worker computes the same choice; the chosen one places itself (the
        compare-and-set keeps it to one). A pin to a worker places it there.
        """
        if self.draining.is_set():
            return
        live = {a.worker_id: a for a in self._fleet.values() if not a.draining}
        for spec in self.catalogue:
            pin = self._pins.get(spec.id)
            placement = self._placements.get(spec.id)
            serving = [w for w in (placement.workers if placement else []) if w in live]
            if self.worker_id in serving:
                continue
            if pin is not None and pin.worker == self.worker_id:
                if placement is None or self.worker_id not in placement.failed:
                    await self.place_here(spec.id, "pinned to this worker")
                continue
            wanted = max(spec.min_replicas, pin.replicas if pin is not None and not pin.worker else 0)
            if len(serving) >= wanted:
                continue
            now = time.time()
            if failed_recently(placement, now):
                continue  # nobody could load it a moment ago: no endless retries
            others = [a for w, a in live.items() if w not in serving]
            pick = pick_worker(spec.id, others, self._pins.values(), exclude=recent_failures(placement, now),
                               placements=self._placements.values())  # fmt: skip
            choice = pick.without_eviction()
            if choice is not None and choice.worker == self.worker_id:
                await self.place_here(spec.id, f"keeping {wanted} replica(s) ({choice.reason})")
