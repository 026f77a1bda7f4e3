"""Where a model should load: one deterministic choice over the fleet's adverts.

Gateways (load on demand), workers (after a failed load) and cortexctl all
decide with this same function over the same KV state, so they agree; the
compare-and-set on the placement key makes sure only one decision lands.

The rules, in order: never a draining worker, a worker that already failed to
load the model, or one whose budget the model exceeds; a worker with room over
one that must evict; fewer evictions over more; colder evictions over warmer
ones; more memory left over less; then the worker id, so ties break the same
way everywhere. Eviction never touches a pinned model or one with requests in
flight.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import msgspec

from cortex.protocol.messages import MODEL_LOADING, MODEL_READY, ModelState, Pin, Placement, WorkerAdvert

STRATEGIES = ("lru", "priority")
"""``lru``: the least recently used model goes first; ``priority``: the lowest `priority`, then the least recent."""


@dataclass(frozen=True)
class Choice:
    worker: str
    evict: list[str]
    reason: str


def _with_pending(advert: WorkerAdvert, placements: Iterable[Placement]) -> WorkerAdvert:
    """`advert` with the models placed on its worker but not in its advert yet, as loading (they take memory)."""
    held = {state.id for state in advert.models}
    pending = []
    for placement in placements:
        card = advert.card(placement.model)
        if advert.worker_id in placement.workers and placement.model not in held and card is not None:
            pending.append(ModelState(id=placement.model, state=MODEL_LOADING, memory=card.memory))
    if not pending:
        return advert
    reserved = advert.memory_reserved + sum(state.memory for state in pending)
    return msgspec.structs.replace(advert, models=[*advert.models, *pending], memory_reserved=reserved)


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def budget_of(advert: WorkerAdvert) -> int:
    return advert.memory_budget or advert.memory_total


def free_memory(advert: WorkerAdvert) -> int:
    return budget_of(advert) - advert.memory_used - advert.memory_reserved


def pinned_models(pins: Iterable[Pin], worker_id: str) -> set[str]:
    """Models a pin keeps on `worker_id`: a pin to a worker keeps it there, a pin by count keeps it everywhere."""
    return {p.model for p in pins if not p.worker or p.worker == worker_id}


def _evictable(state: ModelState, *, busy_too: bool) -> bool:
    if busy_too:  # a model still loading or busy can be swapped out once its requests are done
        return state.state in (MODEL_READY, MODEL_LOADING)
    return state.state == MODEL_READY and not (state.in_flight or state.queue_depth)


def plan_evictions(advert: WorkerAdvert, need: int, pins: Iterable[Pin], *, busy_too: bool = False) -> list[str] | None:
    """Models to unload from `advert`'s worker so `need` bytes fit (by its strategy); None if they cannot.

    `busy_too` also counts models with requests running or queued (a swap that
    has to wait for them); pinned models never count.
    """
    free = free_memory(advert)
    if need <= free:
        return []
    keep = pinned_models(pins, advert.worker_id)
    evictable = [m for m in advert.models if m.id not in keep and _evictable(m, busy_too=busy_too)]
    priorities = {c.id: c.priority for c in advert.catalogue}
    if advert.eviction == "priority":
        evictable.sort(key=lambda m: (priorities.get(m.id, 0), m.last_used, m.id))
    else:
        evictable.sort(key=lambda m: (m.last_used, m.id))
    victims: list[str] = []
    for state in evictable:
        victims.append(state.id)
        free += state.memory
        if need <= free:
            return victims
    return None


def choose_worker(
    model: str,
    adverts: Iterable[WorkerAdvert],
    pins: Iterable[Pin],
    *,
    exclude: Iterable[str] = (),
    placements: Iterable[Placement] = (),
) -> Choice | str:
    """The worker that should load `model`, or the reason no worker can.

    `placements` count too: a model placed on a worker that has not started
    loading it yet (its advert lags) already takes that worker's memory, so a
    burst of cold models spreads over the fleet instead of piling onto one worker.
    """
    pins = list(pins)
    skip = set(exclude)
    adverts = [_with_pending(a, placements) for a in adverts]
    ranked: list[tuple[tuple[object, ...], Choice]] = []
    against: list[str] = []
    known = False
    for advert in sorted(adverts, key=lambda a: a.worker_id):
        card = advert.card(model)
        if card is None:
            continue
        known = True
        name = advert.worker_id
        if advert.draining:
            against.append(f"{name} is draining")
            continue
        state = advert.state_of(model)
        if state is not None and state.state in (MODEL_READY, MODEL_LOADING) and name not in skip:
            return Choice(name, [], f"{name} has it {state.state}")
        if name in skip:
            against.append(f"{name} failed to load it")
            continue
        if card.gpus > advert.devices:
            against.append(f"{name} has {advert.devices} device(s) and the model needs {card.gpus}")
            continue
        if card.memory > budget_of(advert):
            against.append(f"{name} has {gib(budget_of(advert))} in all and the model needs {gib(card.memory)}")
            continue
        victims = plan_evictions(advert, card.memory, pins)
        waits = False
        if victims is None:
            # Only busy models stand in the way: the worker swaps once they drain (or its wait cap passes).
            victims = plan_evictions(advert, card.memory, pins, busy_too=True)
            waits = True
        if victims is None:
            against.append(f"{name} cannot free {gib(card.memory)} (its models are pinned)")
            continue
        lasts = [s.last_used for s in advert.models if s.id in victims]
        freed = sum(s.memory for s in advert.models if s.id in victims)
        left = free_memory(advert) + freed - card.memory
        cost = (waits, bool(victims), len(victims), max(lasts, default=0.0), -left, name)
        how = f"evicting {', '.join(victims)} ({advert.eviction})" if victims else "no eviction"
        how += " once their requests are done" if waits else ""
        ranked.append((cost, Choice(name, victims, f"{name}: {gib(free_memory(advert))} free, {how}")))
    if not known:
        return f"no live worker has {model} in its catalogue"
    if not ranked:
        return f"no worker can load {model}: " + "; ".join(against)
    ranked.sort(key=lambda pair: pair[0])
    best = ranked[0][1]
    others = [choice.worker for _, choice in ranked[1:]]
    reason = best.reason + (f" (preferred over {', '.join(others)})" if others else "")
    return Choice(best.worker, best.evict, reason)
