"""Admin actions on the fleet (load, unload, pin, unpin, drain, undrain), shared by cortexctl and the fleet page.

Each action checks what it can first (the model is in a live worker's
catalogue, the worker is live, the model is not pinned...), raising `Refused`
with one line that says why; then appends itself to the audit trail; and only
then writes the placement bucket. An action whose record the trail cannot take
is therefore not carried out: on a locked-down broker the gateway's NATS user
may not append to ``CORTEX_AUDIT`` (nor write pins or drains), so the fleet
page's buttons there fail with nothing changed rather than change the fleet
unrecorded. ::

    message = await load(bus, "qwen", actor=Actor(via="cortexctl", by="cortexctl"))
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from functools import partial

from cortex.broker import audit
from cortex.broker.bus import Bus
from cortex.broker.decisions import change_placement, read_pins
from cortex.protocol import Drain, Pin, WorkerAdvert, codec, names
from cortex.protocol.choice import pick_worker
from cortex.protocol.liveness import LiveFleet
from cortex.protocol.placement import add_worker, remove_all_workers, remove_worker


class Refused(Exception):
    """An action that cannot be carried out (unknown model, pinned model...): said in one line."""


@dataclass(frozen=True)
class Actor:
    """Who acts, as each record names them."""

    via: str
    """How placement reasons name the action's origin: ``cortexctl`` (``cortexctl load``), ``fleet page``."""
    by: str
    """The placement's `by`: who wrote the revision."""
    who: str | None = None
    """The audit trail's `who`; None: this process's operator (``login@host``)."""


CTL = Actor(via="cortexctl", by="cortexctl")


async def live_adverts(bus: Bus) -> list[WorkerAdvert]:
    """The live workers' adverts, by id: the gateways' rule (`LiveFleet`) over the fleet and heartbeats as they are."""
    fleet, now = LiveFleet(), time.monotonic()
    for key, value in [*(await bus.read_fleet()).items(), *(await bus.read_heartbeats()).items()]:
        with contextlib.suppress(codec.DecodeError):  # an advert that does not decode is left out
            fleet.on_change(key, value, now)
    return sorted(fleet.live(now), key=lambda advert: advert.worker_id)


def model_id(adverts: list[WorkerAdvert], name: str) -> str:
    """The catalogue id a name (id or alias) stands for in some live worker's catalogue; raises Refused."""
    for advert in adverts:
        for card in advert.catalogue:
            if name == card.id or name in card.aliases:
                return card.id
    raise Refused(f"no live worker has {name!r} in its catalogue")


def check_worker(adverts: list[WorkerAdvert], worker: str, model: str) -> None:
    """Raise Refused unless `worker` is live, has `model` in its catalogue and is not draining."""
    advert = next((a for a in adverts if a.worker_id == worker), None)
    if advert is None:
        raise Refused(f"no live worker is called {worker!r}")
    if advert.card(model) is None:
        raise Refused(f"{worker} has no {model} in its catalogue")
    if advert.draining:
        raise Refused(f"{worker} is draining")


async def choose(
    bus: Bus, adverts: list[WorkerAdvert], model: str, *, worker: str | None, replicas: int, why: str
) -> list[tuple[str, str]]:
    """Where to place `model`: on `worker`, or on up to `replicas` workers by the placement policy (worker, reason).

    Raises Refused when no worker can take it at all.
    """
    if worker is not None:
        check_worker(adverts, worker, model)
        return [(worker, f"{worker}: {why} --worker")]
    pins = (await read_pins(bus)).values()
    choices: list[tuple[str, str]] = []
    for _ in range(replicas):
        pick = pick_worker(model, [a for a in adverts if a.worker_id not in dict(choices)], pins)
        if pick.choice is None:
            if not choices:
                raise Refused(pick.reason)
            break
        choices.append((pick.choice.worker, f"{pick.reason} ({why})"))
    return choices


