"""The fleet's decisions as this worker watches them, and the placement changes this worker writes.

The worker keeps a copy of the decision bucket (placements, pins, drains),
fed by its watch; `cortex.worker.residency` reads it to know what to hold.
Every write is a transition of `cortex.protocol.placement` applied by
`cortex.broker.decisions.change_placement`, so a worker changes a placement
exactly as a gateway or cortexctl would.

Only the keeper (`cortex.worker.keeper`) also watches the fleet (adverts and
heartbeats, judged live by `cortex.protocol.liveness.LiveFleet` as gateways
do). The other workers read it when one of their rare decisions needs it (a
failed load handed on, an idle copy leaving, a replica added: `live`), a
snapshot kept for a few seconds.

The keeper watches over pins and ``min_replicas`` (`keep_placed`): on each
upkeep tick, and as soon as a worker's heartbeat goes or a drain is written, it
checks the models of its catalogue and, for one with fewer live copies than it
should have, writes the transition `keep_replicas` that restores them; the
compare-and-set lets exactly one such write land. On the same tick it starts
the next round of loads of a model every worker failed to load, once the
placement's `retry_at` has come (`cortex.protocol.retries`). A pin to a named
worker is placed by that worker itself.

The workers serving a model watch its queue (`consider_scaling`, fed by
`cortex.worker.scaling`): once it has stayed at least as deep as the slots
serving it for `DEEP_FOR_S`, they write `scale_out`, which adds a replica on
the best worker with room, up to ``max_replicas``. The clock stands still while
a copy of the model is still loading: its slots drain nothing yet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from functools import partial

from cortex.broker.bus import Bus, FleetWatch
from cortex.broker.decisions import change_placement
from cortex.broker.errors import BrokerError
from cortex.broker.fleet_ops import live_adverts
from cortex.protocol import Pin, Placement, WorkerAdvert, catalogues, codec, names
from cortex.protocol.choice import failed_recently, pinned_copies, pinned_models, serving_workers
from cortex.protocol.liveness import LiveFleet
from cortex.protocol.placement import (
    Transition,
    add_worker,
    keep_replicas,
    leave_above_minimum,
    loading_copies,
    record_failed_load,
    record_loaded,
    remove_worker,
    retry_failed_load,
    scale_out,
)
from cortex.protocol.retries import retry_due
from cortex.worker.catalogue import ModelSpec
from cortex.worker.keeper import KeeperLease
from cortex.worker.scaling import DEEP_FOR_S, DeepQueues

log = logging.getLogger("cortex.worker")

CAUGHT_UP_S = 15.0
"""How long a new keeper waits for its watch to bring the whole fleet before it judges who is missing."""
LEAVE_VIEW_S = 5.0
"""An idle copy's leave may go by a read of the fleet this old (`live`), by a worker that does not keep watch."""
LEAVE_RETRY_S = 30.0
"""An idle copy that could not leave (its other copies not live) asks again after this long, not every upkeep."""
SCALE_RETRY_S = 30.0
"""A deep queue for which no worker had room for a replica asks again after this long, reading no fleet meanwhile."""


