"""Reading and changing placements and pins with compare-and-set, for every component alike."""

from __future__ import annotations

import time
from collections.abc import Callable

from cortex.broker.bus import Bus
from cortex.broker.errors import BrokerUnavailable
from cortex.protocol import Pin, Placement, codec, names

MAX_ATTEMPTS = 8


class Contended(BrokerUnavailable):
    """A placement kept changing under us for `MAX_ATTEMPTS` tries."""


async def read_placement(bus: Bus, model: str) -> tuple[Placement | None, int]:
    raw, revision = await bus.read_decision(names.placement_key(model))
    if raw is None:
        return None, revision
    try:
        return codec.decode_placement(raw), revision
    except codec.DecodeError:
        return None, revision  # unreadable: the next write replaces it


async def change_placement(
    bus: Bus, model: str, change: Callable[[Placement | None], Placement | None], *, by: str
) -> Placement | None:
    """Apply `change` to the model's current placement until the compare-and-set lands.

    `change` gets the placement as it is (None if there is none) and returns the
    new one, or None to leave it alone; it may run several times. Returns the
    placement in force afterwards.
    """
    for _ in range(MAX_ATTEMPTS):
        current, revision = await read_placement(bus, model)
        new = change(current)
        if new is None:
            return current
        new = Placement(model=model, workers=new.workers, reason=new.reason, failed=new.failed, error=new.error,
                        updated_at=time.time(), by=by)  # fmt: skip
        if await bus.write_decision(names.placement_key(model), codec.encode(new), revision):
            return new
    raise Contended(f"the placement of {model} kept changing; gave up after {MAX_ATTEMPTS} tries")


def without_worker(worker_id: str, reason: str) -> Callable[[Placement | None], Placement | None]:
    """A change that takes `worker_id` out of a placement."""

    def change(current: Placement | None) -> Placement | None:
        if current is None or worker_id not in current.workers:
            return None
        return Placement(model=current.model, workers=[w for w in current.workers if w != worker_id], reason=reason,
                         failed=current.failed)  # fmt: skip

    return change


def with_worker(worker_id: str, reason: str) -> Callable[[Placement | None], Placement | None]:
    """A change that adds `worker_id` (and clears its failure and any error)."""

    def change(current: Placement | None) -> Placement | None:
        workers = list(current.workers) if current else []
        if worker_id in workers and current is not None and not current.error:
            return None
        failed = {w: why for w, why in (current.failed if current else {}).items() if w != worker_id}
        model = current.model if current else ""
        return Placement(model=model, workers=[*workers, worker_id] if worker_id not in workers else workers,
                         reason=reason, failed=failed)  # fmt: skip

    return change


async def read_pins(bus: Bus) -> dict[str, Pin]:
    return (await read_all(bus))[1]


async def read_all(bus: Bus) -> tuple[dict[str, Placement], dict[str, Pin]]:
    """Every placement and every pin, by model, in one read of the bucket (unreadable entries skipped)."""
    placements: dict[str, Placement] = {}
    pins: dict[str, Pin] = {}
    for key, raw in (await bus.read_decisions()).items():
        parsed = names.parse_placement_key(key)
        try:
            if parsed is not None and parsed[0] == "placement":
                placements[parsed[1]] = codec.decode_placement(raw)
            elif parsed is not None and parsed[0] == "pin":
                pin = codec.decode_pin(raw)
                pins[pin.model] = pin
        except codec.DecodeError:
            continue
    return placements, pins
