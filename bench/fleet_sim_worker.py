"""Simulated workers for `bench.fleet_sim`: many per process, each its own NATS client writing real adverts.

python -m bench.fleet_sim_worker --nats URL --first 0 --count 100 --models 500 [--worker-watch]

Each simulated worker opens its own `cortex.broker.bus.Bus` (a NATS connection
of its own), writes its advert with the product's `cortex.worker.advert.Advertiser`
every `names.ADVERT_INTERVAL_S` and at once after each change, and beats with
`Advertiser.beat`, so the keys, values, sizes and rates are the real worker's.
It holds models as the placement bucket says: a placement naming it starts a
simulated load (`--load-s`, loading -> ready, with progress), after evicting
what `protocol.placement.plan_evictions` picks (written back with the
`remove_worker` transition, as a real worker does); a placement that no
longer names it unloads. It never answers requests: the simulator measures
fleet upkeep and placement, not generation.

The decision bucket is watched once per process and fanned out to the
workers in it. ``--worker-watch`` also gives every simulated worker the real
worker's own fleet upkeep: `cortex.worker.placements.Placements` fed by its own
watch of decisions, the keeper's lease (`cortex.worker.keeper`: the one worker
holding it also watches adverts and heartbeats), and `keep_placed` on each
upkeep tick; without it that cost is measured once by `bench.fleet_sim_probe`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import signal
import time
import uuid
from dataclasses import dataclass, field
from functools import partial

import torch

from bench.common import install_uvloop
from bench.fleet_sim_catalogue import BUDGET, catalogue, open_bus, specs
from cortex.broker.bus import Bus
from cortex.broker.decisions import change_placement
from cortex.broker.errors import BrokerError
from cortex.protocol import ModelState, Pin, Placement, codec, names
from cortex.protocol import messages as m
from cortex.protocol.choice import plan_evictions
from cortex.protocol.placement import remove_worker
from cortex.worker.advert import Advertiser, WorkerMetrics
from cortex.worker.device import DeviceInfo
from cortex.worker.placements import Placements

log = logging.getLogger("bench.fleet_sim")


@dataclass
class Held:
    card: m.ModelCard
    state: str
    since: float
    load_s: float
    last_used: float = 0.0


@dataclass
class SimWorker:
    worker_id: str
    bus: Bus
    advertiser: Advertiser
    cards: dict[str, m.ModelCard]
    load_s: float
    rng: random.Random
    held: dict[str, Held] = field(default_factory=dict)
    view: Placements | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def states(self) -> list[ModelState]:
        now = time.time()
        out = []
        for h in self.held.values():
            progress = min(0.99, (now - h.since) / h.load_s) if h.state == m.MODEL_LOADING else 0.0
            card = h.card
            out.append(ModelState(id=card.id, state=h.state, context_length=card.context_length, memory=card.memory,
                                  last_used=h.last_used, progress=round(progress, 2)))  # fmt: skip
        return out

    async def advertise(self) -> None:
        await self.advertiser.publish(self.states())

    async def run(self) -> None:
        """The real worker's advert loop: every interval, or sooner when something changed."""
        await asyncio.sleep(self.rng.uniform(0, names.ADVERT_INTERVAL_S))  # workers start out of phase
        upkept = time.monotonic()
        while True:
            await self.advertise()
            await self.advertiser.wait_due(names.ADVERT_INTERVAL_S)
            if self.view is not None and time.monotonic() - upkept >= names.ADVERT_INTERVAL_S:
                upkept = time.monotonic()
                with contextlib.suppress(BrokerError):
                    await self.view.keep_placed()

    async def follow(self, placement: Placement | None, model: str, pins: list[Pin]) -> None:
        """Hold `model` or not, as its placement says."""
        wanted = placement is not None and self.worker_id in placement.workers
        if not wanted:
            if self.held.pop(model, None) is not None:
                self.advertiser.soon()
            return
        if model in self.held or model not in self.cards:
            return
        card = self.cards[model]
        advert = self.advertiser.advert(self.states())
        victims = plan_evictions(advert, card.memory, pins) or []
        now = time.time()
        self.held[model] = Held(card, m.MODEL_LOADING, now, self.rng.uniform(0.5, 1.5) * self.load_s)
        for victim in victims:
            self.held.pop(victim, None)
            self.advertiser.metrics.evicted("lru")
            reason = f"evicted from {self.worker_id} to make room for {model} (lru)"
            with contextlib.suppress(BrokerError):
                await change_placement(self.bus, victim, partial(remove_worker, worker=self.worker_id, reason=reason),
                                       by=self.worker_id)  # fmt: skip
        self.advertiser.soon()
        self.tasks.append(asyncio.create_task(self._load(self.held[model])))

    async def _load(self, held: Held) -> None:
        await asyncio.sleep(held.load_s)
        if self.held.get(held.card.id) is held:
            held.state, held.last_used = m.MODEL_READY, time.time()
            self.advertiser.metrics.loaded(held.card.id, held.load_s)
            self.advertiser.soon()


