"""The fleet's per-decision and per-advert costs in one process, no broker: sizes a machine cannot host live.

python -m bench.fleet_sim_offline --sizes 50,200,500,2000 --models 500

`bench.fleet_sim` runs the fleet for real; on a small machine its largest
sizes starve (every process shares the cores). This builds the same adverts
in memory with the product's `cortex.worker.advert.Advertiser` (the catalogue
of `bench.fleet_sim_catalogue`, each worker holding models to its budget,
popular ones more often), the placements they imply, and times, on one core
with nothing else to wait for:

- what one advert interval (2 s) of the fleet costs a reader: every worker's
  advert and four heartbeats into `FleetView.on_change` (decode and keep, the
  garbage collector included, and again without it), so a gateway's
  fleet-tracking CPU share less the NATS client's own share of reading the
  messages (see docs/scale.md);
- one placement decision (`protocol.placement.pick_worker` over every live
  advert and placement, as `place_on_demand` calls it for a model evicted
  everywhere);
- the model list behind ``/v1/models`` and every request's model resolution:
  computed from scratch (`FleetView._compute_models` with the merged
  catalogues dropped, as when a catalogue or the live set changes), again
  after a model's state changed (the merged catalogues kept), and what a
  request pays (`FleetView.models()`) with the fleet's adverts arriving in
  between, one per request, that change nothing the list shows;
- what ``cortexctl status --json`` does after reading the buckets: decode each
  advert (`fleet_ops.live_adverts`) and print them (`broker.ctl.status_json`).

One JSON line per size, then the growth exponents.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import time
from typing import Any

import torch

from bench.common import percentile
from bench.fleet_sim import exponents
from bench.fleet_sim_catalogue import BUDGET, catalogue
from cortex.broker.ctl import status_json
from cortex.gateway.fleet import FleetView
from cortex.protocol import ModelState, Placement, WorkerAdvert, catalogues, codec, names
from cortex.protocol import messages as m
from cortex.protocol.choice import pick_worker
from cortex.protocol.heartbeat import Heartbeat
from cortex.worker.advert import Advertiser, WorkerMetrics
from cortex.worker.device import DeviceInfo


def fleet(workers: int, models: int) -> tuple[list[WorkerAdvert], dict[str, Placement]]:
    cards = catalogue(models)
    weights = [1 / (rank + 1) ** 1.1 for rank in range(len(cards))]
    cpu = torch.device("cpu")
    rng = random.Random(5)
    adverts, placed = [], {}
    for i in range(workers):
        worker_id = f"sim-{i:04d}"
        advertiser = Advertiser(bus=None, worker_id=worker_id, device=DeviceInfo(cpu, "simulated", [cpu]), slots=64,  # type: ignore[arg-type]
                                memory_budget=BUDGET, eviction="lru", cards=cards, metrics=WorkerMetrics(),
                                draining=asyncio.Event(), busy=lambda: 0, started_at=time.time())  # fmt: skip
        held: dict[str, ModelState] = {}
        used = 0
        for _ in range(40):
            card = rng.choices(cards, weights)[0]
            if card.id in held or used + card.memory > BUDGET:
                continue
            used += card.memory
            last_used = time.time() - rng.random() * 600
            held[card.id] = ModelState(id=card.id, state=m.MODEL_READY, memory=card.memory,
                                       context_length=card.context_length, last_used=last_used)  # fmt: skip
            placed.setdefault(card.id, []).append(worker_id)
        adverts.append(advertiser.advert(list(held.values())))
    placements = {model: Placement(model=model, workers=on, reason="x") for model, on in placed.items()}
    return adverts, placements


def timed(fn: Any, runs: int, budget_s: float = 10.0) -> list[float]:
    samples: list[float] = []
    until = time.monotonic() + budget_s
    while len(samples) < runs and (len(samples) < 3 or time.monotonic() < until):
        t0 = time.process_time()
        fn()
        samples.append((time.process_time() - t0) * 1000)
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    return {"p50_ms": round(statistics.median(samples), 4), "p99_ms": round(percentile(samples, 99), 4),
            "runs": len(samples)}  # fmt: skip


def measure(workers: int, models: int) -> dict[str, Any]:
    adverts, placements = fleet(workers, models)
    raw = [codec.encode(catalogues.on_the_wire(a)) for a in adverts]  # as `Advertiser.publish` writes them
    view = FleetView(stale_after=1e9)  # nothing here goes stale while it is timed: every worker stays live
    view._fleet.beat_window = 1e9
    for advert, value in zip(adverts, raw, strict=True):
        view.on_change(names.worker_key(advert.worker_id), value)
        view.on_change(names.alive_key(advert.worker_id), codec.encode(Heartbeat(worker_id=advert.worker_id)))
    view.placements.update(placements)
    rng = random.Random(3)
    beat = codec.encode(Heartbeat(worker_id=adverts[0].worker_id, seq=1, instance="abc"))
    beat_keys = [names.alive_key(a.worker_id) for a in adverts]
    advert_keys = [names.worker_key(a.worker_id) for a in adverts]

    def interval() -> None:  # what a reader is sent in one advert interval: every advert once, 4 beats each
        for i in range(workers):
            view.on_change(advert_keys[i], raw[i])
            for _ in range(int(names.ADVERT_INTERVAL_S / names.HEARTBEAT_INTERVAL_S)):
                view.on_change(beat_keys[i], beat)

    interval_ms = timed(interval, 3, 15.0)
    gc.disable()
    interval_no_gc_ms = timed(interval, 2, 10.0)
    gc.enable()
    live = view.workers()
    assert len(live) == workers
    ids = [c.id for c in catalogue(models)]

    def decide() -> None:
        pick_worker(rng.choice(ids), live, view.pins.values(), placements=view.placements.values())

    decide_ms = timed(decide, 30)

    def from_scratch() -> None:
        view._cards = None
        view._compute_models()

    models_ms = timed(from_scratch, 10)
    view.models()
    state_ms = timed(view._compute_models, 10)
    request_ms: list[float] = []
    for turn in range(min(1000, 5 * workers)):  # an advert that changes nothing shown (untimed), then a request
        view.on_change(advert_keys[turn % workers], raw[turn % workers])
        t0 = time.process_time()
        view.models()
        request_ms.append((time.process_time() - t0) * 1000)

    def status() -> None:  # cortexctl status --json after its reads: decode, print
        decoded = [codec.decode_advert(value) for value in raw]
        status_json(decoded, {}, {})

    status_ms = timed(status, 3, 20.0)
    rate_adverts = workers / names.ADVERT_INTERVAL_S
    return {
        "workers": workers,
        "models": models,
        "placed_models": len(placements),
        "advert_bytes": round(statistics.mean(len(r) for r in raw)),
        "advert_bytes_per_s": round(rate_adverts * statistics.mean(len(r) for r in raw)),
        "reader_interval_ms": summary(interval_ms),
        "reader_cpu_share": round(statistics.median(interval_ms) / 1000 / names.ADVERT_INTERVAL_S, 4),
        "reader_cpu_share_without_gc": round(statistics.median(interval_no_gc_ms) / 1000 / names.ADVERT_INTERVAL_S, 4),
        "pick_worker": summary(decide_ms),
        "compute_models": summary(models_ms),
        "compute_models_after_state_change": summary(state_ms),
        "models_per_request": summary(request_ms),
        "cortexctl_status_after_reads": summary(status_ms),
    }


FLAT = {
    "fleet_sim_gateway_view_cpu_share": "reader_cpu_share",
    "fleet_sim_advert_bytes_per_s": "advert_bytes_per_s",
    "fleet_sim_place_p50_ms": ("pick_worker", "p50_ms"),
    "fleet_sim_place_p99_ms": ("pick_worker", "p99_ms"),
    "fleet_sim_compute_models_p50_ms": ("compute_models", "p50_ms"),
    "fleet_sim_models_per_request_p50_ms": ("models_per_request", "p50_ms"),
    "fleet_sim_cortexctl_status_p50_ms": ("cortexctl_status_after_reads", "p50_ms"),
}


def flat(result: dict[str, Any]) -> dict[str, Any]:
    """The figures under `bench.fleet_sim`'s names, so `exponents` reads them."""
    out: dict[str, Any] = {"fleet_sim_workers": result["workers"]}
    for key, where in FLAT.items():
        out[key] = result[where] if isinstance(where, str) else result[where[0]][where[1]]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="50,200,500,2000")
    parser.add_argument("--models", type=int, default=500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    for workers in (int(s) for s in args.sizes.split(",") if s):
        result = measure(workers, args.models)
        results.append(result)
        print(json.dumps({"fleet_sim_offline": result}), flush=True)
    if len(results) > 1:
        print(json.dumps({"fleet_sim_offline_growth_exponents": exponents([flat(r) for r in results])}), flush=True)


if __name__ == "__main__":
    main()