async def place(bus: Bus, model: str, choices: list[tuple[str, str]], actor: Actor) -> None:
    """Write each (worker, reason) of `choices` into the model's placement."""
    for target, reason in choices:
        change = partial(add_worker, model=model, worker=target, reason=reason)
        await change_placement(bus, model, change, by=actor.by)


async def load(bus: Bus, model: str, *, worker: str | None = None, actor: Actor = CTL) -> str:
    """Load a model now, on the best worker (or `worker`)."""
    adverts = await live_adverts(bus)
    model = model_id(adverts, model)
    placed = await choose(bus, adverts, model, worker=worker, replicas=1, why=f"{actor.via} load")
    await audit.record(bus, "load", model, f"on {placed[0][0]}", actor.who)
    await place(bus, model, placed, actor)
    return f"{model} placed on {placed[0][0]}: {placed[0][1]}"


async def unload(bus: Bus, model: str, *, worker: str | None = None, actor: Actor = CTL) -> str:
    """Unload a model from every worker (or from `worker`); refused while it is pinned."""
    model = model_id(await live_adverts(bus), model)
    if model in await read_pins(bus):
        raise Refused(f"{model} is pinned; unpin it first")
    if worker is not None:
        await audit.record(bus, "unload", model, f"from {worker}", actor.who)
        change = partial(remove_worker, worker=worker, reason=f"{actor.via} unload --worker")
        await change_placement(bus, model, change, by=actor.by)
        return f"{model} unloading from {worker}"
    await audit.record(bus, "unload", model, "everywhere", actor.who)
    await change_placement(bus, model, partial(remove_all_workers, reason=f"{actor.via} unload"), by=actor.by)
    return f"{model} unloading everywhere"


async def pin(bus: Bus, model: str, *, replicas: int = 1, worker: str | None = None, actor: Actor = CTL) -> str:
    """Keep a model loaded on `replicas` workers (or on `worker`), and place it there now."""
    if replicas < 1:
        raise Refused("a pin keeps at least 1 replica")
    adverts = await live_adverts(bus)
    model = model_id(adverts, model)
    if worker is not None:
        check_worker(adverts, worker, model)
    detail = f"replicas {replicas}" + (f", on {worker}" if worker else "")
    await audit.record(bus, "pin", model, detail, actor.who)
    value = codec.encode(Pin(model=model, replicas=replicas, worker=worker or "", pinned_at=time.time()))
    await bus.put_decision(names.pin_key(model), value)
    placed = await choose(bus, adverts, model, worker=worker, replicas=replicas, why=f"{actor.via} pin")
    await place(bus, model, placed, actor)
    if not placed:
        return f"{model} pinned; not loaded yet: no worker can take it now"
    return f"{model} pinned on {', '.join(w for w, _ in placed)}"


async def unpin(bus: Bus, model: str, *, actor: Actor = CTL) -> str:
    """Let a pinned model be evicted and unload when idle again."""
    key = names.pin_key(model)
    if (await bus.read_decision(key))[0] is None:  # a pin is kept under the name it was given
        key = names.pin_key(model_id(await live_adverts(bus), model))
        if (await bus.read_decision(key))[0] is None:
            return f"{model} was not pinned"
    await audit.record(bus, "unpin", model, who=actor.who)
    await bus.delete_decision(key)
    return f"{model} unpinned"


async def drain(bus: Bus, worker: str, *, actor: Actor = CTL) -> str:
    """Finish a worker's requests, take no new ones, unload its models (kept in KV until undrain)."""
    await audit.record(bus, "drain", worker, who=actor.who)
    await bus.put_decision(names.drain_key(worker), codec.encode(Drain(since=time.time())))
    live = {a.worker_id for a in await live_adverts(bus)}
    return f"{worker} draining" + ("" if worker in live else " (it is not live now: it drains when it starts)")


async def undrain(bus: Bus, worker: str, *, actor: Actor = CTL) -> str:
    """Let a drained worker take requests again (models load on demand)."""
    await audit.record(bus, "undrain", worker, who=actor.who)
    await bus.delete_decision(names.drain_key(worker))
    return f"{worker} back in service"
