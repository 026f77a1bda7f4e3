"""What the fleet page shows: a snapshot of the fleet, and when it changed.

`FleetFeed` hangs on this gateway's `FleetView`, which calls it on every change
its watches bring (adverts, heartbeats, placements, pins), and hands each of
the page's streams an event to wait on. `snapshot` is the JSON the page draws:
the live workers (their adverts, less catalogue and counters), each model's
state across the fleet with its placement, pin, queue and load progress, the
last placement decisions, and tokens/s and time to first token per model from
this gateway's own metrics (`Rates`: what went through this gateway only).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

import msgspec

from cortex.gateway.fleet import FleetView
from cortex.gateway.metrics import UNKNOWN_MODEL, Metrics
from cortex.gateway.services import Services
from cortex.protocol import ModelCard, Placement, WorkerAdvert, catalogues
from cortex.protocol.choice import held_by_model, pinned_models
from cortex.protocol.keys import ApiKey
from cortex.protocol.messages import MODEL_FAILED, MODEL_LOADING, MODEL_READY, MODEL_UNLOADING

SAMPLE_S = 5.0
SAMPLES = 60
"""Tokens/s and TTFT are sampled every `SAMPLE_S`; a sparkline shows the last `SAMPLES` (5 minutes)."""


class Rates:
    """Tokens/s and mean time to first token per model through this gateway, sampled from its own metrics.

    A point is the completion tokens generated over the last `SAMPLE_S`
    divided by it (every request together), and the mean TTFT of the requests
    whose first token came in that time (None: none did).
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.series: dict[str, deque[tuple[float, float | None]]] = {}
        self._last = (time.monotonic(), self._totals())

    def _totals(self) -> dict[str, list[float]]:
        """Per model: completion tokens, TTFT sum and TTFT count, since the process started."""
        totals: dict[str, list[float]] = {}
        wanted = [(self.metrics.completion_tokens, "_total", 0), (self.metrics.ttft, "_sum", 1),
                  (self.metrics.ttft, "_count", 2)]  # fmt: skip
        for metric, suffix, slot in wanted:
            for family in metric.collect():
                for sample in family.samples:
                    model = sample.labels.get("model", UNKNOWN_MODEL)
                    if sample.name.endswith(suffix) and model != UNKNOWN_MODEL:
                        totals.setdefault(model, [0.0, 0.0, 0.0])[slot] = sample.value
        return totals

    def sample(self, now: float) -> None:
        """Take a point per model if `SAMPLE_S` has passed since the last one."""
        then, before = self._last
        if now - then < SAMPLE_S:
            return
        totals = self._totals()
        for model, (tokens, ttft_sum, ttft_count) in totals.items():
            b_tokens, b_sum, b_count = before.get(model, (0.0, 0.0, 0.0))
            answered = ttft_count - b_count
            ttft = round((ttft_sum - b_sum) / answered, 4) if answered else None
            point = (round((tokens - b_tokens) / (now - then), 2), ttft)
            self.series.setdefault(model, deque(maxlen=SAMPLES)).append(point)
        self._last = (now, totals)


class FleetFeed:
    """Tells the fleet page's streams when the fleet changed, and keeps the rates; one per gateway process."""

    def __init__(self, fleet: FleetView, metrics: Metrics) -> None:
        self.rates = Rates(metrics)
        self._changed = asyncio.Event()
        fleet.listeners.append(self.changed)

    def changed(self) -> None:
        """A watch brought a change (heartbeats too, every 0.5 s a worker: they also drive the sampling)."""
        self.rates.sample(time.monotonic())
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def next_change(self) -> asyncio.Event:
        """An event set at the next change (take it before looking at the fleet, so no change slips between)."""
        return self._changed


def snapshot(svc: Services, feed: FleetFeed, key: ApiKey | None) -> dict[str, Any]:
    """The fleet as the page draws it; only the models `key` may use (every model: no key, or an unlimited one)."""
    fleet = svc.fleet
    feed.rates.sample(time.monotonic())
    adverts = sorted(fleet.workers(), key=lambda a: a.worker_id)
    # Passes over every catalogue and every held model, not one per model shown (that was models x workers x
    # catalogue): the last card of each id, its largest memory, and where it is held.
    cards = {card.id: card for advert in adverts for card in advert.catalogue}
    memory = catalogues.largest_per_model(adverts, "memory")
    held = held_by_model(adverts)
    shown = {m for m in cards.keys() | held.keys() if key is None or key.allows(m, *_aliases(cards.get(m)))}
    models = []
    for model in sorted(shown):
        known = cards.get(model)
        on = held.get(model, [])
        placement, pin = fleet.placements.get(model), fleet.pins.get(model)
        series = list(feed.rates.series.get(model, ()))
        models.append({
            "id": model,
            "aliases": _aliases(known),
            "memory": memory.get(model, 0),
            "state": _overall({s.state for _, s in on}, placement),
            "on": [{"worker": w, "state": s.state, "progress": s.progress, "error": s.error} for w, s in on],
            "in_flight": sum(s.in_flight for _, s in on),
            "queue_depth": max((s.queue_depth for _, s in on), default=0),
            "placement": msgspec.to_builtins(placement) if placement else None,
            "pin": msgspec.to_builtins(pin) if pin else None,
            "tokens_per_s": [tps for tps, _ in series],
            "ttft_s": [ttft for _, ttft in series],
        })  # fmt: skip
    decisions = sorted((p for p in fleet.decisions if p.model in shown), key=lambda p: p.updated_at, reverse=True)
    return {
        "gateway": svc.relay.gateway_id,
        "auth": "open" if svc.keys.open else "keys",
        "broker": "connected" if svc.bus.connected else "disconnected",
        "sample_s": SAMPLE_S,
        "samples": SAMPLES,
        "workers": [
            _worker(advert, shown, pinned_models(fleet.pins.values(), advert.worker_id, fleet.placements))
            for advert in adverts
        ],
        "models": models,
        "decisions": [msgspec.to_builtins(p) for p in decisions],
    }


def _worker(advert: WorkerAdvert, shown: set[str], pinned: set[str]) -> dict[str, Any]:
    """A worker's advert (its models only those shown; no catalogue nor counters), its cold models and pins (the
    copies a pin keeps here: an extra copy of a model pinned by count is not one)."""
    models = [s for s in advert.models if s.id in shown]
    data: dict[str, Any] = msgspec.to_builtins(
        msgspec.structs.replace(advert, models=models, catalogue=[], lifecycle=None)
    )
    data.pop("updated_at", None)  # rewritten every 2 s: the page would be sent a new snapshot for nothing
    held = {s.id for s in models}
    data["cold"] = [{"id": c.id, "memory": c.memory} for c in advert.catalogue if c.id in shown and c.id not in held]
    data["pinned"] = sorted(held & pinned)
    return data


def _aliases(card: ModelCard | None) -> list[str]:
    return card.aliases if card is not None else []


def _overall(states: set[str], placement: Placement | None) -> str:
    """One word for a model across the fleet: the best state any worker has it in, else placed or cold."""
    for state in (MODEL_READY, MODEL_LOADING, MODEL_UNLOADING, MODEL_FAILED):
        if state in states:
            return state
    return "placed" if placement is not None and placement.workers else "cold"
