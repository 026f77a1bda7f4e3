"""Load on demand: make sure a model some worker can serve is placed on one, or say why it cannot be.

A request for a model that no worker has ready still goes into the model's
queue at once and waits there; this only sees to it that exactly one worker is
asked to load it (the compare-and-set on the placement key settles bursts across
gateways) and re-places it when its worker died, drained or failed. Replicas
for a deep queue are the workers' to add (`cortex.worker.scaling`): they watch
the queue, not the arrivals.
"""

from __future__ import annotations

import time
from functools import partial

from cortex.broker.decisions import change_placement
from cortex.broker.errors import BrokerError
from cortex.gateway.errors import NoCapacity
from cortex.gateway.services import Services
from cortex.protocol.choice import failed_recently, serving_workers
from cortex.protocol.placement import place_on_demand


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
        svc.fleet.note_placement(placement)
    # Whether just written (no worker can) or left alone (nobody could a moment ago), an error with no
    # live worker serving is the 503 every request for the model gets until its next retry
    # (`cortex.protocol.retries`).
    if placement is not None and placement.error and not serving_workers(placement, model, live):
        raise NoCapacity(f"The model `{model}` cannot be loaded: {placement.error}")
