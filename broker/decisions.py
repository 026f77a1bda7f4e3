"""Reading and changing placements and pins with compare-and-set, for every component alike.

What a change does is decided by a transition of `cortex.protocol.placement`
(pure, no I/O); `change_placement` is the one writer that applies it::

    await change_placement(bus, model, partial(add_worker, model=model, worker="w1", reason="..."), by="cortexctl")
"""

from __future__ import annotations

import time

import msgspec

from cortex.broker.bus import Bus
from cortex.broker.errors import BrokerUnavailable
from cortex.protocol import Pin, Placement, codec, names
from cortex.protocol.placement import Transition

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


async def change_placement(bus: Bus, model: str, change: Transition, *, by: str) -> Placement | None:
    """Apply `change` (a transition of `cortex.protocol.placement`) until the compare-and-set lands.

    `change` gets the placement as it is (None if there is none) and returns the
    new one, or None to leave it alone; it runs again on a fresh read whenever
    someone else wrote first. The revision written is stamped with the time and
    `by`. Returns the placement in force afterwards.
    """
    for _ in range(MAX_ATTEMPTS):
        current, revision = await read_placement(bus, model)
        new = change(current)
        if new is None:
            return current
        new = msgspec.structs.replace(new, model=model, updated_at=time.time(), by=by)
        if await bus.write_decision(names.placement_key(model), codec.encode(new), revision):
            return new
    raise Contended(f"the placement of {model} kept changing; gave up after {MAX_ATTEMPTS} tries")


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
