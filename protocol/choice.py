"""Which worker should load a model, and what it would evict: pure functions over the fleet's adverts.

The rules of `choose_worker`, in order: never a draining worker, a worker that
already failed to load the model, or one whose budget the model exceeds; a
worker that can make room at once over one that must wait for busy models; a
worker holding the model in its host tier (a copy back to the device, where
others load it from disk) over one that does not; a worker with room over one
that must evict; fewer evictions over more; colder evictions over warmer ones;
more memory left over less; then the worker id, so ties break the same way
everywhere. Eviction never touches a pinned model or
one with requests in flight.

Gateways, workers and cortexctl call these through the transitions of
`cortex.protocol.placement`; nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import msgspec

from cortex.protocol.messages import (
    MODEL_FAILED,
    MODEL_LOADING,
    MODEL_READY,
    ModelCard,
    ModelState,
    Pin,
    Placement,
    WorkerAdvert,
)
from cortex.protocol.retries import RETRY_FAILED_S, held_until

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


def _with_pending(
    advert: WorkerAdvert, placements: Iterable[Placement], cards: Mapping[str, ModelCard] | None = None
) -> WorkerAdvert:
    """`advert` with the models placed on its worker but not in its advert yet, as loading (they take memory).

    The worker is checked before the catalogue (most placements name other workers); `cards` is the advert's
    catalogue by id when the caller has it (`_Index`), else each pending model's card is looked up in the list.
    """
    held = {state.id for state in advert.models}
    pending = []
    for placement in placements:
        if advert.worker_id not in placement.workers or placement.model in held:
            continue
        card = cards.get(placement.model) if cards is not None else advert.card(placement.model)
        if card is not None:
            pending.append(ModelState(id=placement.model, state=MODEL_LOADING, memory=card.memory))
    if not pending:
        return advert
    reserved = advert.memory_reserved + sum(state.memory for state in pending)
    return msgspec.structs.replace(advert, models=[*advert.models, *pending], memory_reserved=reserved)


class _Index:
    """What one `choose_worker` call looks up again and again, built once for the call.

    Placements by the workers they name, so each advert meets only its own (not every placement); and each
    catalogue's cards by id, built the first time the catalogue is asked about and keyed by the list's identity
    (adverts that share one catalogue list share one index; every advert outlives the call, so ids are not
    reused meanwhile). Without it a decision cost workers x placements x catalogue.
    """

    def __init__(self, placements: list[Placement]) -> None:
        self.by_worker: dict[str, list[Placement]] = {}
        for placement in placements:
            for worker in dict.fromkeys(placement.workers):
                self.by_worker.setdefault(worker, []).append(placement)
        self._cards: dict[int, dict[str, ModelCard]] = {}

    def cards(self, advert: WorkerAdvert) -> dict[str, ModelCard]:
        """`advert`'s catalogue by id (the first card of an id wins, as `WorkerAdvert.card` finds it)."""
        catalogue = advert.catalogue
        index = self._cards.get(id(catalogue))
        if index is None:
            index = self._cards[id(catalogue)] = {card.id: card for card in reversed(catalogue)}
        return index

    def with_pending(self, advert: WorkerAdvert) -> WorkerAdvert:
        """`_with_pending` over the placements naming `advert`'s worker."""
        mine = self.by_worker.get(advert.worker_id)
        return _with_pending(advert, mine, self.cards(advert)) if mine else advert


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**27 else f"{n / 2**20:.1f} MiB"


def budget_of(advert: WorkerAdvert) -> int:
    return advert.memory_budget or advert.memory_total


def free_memory(advert: WorkerAdvert) -> int:
    return budget_of(advert) - advert.memory_used - advert.memory_reserved


def pinned_copies(placement: Placement, replicas: int) -> list[str]:
    """The workers whose copies a pin by count keeps: the first `replicas` of the placement (extras come after)."""
    return list(placement.workers[:replicas])


def pinned_workers(pin: Pin | None, placement: Placement | None) -> list[str]:
    """The workers of `placement` whose copies `pin` keeps (as `pinned_models` counts them); the others hold extra,
    ordinary copies."""
    if placement is None or pin is None:
        return []
    return [w for w in placement.workers if pin.model in pinned_models([pin], w, {pin.model: placement})]


def pinned_models(pins: Iterable[Pin], worker_id: str, placements: Mapping[str, Placement] | None = None) -> set[str]:
    """Models a pin keeps on `worker_id`.

    A pin to a worker keeps the model there. A pin by count keeps the copies on
    the first `Pin.replicas` workers of the model's placement (`pinned_copies`):
    copies beyond them are ordinary replicas. Without `placements` (or the
    model's), every copy counts as pinned, which errs on the side of keeping.
    """
    out = set()
    for pin in pins:
        if pin.worker:
            if pin.worker == worker_id:
                out.add(pin.model)
            continue
        placement = placements.get(pin.model) if placements is not None else None
        if placement is None or worker_id in pinned_copies(placement, pin.replicas):
            out.add(pin.model)
    return out


def _evictable(state: ModelState, *, busy_too: bool) -> bool:
    if busy_too:  # a model still loading or busy can be swapped out once its requests are done
        return state.state in (MODEL_READY, MODEL_LOADING)
    return state.state == MODEL_READY and not (state.in_flight or state.queue_depth)


