"""Where a model should load, and every change to a placement, as pure functions over the fleet's state.

Gateways (load on demand), workers (after a failed load) and cortexctl all
decide with the same functions over the same KV state, so they agree; the
compare-and-set on the placement key (`cortex.broker.decisions.change_placement`)
makes sure only one decision lands. Nothing here does I/O.

The rules of `choose_worker`, in order: never a draining worker, a worker that
already failed to load the model, or one whose budget the model exceeds; a
worker that can make room at once over one that must wait for busy models; a
worker holding the model in its host tier (a copy back to the device, where
others load it from disk) over one that does not; a worker with room over one
that must evict; fewer evictions over more; colder evictions over warmer ones;
more memory left over less; then the worker id, so ties break the same way
everywhere. Eviction never touches a pinned model or
one with requests in flight.

Every transition of a placement is a function of the "transitions" section: it gets
the placement as it is (None if there is none) and returns the new one, or None
to leave it alone. Bind its keyword arguments with `functools.partial` and hand
it to `change_placement`, which may call it several times.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass

import msgspec

from cortex.protocol.messages import (
    MODEL_FAILED,
    MODEL_LOADING,
    MODEL_READY,
    ModelState,
    Pin,
    Placement,
    WorkerAdvert,
)

RETRY_FAILED_S = 30.0
"""A model no worker could load is not tried again for this long (workers come and go), by gateways or workers."""

Transition = Callable[[Placement | None], Placement | None]
"""A change of one model's placement: the placement as it is (None: none yet) to the new one (None: leave it)."""


# -- eviction policies ----------------------------------------------------------

EvictionPolicy = Callable[[WorkerAdvert, list[ModelState]], list[ModelState]]
"""Orders the models a worker could evict, the first to go first."""

EVICTION_POLICIES: dict[str, EvictionPolicy] = {}
"""Every eviction strategy, by the name ``cortex-worker --eviction`` takes.

To add one, write a function in this section that takes a worker's advert and
the models it may evict (never pinned ones, and busy ones only when a swap
waits for them) and returns them in the order they should go, and register it
with ``@eviction_policy("name")``. That is all: `cortex-worker --eviction`
offers every registered name, the worker advertises its choice, and every
gateway, worker and cortexctl ranks evictions on that worker with it (a name a
process does not know is ranked as ``lru``). The name also labels
``cortex_evictions_total{reason}``, so keep it short.
"""


def eviction_policy(name: str) -> Callable[[EvictionPolicy], EvictionPolicy]:
    """Register the decorated function in `EVICTION_POLICIES` under `name`."""

    def register(policy: EvictionPolicy) -> EvictionPolicy:
        EVICTION_POLICIES[name] = policy
        return policy

    return register


@eviction_policy("lru")
def lru(advert: WorkerAdvert, evictable: list[ModelState]) -> list[ModelState]:
    """The least recently used model goes first."""
    return sorted(evictable, key=lambda m: (m.last_used, m.id))


@eviction_policy("priority")
def priority(advert: WorkerAdvert, evictable: list[ModelState]) -> list[ModelState]:
    """The lowest catalogue `priority` goes first, then the least recently used."""
    priorities = {c.id: c.priority for c in advert.catalogue}
    return sorted(evictable, key=lambda m: (priorities.get(m.id, 0), m.last_used, m.id))


# -- the choice -----------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """A worker to load the model, the models it evicts to make room (maybe once they are idle), and why."""

    worker: str
    evict: list[str]
    reason: str
    waits: bool = False
    """The evictions wait for busy models to finish their requests (a swap), rather than happening at once."""