@dataclass
class Placements:
    bus: Bus
    worker_id: str
    catalogue: list[ModelSpec]
    draining: asyncio.Event
    """Set while a `Drain` names this worker (set and cleared here only)."""
    slot_freed: asyncio.Event
    """Shared with the request side: set so that pull loops look again when the worker starts or stops draining."""
    own_slots: int = 1
    """This worker's slots (a queue shallower than them is not deep, whoever else serves it)."""
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when what this worker should hold may have changed (the residency side reconciles)."""
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a worker stopped counting or started draining: copies of pinned models may be missing."""
    lease: KeeperLease | None = None
    """Who keeps watch over the fleet (`hold_lease`: it calls back `watch_fleet` and `unwatch_fleet`)."""
    _fleet: LiveFleet = field(default_factory=LiveFleet)
    """The fleet as this worker's watch brings it, while it is the keeper (`_watching`)."""
    _fleet_watch: FleetWatch | None = None
    _catching_up: asyncio.Task[None] | None = None
    _watching: bool = False
    """Whether `_fleet` is whole: this worker keeps watch and its watch has caught up."""
    _leave_refused: dict[str, float] = field(default_factory=dict)
    """By model: until when (monotonic) an idle copy that could not leave does not ask again."""
    _scale_refused: dict[str, float] = field(default_factory=dict)
    """By model: until when (monotonic) a replica is not asked for again (nobody had room)."""
    _snapshot: tuple[float, list[WorkerAdvert]] | None = None
    """The fleet last read by a worker that does not keep watch, and when (monotonic)."""
    _placements: dict[str, Placement] = field(default_factory=dict)
    _pins: dict[str, Pin] = field(default_factory=dict)
    _drains: set[str] = field(default_factory=set)
    """Every worker a `Drain` names (its advert says so only from its next write)."""
    _deep: DeepQueues = field(default_factory=DeepQueues)

    # -- what the buckets say -----------------------------------------------------

    def on_fleet(self, key: str, value: bytes | None) -> None:
        """The handler of the fleet's watch: adverts and heartbeats."""
        try:
            changed = self._fleet.on_change(key, value, time.monotonic())
        except codec.DecodeError:
            log.warning("ignoring malformed advert %s", key)
            return
        if changed and value is None:  # a heartbeat gone (expired or withdrawn), an advert deleted
            self.lost.set()

    async def live(self, max_age: float = 0.0) -> dict[str, WorkerAdvert]:
        """The live workers that take placements (none draining), by id; this worker while it is not draining.

        The keeper answers from its watch; another worker reads the fleet, or
        takes its last read if that is at most `max_age` seconds old. Raises
        `BrokerError` when the fleet cannot be read.
        """
        if self._watching:
            live = {a.worker_id: a for a in self._fleet.live(time.monotonic())}
            if (own := self._fleet.advert(self.worker_id)) is not None:
                live.setdefault(self.worker_id, own)  # it knows it is alive, whatever its heartbeat's echo says
        else:
            if self._snapshot is None or time.monotonic() - self._snapshot[0] > max_age:
                self._snapshot = (time.monotonic(), await live_adverts(self.bus))
            live = {a.worker_id: a for a in self._snapshot[1]}
        return {w: a for w, a in live.items() if not a.draining and w not in self._drains}

    def scale_refused(self, model: str) -> bool:
        """Whether a replica of `model` found no room a moment ago (`SCALE_RETRY_S`): not asked for again yet."""
        return time.monotonic() < self._scale_refused.get(model, 0.0)

    def last_read(self) -> dict[str, WorkerAdvert] | None:
        """What `live` said last without reading (the keeper's view, or the last snapshot however old; None if
        there is none), for a cheap first look."""
        if self._watching:
            return {a.worker_id: a for a in self._fleet.live(time.monotonic())}
        return {a.worker_id: a for a in self._snapshot[1]} if self._snapshot is not None else None

    def older_readers(self) -> bool:
        """Whether some live worker comes from a release before catalogues by digest (it reads ours inline): this
        worker's `Advertiser` keeps its catalogue inline meanwhile. The keeper's view says, or its record does."""
        if self.lease is None:
            return bool(self.older_readers_seen())
        return self.lease.inline()

    def older_readers_seen(self) -> bool | None:
        """`older_readers` by this worker's own watch (the keeper's, published in its record); None unless this worker
        keeps watch with the whole fleet in view."""
        if not self._watching:
            return None
        return any(not catalogues.reads_digests(a) for a in self._fleet.live(time.monotonic())
                   if a.worker_id != self.worker_id)  # fmt: skip

    async def watch_fleet(self) -> None:
        """This worker became the keeper: watch the fleet, and use the view once it holds the whole fleet (in the
        background: the lease is renewed meanwhile)."""
        if self._fleet_watch is not None:
            return
        watch = self._fleet_watch = await self.bus.watch_fleet(self.on_fleet)
        self._catching_up = asyncio.create_task(self._use_when_caught_up(watch), name="fleet-watch-caught-up")

    async def _use_when_caught_up(self, watch: FleetWatch) -> None:
        if not await watch.caught_up(CAUGHT_UP_S):
            log.warning("the fleet watch took over %.0f s to bring the fleet; keeping watch with it as it is",
                        CAUGHT_UP_S)  # fmt: skip
        if self._fleet_watch is watch:  # not given up meanwhile
            self._watching = True
            self.lost.set()  # look over the pins now, with the whole fleet in view

    async def unwatch_fleet(self) -> None:
        """This worker is the keeper no more: stop watching the fleet."""
        watch, self._fleet_watch, self._watching = self._fleet_watch, None, False
        if self._catching_up is not None:
            self._catching_up.cancel()
            self._catching_up = None
        if watch is not None:
            await self.bus.unwatch_fleet(watch)
        self._fleet = LiveFleet()  # after the watch has stopped feeding it

    def hold_lease(self, instance: str) -> KeeperLease:
        """The keeper's lease for this worker (`instance`: its process), wired to this view; its `run` is the
        caller's to start."""
        self.lease = KeeperLease(bus=self.bus, worker_id=self.worker_id, instance=instance,
                                 inline_catalogues=self.older_readers_seen, gained=self.watch_fleet,
                                 lost=self.unwatch_fleet)  # fmt: skip
        return self.lease

    def on_decision(self, key: str, value: bytes | None) -> None:
        """The handler of the decision bucket's watch."""
        if key == names.KEEPER_KEY:
            if self.lease is not None:
                self.lease.on_record(value)
            return
        parsed = names.parse_placement_key(key)
        if parsed is None:
            return
        kind, name = parsed
        try:
            if kind == "placement":
                if value is None:
                    self._placements.pop(name, None)
                else:
                    self._placements[name] = codec.decode_placement(value)
            elif kind == "pin":
                if value is None:
                    self._pins.pop(name, None)
                else:
                    self._pins[name] = codec.decode_pin(value)
            else:  # a drain. Presence is the flag (a `Drain` says only since when): even a hand-written value drains.
                if value is None:
                    self._drains.discard(name)
                else:
                    self._drains.add(name)
                    self.lost.set()  # its pinned models go elsewhere at once
                if name == self.worker_id:
                    if value is not None:
                        self.draining.set()
                    else:
                        self.draining.clear()
                    self.slot_freed.set()  # pull loops look again
        except codec.DecodeError:
            log.warning("ignoring malformed %s", key)
            return
        self.changed.set()

    def wanted(self) -> set[str]:
        """The models placed on this worker (none while it drains)."""
        if self.draining.is_set():
            return set()
        return {model for model, p in self._placements.items() if self.worker_id in p.workers}

    def placement(self, model: str) -> Placement:
        """The placement of a model in `wanted`."""
        return self._placements[model]

    def pins(self) -> Collection[Pin]:
        return self._pins.values()

    def placements(self) -> dict[str, Placement]:
        """Every placement, by model, as the watch brought them (read only)."""
        return self._placements

    def pinned_here(self) -> set[str]:
        """The models a pin keeps on this worker (of a pin by count, only the copies it counts)."""
        return pinned_models(self._pins.values(), self.worker_id, self._placements)

    def kept_copies(self, model: str, min_replicas: int) -> int:
        """The copies of `model` the fleet keeps whatever happens: `min_replicas`, or a pin by count's `replicas`."""
        pin = self._pins.get(model)
        return max(min_replicas, pin.replicas if pin is not None and not pin.worker else 0)

    # -- what this worker writes --------------------------------------------------

    async def _change(self, model: str, change: Transition, failure: str) -> None:
        """Apply `change`; a broker that does not answer is logged (`failure`, with the model and the error).

        The placement in force afterwards is taken at once, before the watch brings
        it: a model this worker just took itself off must not look wanted to the
        reconcile that its own unload sets going.
        """
        try:
            placement = await change_placement(self.bus, model, change, by=self.worker_id)
        except BrokerError as exc:
            log.warning(failure, model, exc)
            return
        if placement is not None and self._placements.get(model) != placement:
            self._placements[model] = placement
            self.changed.set()

    async def place_here(self, model: str, reason: str) -> None:
        change = partial(add_worker, model=model, worker=self.worker_id, reason=f"{self.worker_id}: {reason}")
        await self._change(model, change, "cannot place %s here: %s")

    async def unplace_here(self, model: str, reason: str) -> None:
        change = partial(remove_worker, worker=self.worker_id, reason=reason)
        await self._change(model, change, "cannot take %s off this worker's placement: %s")

    async def leave_idle(self, model: str, reason: str, min_replicas: int) -> None:
        """Leave the placement of a model idle here, only while its other live workers keep `min_replicas` (which
        callers raise to a pin's count: `kept_copies`)."""
        if self.bus.settling():
            return  # the view of who is live is stale (see `keep_placed`); the next upkeep asks again
        placement = self._placements.get(model)
        others = [w for w in placement.workers if w != self.worker_id] if placement is not None else []
        if min_replicas and len(others) < min_replicas:
            return  # no view of the fleet could let it go: asked again at the next upkeep, without a read
        if time.monotonic() < self._leave_refused.get(model, 0.0):
            return  # refused a moment ago (its other copies were not live)
        try:
            live = await self.live(max_age=LEAVE_VIEW_S)
        except BrokerError as exc:
            log.warning("cannot take idle %s off this worker: %s", model, exc)
            return
        change = partial(leave_above_minimum, worker=self.worker_id, live=set(live), min_replicas=min_replicas,
                         reason=reason)  # fmt: skip
        if placement is not None and change(placement) is None:
            self._leave_refused[model] = time.monotonic() + LEAVE_RETRY_S
            return
        await self._change(model, change, "cannot take idle %s off this worker: %s")

    async def load_failed(self, model: str, reason: str) -> None:
        """Leave the placement with the reason, and hand the model to the next best worker (or record why none)."""
        try:
            live = await self.live()
        except BrokerError as exc:
            log.warning("cannot record the failed load of %s: %s", model, exc)
            return
        change = partial(record_failed_load, model=model, worker=self.worker_id, error=reason,
                         adverts=list(live.values()), pins=self._pins.values(),
                         placements=self._placements.values(), now=time.time())  # fmt: skip
        await self._change(model, change, "cannot record the failed load of %s: %s")

    async def loaded(self, model: str) -> None:
        """The model loaded here: a placement still counting failed rounds (`attempts`, `retry_at`) starts afresh."""
        placement = self._placements.get(model)
        if placement is None or not (placement.attempts or placement.retry_at):
            return  # the common case, without a round trip to the broker
        change = partial(record_loaded, worker=self.worker_id)
        await self._change(model, change, "cannot record the load of %s: %s")

    async def keep_placed_when_lost(self) -> None:
        """Run `keep_placed` as soon as a worker stops counting or drains, not only on the upkeep tick."""
        while True:
            await self.lost.wait()
            self.lost.clear()
            try:
                await self.keep_placed()
            except Exception:
                log.exception("keeping pinned models placed failed")  # tried again on the next tick

    async def keep_placed(self) -> None:
        """Keep pinned and ``min_replicas`` models at their count, before anyone asks; retry failed loads when due.

        The keeper does, for every model in a live worker's catalogue: a model
        short of copies (never placed, or its worker died or drains) is placed on
        the best live worker, which evicts idle unpinned models if it must;
        should two workers write the same change at once, the compare-and-set
        lets one land. A pin to a named worker is placed by that worker itself
        (keeper or not).
        """
        if self.bus.settling():
            return  # cut off from the broker, or just back: every worker seems gone; the next upkeep looks again
        for spec in self.catalogue:
            pin = self._pins.get(spec.id)
            if pin is not None and pin.worker == self.worker_id:
                await self._keep_pin_here(spec)
        if not self._watching:
            return
        live = await self.live()
        now = time.time()
        for model, min_replicas in catalogues.largest_per_model(live.values(), "min_replicas").items():
            pin = self._pins.get(model)
            placement = self._placements.get(model)
            if retry_due(placement, now):
                change = partial(retry_failed_load, model=model, live=live, pins=list(self._pins.values()),
                                 placements=list(self._placements.values()), now=now)  # fmt: skip
                await self._change(model, change, "cannot retry the load of %s: %s")
                continue
            if pin is not None and pin.worker:
                continue  # its worker places it (above)
            wanted = self.kept_copies(model, min_replicas)  # a pin naming a worker went on above
            serving = serving_workers(placement, model, live)
            if len(serving) >= wanted:
                if placement is None or pinned_copies(placement, wanted) == serving[:wanted]:
                    continue  # the common case, without a round trip to the broker
            elif failed_recently(placement, now):
                continue  # nobody could load it a moment ago
            why = f"pinned, {pin.replicas} replica(s)" if pin is not None else f"min_replicas {min_replicas}"
            change = partial(keep_replicas, model=model, wanted=wanted, why=why, live=live,
                             pins=list(self._pins.values()), placements=list(self._placements.values()),
                             now=now)  # fmt: skip
            await self._change(model, change, "cannot keep the replicas of %s: %s")

    async def _keep_pin_here(self, spec: ModelSpec) -> None:
        """A pin to this worker: placed by the worker itself, unless it drains or failed to load the model."""
        placement = self._placements.get(spec.id)
        here = placement is not None and self.worker_id in placement.workers
        if not self.draining.is_set() and not here and (placement is None or self.worker_id not in placement.failed):
            await self.place_here(spec.id, "pinned to this worker")

    def forget_deep(self, model: str) -> None:
        """The queue of `model` is not deep enough now (its clock starts again)."""
        self._deep.forget(model)

    def _copy_loading(self, placement: Placement, live: dict[str, WorkerAdvert]) -> bool:
        """Whether another copy of the placed model is still loading (or placed, not started): it takes none of the
        queue yet, so the deep-queue clock waits for it (a burst would otherwise add a replica per window up to
        max_replicas before the first new one serves). This worker serves the model (its caller says so), whatever
        its own advert, a write behind, still shows."""
        if [w for w in loading_copies(placement, placement.model, live) if w != self.worker_id]:
            self._deep.forget(placement.model)
            return True
        return False

    async def consider_scaling(self, spec: ModelSpec, depth: int, live: dict[str, WorkerAdvert]) -> None:
        """Add a replica of `spec`, served here, once its queue (`depth` requests, just measured) has stayed at least
        as deep as the slots serving it for `DEEP_FOR_S`, up to its ``max_replicas``.

        Every worker serving the model asks; `scale_out` goes only to a worker
        with room (or, with ``scale_evicts``, one that evicts idle models of
        lower priority), and only while the placement names the workers the
        decision was made on, so one replica lands per window.
        """
        model = spec.id
        placement = self._placements.get(model)
        if placement is None or self.bus.settling() or self.draining.is_set():
            self._deep.forget(model)
            return
        serving = serving_workers(placement, model, live)
        if placement.error or self.worker_id not in serving or len(serving) >= spec.max_replicas:
            self._deep.forget(model)
            return
        if self._copy_loading(placement, live):
            return
        slots = sum(live[w].slots_total for w in serving)
        lasted = self._deep.observe(model, placement.workers, depth >= max(1, slots), time.monotonic())
        if lasted < DEEP_FOR_S:
            return
        if not self._watching:
            # The new placement keeps only the copies `live` shows serving: a read up to SCALE_VIEW_S old would drop
            # a worker placed since. The fleet is read afresh for the decision (at most once a window per model).
            try:
                live = await self.live()
            except BrokerError as exc:
                log.warning("cannot read the fleet to add a replica of %s: %s", model, exc)
                return
            if self._copy_loading(placement, live):
                return
        change = partial(scale_out, model=model, seen=list(placement.workers), live=live,
                         pins=list(self._pins.values()), placements=list(self._placements.values()),
                         max_replicas=spec.max_replicas, evict_below=spec.priority if spec.scale_evicts else None,
                         depth=depth, now=time.time())  # fmt: skip
        if change(placement) is None:
            # Nobody has room (or it moved on): asked again after a while, and meanwhile the queue costs no fleet read.
            self._scale_refused[model] = time.monotonic() + SCALE_RETRY_S
            return
        await self._change(model, change, "cannot add a replica of %s: %s")
