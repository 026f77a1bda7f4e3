"""How long each model's queue has stayed deep: the clock of queue-driven scale-out.

A worker serving a model measures its queue (`cortex.worker.residency`) every
`SCALE_POLL_S` while the model has requests running here, and on every upkeep
tick; `cortex.worker.placements.Placements.consider_scaling` feeds each reading
here and adds a replica once the queue has been at least as deep as the slots
serving it for `DEEP_FOR_S`. A burst that arrives at once therefore scales
without any further request, within about `DEEP_FOR_S` + `SCALE_POLL_S` of its
first copy taking requests (plus the new copy's load).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cortex.broker.errors import BrokerError
from cortex.protocol import WorkerAdvert
from cortex.protocol import messages as m
from cortex.protocol.choice import serving_workers

if TYPE_CHECKING:  # placements imports this module for its clock
    from cortex.worker.placements import Placements
    from cortex.worker.slot import ModelSlot

log = logging.getLogger("cortex.worker")

DEEP_FOR_S = 2.0
"""A queue at least as deep as the slots serving it for this long asks for another replica."""
SCALE_POLL_S = 0.5
"""How often a worker reads the queues of the models it serves that have requests running and could scale."""


@dataclass
class DeepQueues:
    """Since when (monotonic) each model's queue has been deep, on which set of placed workers."""

    _since: dict[str, tuple[tuple[str, ...], float]] = field(default_factory=dict)

    def observe(self, model: str, workers: Sequence[str], deep: bool, now: float) -> float:
        """Record a reading; how long the queue has been deep without a break (0.0 when it is not deep now).

        A change of the placement's workers (a replica added, a worker gone)
        starts the clock again: the slots serving the queue changed.
        """
        if not deep:
            self._since.pop(model, None)
            return 0.0
        key = tuple(workers)
        seen = self._since.get(model)
        if seen is None or seen[0] != key:
            self._since[model] = (key, now)
            return 0.0
        return now - seen[1]

    def forget(self, model: str) -> None:
        self._since.pop(model, None)


SCALE_VIEW_S = 5.0
"""A worker that does not keep watch over the fleet reads it for scaling at most this often (`Placements.live`)."""


async def watch_queues(held: Callable[[], list[ModelSlot]], placements: Placements) -> None:
    """Every `SCALE_POLL_S`, read the queues of the models `held` here that run requests and could have another
    replica, and hand each reading to `Placements.consider_scaling`."""
    while True:
        await asyncio.sleep(SCALE_POLL_S)
        try:
            read = []
            room = _RoomForCopy(placements)
            for slot in held():
                if slot.pull is None or slot.state != m.MODEL_READY or not slot.in_flight or not room(slot):
                    continue
                with contextlib.suppress(BrokerError):  # read again next time
                    slot.queue_depth = await slot.pull.pending()
                    read.append(slot)
            await consider_scaling(read, placements)
        except Exception:
            log.exception("watching the queues failed")  # tried again in SCALE_POLL_S


async def consider_scaling(slots: list[ModelSlot], placements: Placements) -> None:
    """Hand the queue depths just read of `slots` (models held here) to `Placements.consider_scaling`.

    A queue shallower than this worker's own slots cannot be as deep as the
    slots serving it: its clock starts again without a look at the fleet. For
    the others the fleet is read (or, at most `SCALE_VIEW_S` old, taken as last
    read), so a worker that does not keep watch reads it only while a queue of
    its is deep.
    """
    deep = []
    room = _RoomForCopy(placements)
    for slot in slots:
        if slot.state == m.MODEL_READY and not slot.leaving.is_set() and room(slot):
            if slot.queue_depth >= max(1, placements.own_slots):
                deep.append(slot)
            else:
                placements.forget_deep(slot.spec.id)
    if not deep:
        return
    try:
        live = await placements.live(max_age=SCALE_VIEW_S)
    except BrokerError as exc:
        log.warning("cannot read the fleet to consider a replica: %s", exc)  # read again at the next measure
        return
    for slot in deep:
        await placements.consider_scaling(slot.spec, slot.queue_depth, live)


class _RoomForCopy:
    """Whether a model held here could have another copy, judged without a broker read: placed, ``max_replicas``
    above the copies the fleet as last read serves it on, and not refused for want of room a moment ago. So a
    saturated model, or a fleet with no room, costs a worker no fleet reads."""

    def __init__(self, placements: Placements) -> None:
        self._placements = placements
        self._seen: dict[str, WorkerAdvert] | None = None  # read once a model needs it

    def __call__(self, slot: ModelSlot) -> bool:
        model = slot.spec.id
        placement = self._placements.placements().get(model)
        if placement is None or slot.spec.max_replicas <= 1 or self._placements.scale_refused(model):
            return False
        if self._seen is None:
            self._seen = self._placements.last_read() or {}
        # A dead copy holds no place; this worker serves it, whatever a view older than its load says.
        return max(1, len(serving_workers(placement, model, self._seen))) < slot.spec.max_replicas
