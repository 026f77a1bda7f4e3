"""Load on demand: make sure a model some worker can serve is placed on one, or say why it cannot be.

A request for a model that no worker has ready still goes into the model's
queue at once and waits there; this only sees to it that exactly one worker is
asked to load it (the compare-and-set on the placement key settles bursts across
gateways) and re-places it when its worker died, drained or failed.
"""

from __future__ import annotations

import contextlib
import time

from cortex.broker.decisions import change_placement
from cortex.broker.errors import BrokerError
from cortex.gateway.errors import NoCapacity
from cortex.gateway.services import Services
from cortex.protocol import Placement, WorkerAdvert
from cortex.protocol import messages as m
from cortex.protocol.placement import choose_worker

RETRY_FAILED_S = 30.0
"""A model no worker could load is tried again after this long (workers come and go)."""
DEEP_FOR_S = 2.0
"""A queue at least as deep as the slots serving it for this long asks for another replica."""


def _serving(placement: Placement | None, model: str, live: dict[str, WorkerAdvert]) -> list[str]:
    """The workers of `placement` that are alive, not draining, and have not failed to load the model."""
    if placement is None:
        return []
    out = []
    for worker in placement.workers:
        advert = live.get(worker)
        if advert is None or advert.draining or advert.card(model) is None:
            continue  # gone, leaving, or never able to load it
        state = advert.state_of(model)
        if state is None or state.state != m.MODEL_FAILED:
            out.append(worker)
    return out


async def ensure_placed(svc: Services, model: str) -> None:
    """Unless a live worker is meant to have `model`, place it on the best one; 503 if none can load it."""
    live = {advert.worker_id: advert for advert in svc.fleet.workers()}
    known = svc.fleet.placements.get(model)
    if _serving(known, model, live):
        return  # the common case, without a round trip to the broker
    if _failed_recently(known):
        raise NoCapacity(f"The model `{model}` cannot be loaded: {known.error}")  # type: ignore[union-attr]
    failed = {w for w, a in live.items() if (s := a.state_of(model)) is not None and s.state == m.MODEL_FAILED}

    def change(current: Placement | None) -> Placement | None:
        if _serving(current, model, live):
            return None
        if _failed_recently(current):
            raise NoCapacity(f"The model `{model}` cannot be loaded: {current.error}")  # type: ignore[union-attr]
        recent = current is not None and time.time() - current.updated_at < RETRY_FAILED_S
        previous = current.failed if current is not None and recent else {}
        choice = choose_worker(model, live.values(), svc.fleet.pins.values(), exclude=failed | set(previous),
                               placements=svc.fleet.placements.values())  # fmt: skip
        if isinstance(choice, str):
            return Placement(model=model, reason=choice, failed=previous, error=choice)
        return Placement(model=model, workers=[choice.worker], reason=choice.reason, failed=previous)

    try:
        placement = await change_placement(svc.bus, model, change, by=f"gateway {svc.relay.gateway_id}")
    except BrokerError as exc:
        raise NoCapacity(f"Cannot place the model `{model}` right now: {exc}") from exc
    if placement is not None:  # seen at once by the next request, before the bucket's watch brings it
        svc.fleet.placements[model] = placement
    if placement is not None and placement.error and not placement.workers:
        raise NoCapacity(f"The model `{model}` cannot be loaded: {placement.error}")


def _failed_recently(placement: Placement | None) -> bool:
    """Nobody could load the model a moment ago: answering 503 again needs no new attempt yet."""
    return placement is not None and bool(placement.error) and time.time() - placement.updated_at < RETRY_FAILED_S


async def consider_replica(svc: Services, model: str) -> None:
    """Add a replica of `model` when its queue has stayed deep and a worker has room for it without evicting.

    Up to the catalogue's ``max_replicas``; replicas above ``min_replicas``
    leave again when idle past their ``keep_alive``.
    """
    live = {advert.worker_id: advert for advert in svc.fleet.workers()}
    placement = svc.fleet.placements.get(model)
    serving = _serving(placement, model, live)
    card = next((c for a in live.values() if (c := a.card(model)) is not None), None)
    if not serving or card is None or len(serving) >= card.max_replicas:
        svc.fleet.deep_since.pop(model, None)
        return
    depth = max((s.queue_depth for w in serving if (s := live[w].state_of(model)) is not None), default=0)
    if depth < sum(live[w].slots_total for w in serving):
        svc.fleet.deep_since.pop(model, None)
        return
    now = time.monotonic()
    if now - svc.fleet.deep_since.setdefault(model, now) < DEEP_FOR_S:
        return
    others = [a for w, a in live.items() if w not in serving]
    choice = choose_worker(model, others, svc.fleet.pins.values(), placements=svc.fleet.placements.values())
    if isinstance(choice, str) or choice.evict:
        return  # nobody has room to spare: the queue drains where it is
    svc.fleet.deep_since.pop(model, None)
    reason = f"{choice.reason}; replica {len(serving) + 1} of {card.max_replicas}: {depth} requests queued"

    def change(current: Placement | None) -> Placement | None:
        if current is None or choice.worker in current.workers or len(current.workers) >= card.max_replicas:
            return None
        return Placement(model=model, workers=[*current.workers, choice.worker], reason=reason, failed=current.failed)

    with contextlib.suppress(BrokerError):  # the next request asks again
        await change_placement(svc.bus, model, change, by=f"gateway {svc.relay.gateway_id}")
