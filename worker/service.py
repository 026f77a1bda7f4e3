"""The worker's asyncio side, composed: requests, resident models and the advert, with the timers between them.

Each part has one job and gets from here only what it needs (callables and
events, never this object):

- `cortex.worker.inflight.Requests`: pull loops, the ack policy, in-progress pings, cancels;
- `cortex.worker.publisher.ChunkPublisher`: the engine's chunks out to their reply subjects;
- `cortex.worker.placements.Placements`: the fleet's decisions as watched, and this worker's writes to them;
- `cortex.worker.residency.Residency`: which models are loaded; loads, unloads, evictions, keep_alive;
- `cortex.worker.advert.Advertiser`: the advert, the lifecycle counters in it, and the heartbeat.

What runs here is the start-up, the upkeep timer and the shutdown sequence, so
their order can be read in one place.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field

from cortex.broker.bus import Bus
from cortex.protocol import names
from cortex.worker.advert import CATALOGUE_DIGEST, Advertiser, WorkerMetrics
from cortex.worker.catalogue import ModelSpec
from cortex.worker.conversations import Conversations
from cortex.worker.device import DeviceInfo
from cortex.worker.engine import Engine
from cortex.worker.host_tier import HostTier
from cortex.worker.inflight import AFFINITY_WINDOW_S, Outcome, Requests
from cortex.worker.keeper import KeeperLease
from cortex.worker.loading import Loader, Loads
from cortex.worker.outbox import Outbox
from cortex.worker.placements import Placements
from cortex.worker.publisher import ChunkPublisher
from cortex.worker.residency import Residency
from cortex.worker.synthetic import SyntheticEngine
from cortex.worker.tasks import cancel_and_wait

DRAIN_TIMEOUT_S = 30.0
"""On shutdown, how long in-flight requests may run before they go back to the queue."""
ADVERT_MIN_GAP_S = 0.25
"""Adverts that follow a change (a finished request) come at most this often."""


@dataclass
class _Parts:
    requests: Requests
    publisher: ChunkPublisher
    placements: Placements
    residency: Residency
    advertiser: Advertiser
    keeper: KeeperLease


@dataclass
class WorkerService:
    bus: Bus
    engine: Engine | SyntheticEngine
    device: DeviceInfo
    catalogue: list[ModelSpec]
    serve: list[ModelSpec]
    worker_id: str
    slots: int
    loader: Loader
    """Loads a catalogue entry on a loader thread (the transformers loader, or the synthetic one)."""
    memory_budget: int = 0
    """Bytes models may take (0: the device's memory)."""
    eviction: str = "lru"
    dtype: str = "float32"
    """What ``dtype = "auto"`` loads as on this device (for memory estimates)."""
    host_cache: int = 0
    """Bytes of host memory for models that left the device (``--host-cache``; 0: none, they are freed)."""
    affinity_window: float = AFFINITY_WINDOW_S
    """How long a request sent to this worker first waits for a slot here before any worker may take it."""
    advert_catalogue: str = CATALOGUE_DIGEST
    """How adverts carry the catalogue (``--advert-catalogue``): by digest, or inline for readers older than that."""
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _slot_freed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a slot may have come free or pull loops should look again; shared by requests and residency."""
    _started_at: float = field(default_factory=time.time)
    _instance: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    """This start of the worker process, named in its heartbeats and its chunks (`Heartbeat.instance`)."""

    async def run(self) -> None:
        """Serve until `stop` is called; then finish what is in flight and withdraw."""
        parts = self._assemble(Outbox(asyncio.get_running_loop()))
        requests, residency, placements = parts.requests, parts.residency, parts.placements
        # Alive until the advert is withdrawn, through the graceful drain too.
        heartbeat = asyncio.create_task(parts.advertiser.beat(), name="heartbeat")
        await residency.advertise()
        cancel_sub = await self.bus.subscribe(names.cancel_subject(), requests.on_cancel)
        await self.bus.watch_decisions(placements.on_decision)
        for spec in self.serve:
            await placements.place_here(spec.id, "loaded at start (--model)")
        tasks = [
            asyncio.create_task(parts.publisher.run(), name="chunk-publisher"),
            asyncio.create_task(self._upkeep_loop(residency, parts.advertiser), name="advert"),
            asyncio.create_task(requests.progress_loop(), name="in-progress"),
            asyncio.create_task(residency.reconcile_loop(), name="reconcile"),
            asyncio.create_task(placements.keep_placed_when_lost(), name="keep-placed"),
            asyncio.create_task(residency.watch_queues(), name="watch-queues"),
            asyncio.create_task(parts.keeper.run(), name="keeper-lease"),
        ]
        await self._stopping.wait()
        await residency.stop_serving()
        await requests.wait_in_flight(timeout=DRAIN_TIMEOUT_S)
        requests.cancel_all()  # cancels are still honoured until here
        await cancel_sub.unsubscribe()
        await parts.publisher.drain()
        await cancel_and_wait(tasks)
        await parts.keeper.release()
        await requests.release_all(Outcome.STOPPING)
        await cancel_and_wait([heartbeat])
        await parts.advertiser.withdraw()

    def stop(self) -> None:
        self._stopping.set()
        self._slot_freed.set()  # wake pull loops waiting for a slot

    def _assemble(self, outbox: Outbox) -> _Parts:
        estimates = {spec.id: spec.memory_needed(self.dtype) for spec in self.catalogue}
        draining = asyncio.Event()
        metrics = WorkerMetrics()
        conversations = Conversations()
        requests = Requests(engine=self.engine, slots=self.slots, emit=outbox.put, stopping=self._stopping,
                            draining=draining, slot_freed=self._slot_freed, affinity_window=self.affinity_window,
                            conversations=conversations, bus=self.bus, worker_id=self.worker_id,
                            instance=self._instance)  # fmt: skip
        # The synthetic engine holds no weights to park.
        host_tier = HostTier(self.host_cache) if self.host_cache > 0 and isinstance(self.engine, Engine) else None
        placements = Placements(bus=self.bus, worker_id=self.worker_id, catalogue=self.catalogue, draining=draining,
                                slot_freed=self._slot_freed, own_slots=self.slots)  # fmt: skip
        lease = placements.hold_lease(self._instance)
        advertiser = Advertiser(
            bus=self.bus, worker_id=self.worker_id, device=self.device, slots=self.slots,
            memory_budget=self.memory_budget, eviction=self.eviction,
            cards=[spec.card(estimates[spec.id]) for spec in self.catalogue],
            metrics=metrics, draining=draining, busy=requests.busy, started_at=self._started_at,
            instance=self._instance, prefix_keys=conversations.recent, host_tier=host_tier,
            catalogue_mode=self.advert_catalogue, older_readers=placements.older_readers,
            keeper=lambda: lease.held,
        )  # fmt: skip
        residency = Residency(
            bus=self.bus, engine=self.engine, catalogue=self.catalogue, worker_id=self.worker_id,
            loads=Loads(loader=self.loader, engine=self.engine, host_tier=host_tier),
            eviction=self.eviction, estimates=estimates, placements=placements, metrics=metrics,
            advertiser=advertiser, serve_requests=requests.pull_loop, stopping=self._stopping,
            slot_freed=self._slot_freed, was_cancelled=requests.was_cancelled,
            started_with=frozenset(spec.id for spec in self.serve),
        )  # fmt: skip
        publisher = ChunkPublisher(bus=self.bus, outbox=outbox, reply_subject=requests.reply_subject,
                                   release=requests.release, instance=self._instance)  # fmt: skip
        return _Parts(requests, publisher, placements, residency, advertiser, lease)

    @staticmethod
    async def _upkeep_loop(residency: Residency, advertiser: Advertiser) -> None:
        upkept = 0.0
        while True:
            await advertiser.wait_due(names.ADVERT_INTERVAL_S)
            # The upkeep (NATS queue reads, placement checks) runs every interval; a finished
            # request, up to four wake-ups a second, only needs its new counts advertised.
            if time.monotonic() - upkept >= names.ADVERT_INTERVAL_S:
                upkept = time.monotonic()
                await residency.upkeep()
            await residency.advertise()
            await asyncio.sleep(ADVERT_MIN_GAP_S)
