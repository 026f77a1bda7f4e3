"""Load on demand: make sure a model some worker can serve is placed on one, or say why it cannot be.

A request for a model that no worker has ready still goes into the model's
queue at once and waits there; this only sees to it that exactly one worker is
asked to load it (the compare-and-set on the placement key settles bursts across
gateways) and re-places it when its worker died, drained or failed.
"""

from __future__ import annotations

import contextlib
import time
from functools import partial

from cortex.broker.decisions import change_placement
from cortex.broker.errors import BrokerError
from cortex.gateway.errors import NoCapacity
from cortex.gateway.services import Services
from cortex.protocol.placement import add_replica, failed_recently, pick_worker, place_on_demand, serving_workers

DEEP_FOR_S = 2.0
"""A queue at least as deep as the slots serving it for this long asks for another replica."""


async def ensure_placed(svc: Services, model: str) -> None:
    """Unless a live worker is meant to have `model`, place it on the best one; 503 if none can load it."""
    live = {advert.worker_id: advert for advert in svc.fleet.workers()}
    known = svc.fleet.placements.get(model)
    if serving_workers(known, model, live):
        return  # the common case, without a round trip to the broker
    if known is not None and failed_recently(known, time.time()):
        raise NoCapacity(f"The model `{model}` cannot be loaded: {known.error}")
    change = partial(place_on_demand, model=model, live=live, pins=svc.fleet.pins.values(),
                     placements=svc.fleet.placements.values(), now=time.time())  # fmt: skip
    try:
        placement = await change_placement(svc.bus, model, change, by=f"gateway {svc.relay.gateway_id}")
    except BrokerError as exc:
        raise NoCapacity(f"Cannot place the model `{model}` right now: {exc}") from exc
    if placement is not None:  # seen at once by the next request, before the bucket's watch brings it
        svc.fleet.placements[model] = placement
    # Whether just written (no worker can) or left alone (nobody could a moment ago), an error with no
    # live worker serving is the 503 every request for the model gets until RETRY_FAILED_S passes.
    if placement is not None and placement.error and not serving_workers(placement, model, live):
        raise NoCapacity(f"The model `{model}` cannot be loaded: {placement.error}")


async def consider_replica(svc: Services, model: str) -> None:
    """Add a replica of `model` when its queue has stayed deep and a worker has room for it without evicting.

    Up to the catalogue's ``max_replicas``; replicas above ``min_replicas``
    leave again when idle past their ``keep_alive``.
    """
    live = {advert.worker_id: advert for advert in svc.fleet.workers()}
    placement = svc.fleet.placements.get(model)
    serving = serving_workers(placement, model, live)
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
    pick = pick_worker(model, others, svc.fleet.pins.values(), placements=svc.fleet.placements.values())
    choice = pick.without_eviction()
    if choice is None:
        return  # nobody has room to spare: the queue drains where it is
    svc.fleet.deep_since.pop(model, None)
    reason = f"{choice.reason}; replica {len(serving) + 1} of {card.max_replicas}: {depth} requests queued"
    change = partial(add_replica, worker=choice.worker, reason=reason, max_replicas=card.max_replicas)
    with contextlib.suppress(BrokerError):  # the next request asks again
        await change_placement(svc.bus, model, change, by=f"gateway {svc.relay.gateway_id}")