def plan_evictions(
    advert: WorkerAdvert,
    need: int,
    pins: Iterable[Pin],
    *,
    busy_too: bool = False,
    placements: Mapping[str, Placement] | None = None,
    below: int | None = None,
) -> list[str] | None:
    """Models to unload from `advert`'s worker so `need` bytes fit (by its eviction policy); None if they cannot.

    `busy_too` also counts models with requests running or queued (a swap that
    has to wait for them); pinned models never count (`pinned_models`, over
    `placements` when given). With `below`, the plan stands only if every model
    it evicts has a catalogue `priority` lower than that (a replica for a deep
    queue pushes out only less important models): the worker itself plans by its
    policy alone, so the plan is not bent, only refused.
    """
    free = free_memory(advert)
    if need <= free:
        return []
    keep = pinned_models(pins, advert.worker_id, placements)
    evictable = [m for m in advert.models if m.id not in keep and _evictable(m, busy_too=busy_too)]
    order = EVICTION_POLICIES.get(advert.eviction, lru)
    victims: list[str] = []
    for state in order(advert, evictable):
        victims.append(state.id)
        free += state.memory
        if need <= free:
            if below is not None and any((c := advert.card(v)) is None or c.priority >= below for v in victims):
                return None
            return victims
    return None


def choose_worker(
    model: str,
    adverts: Iterable[WorkerAdvert],
    pins: Iterable[Pin],
    *,
    exclude: Iterable[str] = (),
    placements: Iterable[Placement] = (),
    evict_below: int | None = None,
    evict: bool = True,
    wait: bool = True,
) -> Choice | str:
    """The worker that should load `model`, or the reason no worker can (callers use `pick_worker`).

    `placements` count too: a model placed on a worker that has not started
    loading it yet (its advert lags) already takes that worker's memory, so a
    burst of cold models spreads over the fleet instead of piling onto one worker;
    and they say which copies of a model pinned by count are the pinned ones.
    `evict_below`: evict only models of a lower catalogue priority than that.
    `evict=False` leaves out every worker that would have to evict (a replica
    for a deep queue never pushes a model out), `wait=False` every worker that
    would wait for busy models (a kept pin loads at once): the rest are ranked
    among themselves, so a worker ranked first but left out never hides one
    that qualifies.
    """
    pins = list(pins)
    skip = set(exclude)
    placements = list(placements)
    by_model = {p.model: p for p in placements} if placements else None
    index = _Index(placements)
    adverts = [index.with_pending(a) for a in adverts]
    ranked: list[tuple[tuple[object, ...], Choice]] = []
    against: list[str] = []
    known = False
    for advert in sorted(adverts, key=lambda a: a.worker_id):
        card = index.cards(advert).get(model)
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
        victims = plan_evictions(advert, card.memory, pins, placements=by_model, below=evict_below)
        waits = False
        if victims is None:
            # Only busy models stand in the way: the worker swaps once they drain (or its wait cap passes).
            victims = plan_evictions(advert, card.memory, pins, busy_too=True, placements=by_model, below=evict_below)
            waits = True
        if victims is None:
            against.append(f"{name} cannot free {gib(card.memory)} (its models are pinned)")
            continue
        if waits and not wait:
            against.append(f"{name} would wait for busy models to free {gib(card.memory)}")
            continue
        if victims and not evict:
            against.append(f"{name} has no room for it without evicting")
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
        return f"no worker can load {model}: " + _refusals(against)
    ranked.sort(key=lambda pair: pair[0])
    best = ranked[0][1]
    others = [choice.worker for _, choice in ranked[1:]]
    reason = best.reason + (f" (preferred over {_names(others)})" if others else "")
    return Choice(best.worker, best.evict, reason, best.waits)


REASON_NAMES = 3
"""Workers a placement's reason names beside the chosen one (the runners-up, best first); the rest are counted."""
REASON_REFUSALS = 5
"""Workers' refusals a "no worker can load" reason spells out; the rest are counted."""


def _names(workers: list[str]) -> str:
    """The runners-up a reason names: the first `REASON_NAMES`, then how many more (a reason, kept in the placement
    bucket and shown by /v1/models, must not grow with the fleet)."""
    if len(workers) <= REASON_NAMES:
        return ", ".join(workers)
    return f"{', '.join(workers[:REASON_NAMES])} and {len(workers) - REASON_NAMES} more"


def _refusals(against: list[str]) -> str:
    """Why no worker can load a model: the first `REASON_REFUSALS` workers' reasons, then how many more."""
    if len(against) <= REASON_REFUSALS:
        return "; ".join(against)
    return f"{'; '.join(against[:REASON_REFUSALS])}; and {len(against) - REASON_REFUSALS} more workers"


def pick_worker(
    model: str,
    adverts: Iterable[WorkerAdvert],
    pins: Iterable[Pin],
    *,
    exclude: Iterable[str] = (),
    placements: Iterable[Placement] = (),
    evict_below: int | None = None,
    evict: bool = True,
    wait: bool = True,
) -> Pick:
    """`choose_worker` as a `Pick`: how gateways, workers and cortexctl ask who should load `model`."""
    result = choose_worker(model, adverts, pins, exclude=exclude, placements=placements, evict_below=evict_below,
                           evict=evict, wait=wait)  # fmt: skip
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
    """Nobody could load the model a moment ago: answering 503 again needs no new attempt yet (`retries`)."""
    return now < held_until(placement)


def held_by_model(adverts: Iterable[WorkerAdvert]) -> dict[str, list[tuple[str, ModelState]]]:
    """Where each model is held: (worker, its state there) in the adverts' order, a worker's first state of an id
    as `WorkerAdvert.state_of` takes it."""
    held: dict[str, list[tuple[str, ModelState]]] = {}
    for advert in adverts:
        for state in {s.id: s for s in reversed(advert.models)}.values():
            held.setdefault(state.id, []).append((advert.worker_id, state))
    return held