@dataclass(frozen=True)
class Pick:
    """`choose_worker`'s answer in the one shape callers use: the `choice`, or None and `reason` says why."""

    choice: Choice | None
    reason: str
    """The choice's reason, or why no worker can load the model."""

    def without_eviction(self) -> Choice | None:
        """The choice if it evicts nothing (a replica added for a deep queue never pushes a model out)."""
        return self.choice if self.choice is not None and not self.choice.evict else None

    def without_waiting(self) -> Choice | None:
        """The choice if it can load at once, evicting only idle models (a kept pin never waits for a swap)."""
        return self.choice if self.choice is not None and not self.choice.waits else None


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
    """Models to unload from `advert`'s worker so `need` bytes fit (by its eviction policy); None if they cannot.

    `busy_too` also counts models with requests running or queued (a swap that
    has to wait for them); pinned models never count.
    """
    free = free_memory(advert)
    if need <= free:
        return []
    keep = pinned_models(pins, advert.worker_id)
    evictable = [m for m in advert.models if m.id not in keep and _evictable(m, busy_too=busy_too)]
    order = EVICTION_POLICIES.get(advert.eviction, lru)
    victims: list[str] = []
    for state in order(advert, evictable):
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
    """The worker that should load `model`, or the reason no worker can (callers use `pick_worker`).

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
        cached = model in advert.host_cached  # loading it there is a copy from host memory, not a load from disk
        cost = (waits, not cached, bool(victims), len(victims), max(lasts, default=0.0), -left, name)
        how = f"evicting {', '.join(victims)} ({advert.eviction})" if victims else "no eviction"
        how += " once their requests are done" if waits else ""
        how += ", from its host tier" if cached else ""
        ranked.append((cost, Choice(name, victims, f"{name}: {gib(free_memory(advert))} free, {how}", waits)))
    if not known:
        return f"no live worker has {model} in its catalogue"
    if not ranked:
        return f"no worker can load {model}: " + "; ".join(against)
    ranked.sort(key=lambda pair: pair[0])
    best = ranked[0][1]
    others = [choice.worker for _, choice in ranked[1:]]
    reason = best.reason + (f" (preferred over {', '.join(others)})" if others else "")
    return Choice(best.worker, best.evict, reason, best.waits)


def pick_worker(
    model: str,
    adverts: Iterable[WorkerAdvert],
    pins: Iterable[Pin],
    *,
    exclude: Iterable[str] = (),
    placements: Iterable[Placement] = (),
) -> Pick:
    """`choose_worker` as a `Pick`: how gateways, workers and cortexctl ask who should load `model`."""
    result = choose_worker(model, adverts, pins, exclude=exclude, placements=placements)
    return Pick(None, result) if isinstance(result, str) else Pick(result, result.reason)


def serving_workers(placement: Placement | None, model: str, live: Mapping[str, WorkerAdvert]) -> list[str]:
    """The workers of `placement` that are alive, not draining, and have not failed to load the model."""
    if placement is None:
        return []
    out = []
    for worker in placement.workers:
        advert = live.get(worker)
        if advert is None or advert.draining or advert.card(model) is None:
            continue  # gone, leaving, or never able to load it
        state = advert.state_of(model)
        if state is None or state.state != MODEL_FAILED:
            out.append(worker)
    return out


def recent_failures(placement: Placement | None, now: float) -> dict[str, str]:
    """The workers that failed to load the model, while they are not to be tried again (`RETRY_FAILED_S`)."""
    return placement.failed if placement is not None and now - placement.updated_at < RETRY_FAILED_S else {}


def failed_recently(placement: Placement | None, now: float) -> bool:
    """Nobody could load the model a moment ago: answering 503 again needs no new attempt yet."""
    return placement is not None and bool(placement.error) and now - placement.updated_at < RETRY_FAILED_S


# -- transitions ----------------------------------------------------------------


def add_worker(current: Placement | None, *, model: str, worker: str, reason: str) -> Placement | None:
    """`worker` loads the model (cortexctl load and pin, a worker placing itself); its failure and any error go."""
    workers = list(current.workers) if current else []
    if worker in workers and current is not None and not current.error:
        return None
    failed = {w: why for w, why in (current.failed if current else {}).items() if w != worker}
    return Placement(model=current.model if current else model, reason=reason, failed=failed,
                     workers=workers if worker in workers else [*workers, worker])  # fmt: skip


def remove_worker(current: Placement | None, *, worker: str, reason: str) -> Placement | None:
    """`worker` unloads the model (evicted there, cortexctl unload --worker)."""
    if current is None or worker not in current.workers:
        return None
    return Placement(model=current.model, workers=[w for w in current.workers if w != worker], reason=reason,
                     failed=current.failed)  # fmt: skip


def remove_all_workers(current: Placement | None, *, reason: str) -> Placement | None:
    """Every worker unloads the model (cortexctl unload); the failures stay on record."""
    if current is None or not current.workers:
        return None
    return Placement(model=current.model, reason=reason, failed=current.failed)


def add_replica(current: Placement | None, *, worker: str, reason: str, max_replicas: int) -> Placement | None:
    """`worker` loads another copy of a placed model, up to `max_replicas` (checked again at write time)."""
    if current is None or worker in current.workers or len(current.workers) >= max_replicas:
        return None
    return Placement(model=current.model, workers=[*current.workers, worker], reason=reason, failed=current.failed)


def leave_above_minimum(
    current: Placement | None, *, worker: str, live: Collection[str], min_replicas: int, reason: str
) -> Placement | None:
    """`worker` leaves (idle past keep_alive) only while the `live` others keep `min_replicas`; dead ones go too."""
    if current is None or worker not in current.workers:
        return None
    others = [w for w in current.workers if w != worker and w in live]
    if len(others) < min_replicas:
        return None  # the fleet keeps at least min_replicas of it
    return Placement(model=current.model, workers=others, reason=reason, failed=current.failed)


def place_on_demand(
    current: Placement | None,
    *,
    model: str,
    live: Mapping[str, WorkerAdvert],
    pins: Iterable[Pin],
    placements: Iterable[Placement],
    now: float,
) -> Placement | None:
    """The best `live` worker loads a model asked for, unless one serves it or nobody could a moment ago.

    Workers whose advert or recent placement says they failed to load it are
    skipped; when none can, the placement carries the reason as its `error`
    (the gateway answers 503 with it until `RETRY_FAILED_S` passes).
    """
    if serving_workers(current, model, live) or failed_recently(current, now):
        return None
    previous = recent_failures(current, now)
    failed = {w for w, a in live.items() if (s := a.state_of(model)) is not None and s.state == MODEL_FAILED}
    pick = pick_worker(model, live.values(), pins, exclude=failed | set(previous), placements=placements)
    if pick.choice is None:
        return Placement(model=model, reason=pick.reason, failed=previous, error=pick.reason)
    return Placement(model=model, workers=[pick.choice.worker], reason=pick.reason, failed=previous)


def record_failed_load(
    current: Placement | None,
    *,
    model: str,
    worker: str,
    error: str,
    adverts: Iterable[WorkerAdvert],
    pins: Iterable[Pin],
    placements: Iterable[Placement],
) -> Placement:
    """`worker` could not load the model: it leaves with `error`, and the next best worker gets it (or none can)."""
    failed = {**(current.failed if current else {}), worker: error}
    workers = [w for w in (current.workers if current else []) if w != worker]
    if workers:
        return Placement(model=model, workers=workers, reason=current.reason if current else "", failed=failed)
    pick = pick_worker(model, adverts, pins, exclude=failed, placements=placements)
    if pick.choice is None:
        return Placement(model=model, reason=pick.reason, failed=failed, error=f"{pick.reason} ({error})")
    return Placement(model=model, workers=[pick.choice.worker], failed=failed,
                     reason=f"{pick.reason}, after {worker} failed")  # fmt: skip


def keep_replicas(
    current: Placement | None,
    *,
    model: str,
    wanted: int,
    why: str,
    live: Mapping[str, WorkerAdvert],
    pins: Iterable[Pin],
    placements: Iterable[Placement],
    now: float,
) -> Placement | None:
    """A pinned or ``min_replicas`` model back to `wanted` copies on `live` workers (dead and draining ones leave).

    `live` holds the workers that count now, none draining. Each missing copy
    goes to the best live worker that can load the model at once, evicting
    idle unpinned models if it must (never waiting for busy ones, never one
    that failed to load it lately); the workers that died, drain or failed
    leave the placement, so a restarted one does not load an extra copy. None
    when the model has its copies, nobody could load it a moment ago, or no
    worker can take it now (every worker asks again on its next upkeep tick).
    """
    serving = serving_workers(current, model, live)
    if len(serving) >= wanted or failed_recently(current, now):
        return None
    skip = {w for w, a in live.items() if (s := a.state_of(model)) is not None and s.state == MODEL_FAILED}
    skip |= set(recent_failures(current, now))
    chosen: list[Choice] = []
    while len(serving) + len(chosen) < wanted:
        taken = {*serving, *(c.worker for c in chosen)}
        others = [a for w, a in live.items() if w not in taken]
        choice = pick_worker(model, others, pins, exclude=skip, placements=placements).without_waiting()
        if choice is None:
            break
        chosen.append(choice)
    if not chosen:
        return None
    added = [c.worker for c in chosen]
    left = [w for w in (current.workers if current else []) if w not in serving]
    reason = "; ".join(c.reason for c in chosen) + f" (keeping {wanted}: {why}"
    reason += f"; {', '.join(left)} left)" if left else ")"
    failed = {w: error for w, error in (current.failed if current else {}).items() if w not in added}
    return Placement(model=model, workers=[*serving, *added], reason=reason, failed=failed)