async def main_async(args: argparse.Namespace) -> None:
    cards = catalogue(args.models)
    by_id = {c.id: c for c in cards}
    cpu = torch.device("cpu")
    device = DeviceInfo(cpu, "simulated", [cpu])
    pins: dict[str, Pin] = {}
    workers: list[SimWorker] = []
    control = await open_bus(args.nats, "fleet-sim-control")
    for i in range(args.first, args.first + args.count):
        worker_id = f"sim-{i:04d}"
        bus = await open_bus(args.nats, worker_id)
        metrics = WorkerMetrics()
        advertiser = Advertiser(bus=bus, worker_id=worker_id, device=device, slots=64, memory_budget=BUDGET,
                                eviction="lru", cards=cards, metrics=metrics, draining=asyncio.Event(),
                                busy=lambda: 0, started_at=time.time(), instance=uuid.uuid4().hex[:12])  # fmt: skip
        sim = SimWorker(worker_id, bus, advertiser, by_id, args.load_s, random.Random(i))
        if args.worker_watch:
            sim.view = Placements(bus=bus, worker_id=worker_id, catalogue=specs(cards), draining=asyncio.Event(),
                                  slot_freed=asyncio.Event())  # fmt: skip
            lease = sim.view.hold_lease(advertiser.instance)
            await bus.watch_decisions(sim.view.on_decision)
            sim.tasks.append(asyncio.create_task(lease.run()))
        sim.tasks.append(asyncio.create_task(advertiser.beat()))
        sim.tasks.append(asyncio.create_task(sim.run()))
        workers.append(sim)

    mine = {w.worker_id: w for w in workers}
    pending: set[asyncio.Task[None]] = set()

    def on_decision(key: str, value: bytes | None) -> None:
        parsed = names.parse_placement_key(key)
        if parsed is None:
            return
        kind, model = parsed
        if kind == "pin":
            if value is None:
                pins.pop(model, None)
            else:
                pins[model] = codec.decode_pin(value)
            return
        if kind != "placement":
            return
        placement = codec.decode_placement(value) if value is not None else None
        for worker in mine.values():
            if (placement is not None and worker.worker_id in placement.workers) or model in worker.held:
                task = asyncio.create_task(worker.follow(placement, model, list(pins.values())))
                pending.add(task)
                task.add_done_callback(pending.discard)

    await control.watch_decisions(on_decision)
    print(f"ready {len(workers)}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for worker in workers:
        for task in worker.tasks:
            task.cancel()
    for worker in workers:
        with contextlib.suppress(BrokerError):
            await worker.advertiser.withdraw()
        await worker.bus.close()
    await control.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nats", required=True)
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--load-s", type=float, default=2.0, help="mean simulated load time")
    parser.add_argument("--worker-watch", action="store_true", help="each worker keeps its own view of the fleet")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    install_uvloop()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main_async(args))
    os._exit(0)  # a few hundred connections closed: nothing left worth a slow interpreter teardown


if __name__ == "__main__":
    main()
