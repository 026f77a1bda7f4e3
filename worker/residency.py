"""Which models this worker holds, and why: placements in, loads and unloads out.

Which models are loaded follows the placement bucket: a worker loads the models
whose placement names it and unloads the others (evicted, idle past their
``keep_alive``, or drained). Room for a new model is made by evicting, under the
worker's strategy, models that are neither pinned nor busy. What the placements
say, and every change this worker makes to them, goes through
`cortex.worker.placements`.

Requests are not handled here: once a model is ready, its slot is handed to the
request side (`serve_requests`), which runs the model's pull loop until the slot
is ``leaving``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from cortex.broker.bus import Bus, PullQueue
from cortex.broker.errors import BrokerError
from cortex.protocol import ModelState, WorkerAdvert
from cortex.protocol import messages as m
from cortex.protocol.placement import gib, plan_evictions
from cortex.worker.advert import Advertiser, WorkerMetrics
from cortex.worker.catalogue import ModelSpec
from cortex.worker.engine import Engine
from cortex.worker.inflight import FETCH_TIMEOUT_S, Settled
from cortex.worker.placements import Placements
from cortex.worker.synthetic import SyntheticEngine

log = logging.getLogger("cortex.worker")

LOAD_BYTES_PER_S = 50 * 2**20
"""For load progress before a model has loaded here once: a guess of how fast weights load."""
SWAP_WAIT_CAP_S = 30.0
"""A model waiting for room on this worker waits at most this long for busy models to drain."""
SWAP_POLL_S = 0.25


@dataclass
class ModelSlot:
    spec: ModelSpec
    state: str = m.MODEL_LOADING
    error: str = ""
    context_length: int = 0
    in_flight: int = 0
    reasoning: bool = False
    memory: int = 0
    last_used: float = 0.0
    queue_depth: int = 0
    failed_at: float = 0.0
    loading_since: float = 0.0
    expected_load_s: float = 0.0
    leaving: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the model is to unload: its pull loop stops taking requests."""
    task: asyncio.Task[None] | None = None
    pull: PullQueue | None = None

    @property
    def model(self) -> str:
        return self.spec.id


ServeRequests = Callable[[ModelSlot, PullQueue, Settled], Awaitable[None]]
"""Runs a ready model's pull loop until its slot is ``leaving`` (`cortex.worker.inflight.Requests.pull_loop`)."""


@dataclass
class Residency:
    bus: Bus
    engine: Engine | SyntheticEngine
    catalogue: list[ModelSpec]
    worker_id: str
    loader: Callable[[ModelSpec], Any]
    """Loads a catalogue entry on the engine thread (the transformers loader, or the synthetic one)."""
    eviction: str
    estimates: dict[str, int]
    """Bytes each catalogue model needs on this device."""
    placements: Placements
    metrics: WorkerMetrics
    advertiser: Advertiser
    serve_requests: ServeRequests
    stopping: asyncio.Event
    slot_freed: asyncio.Event
    """Shared with the request side: set to make pull loops look again, and whenever a request ends."""
    _models: dict[str, ModelSlot] = field(default_factory=dict)
    _unloading: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _unload_kind: dict[str, str] = field(default_factory=dict)
    """Why a model is about to unload, for the evictions metric (set where the decision is made)."""
    _load_times: dict[str, float] = field(default_factory=dict)
    """How long each model took to load here last time: the yardstick of load progress."""

    def model_states(self) -> list[ModelState]:
        """The models held, as the advert shows them."""
        return [
            ModelState(
                id=s.spec.id,
                state=s.state,
                in_flight=s.in_flight,
                context_length=s.context_length,
                error=s.error,
                reasoning=s.reasoning,
                memory=s.memory,
                last_used=s.last_used,
                queue_depth=s.queue_depth,
                progress=_progress(s),
            )
            for s in list(self._models.values())
        ]

    def advert(self) -> WorkerAdvert:
        return self.advertiser.advert(self.model_states())

    async def advertise(self) -> None:
        await self.advertiser.publish(self.model_states())

    async def upkeep(self) -> None:
        """The periodic checks: queue depths, idle models, models to keep loaded somewhere."""
        self.placements.changed.set()  # cheap when nothing changed; heals a missed notification
        await self._measure_queues()
        await self._expire_idle()
        await self.placements.keep_placed()

    async def stop_serving(self) -> None:
        """On shutdown: every pull loop stops within one fetch; a model still loading is abandoned.

        Placements stay as they are: a restarted worker loads its models again.
        """
        for slot in self._models.values():
            slot.leaving.set()
        serving = [slot.task for slot in self._models.values() if slot.task is not None]
        if serving:
            _, loading = await asyncio.wait(serving, timeout=FETCH_TIMEOUT_S + 5.0)
            for task in loading:
                task.cancel()

    def _request_settled(self, model: str) -> None:
        """A request for `model` was settled (called by the request side)."""
        slot = self._models.get(model)
        if slot is not None:
            slot.in_flight -= 1
            slot.last_used = time.time()
            self.advertiser.soon()  # placement decisions elsewhere go by how recently models were used

    async def reconcile_loop(self) -> None:
        while True:
            await self.placements.changed.wait()
            self.placements.changed.clear()
            try:
                await self._reconcile()
            except Exception:
                log.exception("reconciling the loaded models failed")  # tried again on the next change

    def _begin_unload(self, slot: ModelSlot, why: str, kind: str) -> None:
        """Start unloading `slot` unless it already is; `kind` labels the evictions metric (a kind set earlier wins)."""
        model = slot.spec.id
        if model in self._unloading:
            return
        self._unload_kind.setdefault(model, kind)
        self._unloading[model] = asyncio.create_task(self._unload(slot, why), name=f"unload-{model}")

    async def _reconcile(self) -> None:
        """Load what the placements name this worker for; unload the rest."""
        wanted = self.placements.wanted()
        for model, slot in list(self._models.items()):
            if model not in wanted:
                why = "drained" if self.placements.draining.is_set() else "no longer placed here"
                self._begin_unload(slot, why, "drain" if self.placements.draining.is_set() else "unplaced")
        for model in sorted(wanted):
            if model not in self.placements.wanted():
                continue  # evicted by an earlier load of this same pass
            held = self._models.get(model)
            placement = self.placements.placement(model)
            if held is not None and not (held.state == m.MODEL_FAILED and placement.updated_at > held.failed_at):
                continue
            spec = next((s for s in self.catalogue if s.id == model), None)
            if spec is None:
                if self.worker_id not in placement.failed:
                    await self.placements.load_failed(model, f"{self.worker_id} has no {model} in its catalogue")
            elif not self.stopping.is_set():
                await self._start_loading(spec)

    async def _start_loading(self, spec: ModelSpec) -> None:
        if self._unloading:  # the memory they free is counted only once it is free
            await asyncio.gather(*self._unloading.values(), return_exceptions=True)
        self._models.pop(spec.id, None)  # a failed earlier attempt
        need = self.estimates.get(spec.id, 0)
        victims = await self._make_room_for(spec.id, need)
        if spec.id not in self.placements.wanted() or self.stopping.is_set():
            return
        if victims is None:
            why = f"{self.worker_id} cannot make room: it needs {gib(need)} and its other models are pinned"
            await self.placements.load_failed(spec.id, why)
            return
        for victim in victims:
            reason = f"evicted from {self.worker_id} to make room for {spec.id} ({self.eviction})"
            log.info("%s", reason)
            self._unload_kind[victim] = self.eviction
            await self.placements.unplace_here(victim, reason)
            slot = self._models.get(victim)
            if slot is not None:
                self._begin_unload(slot, reason, self.eviction)
            if victim in self._unloading:
                await self._unloading[victim]
        slot = ModelSlot(spec=spec, memory=need, loading_since=time.monotonic(),
                         expected_load_s=self._load_times.get(spec.id, max(1.0, need / LOAD_BYTES_PER_S)))  # fmt: skip
        self._models[spec.id] = slot
        slot.task = asyncio.create_task(self._serve_model(slot), name=f"serve-{spec.id}")
        await self.advertise()

    async def _make_room_for(self, model: str, need: int) -> list[str] | None:
        """The models to evict for `model`, once they are idle: swap-aware queueing.

        Models with requests running or queued are served first; after
        `SWAP_WAIT_CAP_S` they stop taking requests (theirs wait in the queue)
        so the model that has waited gets its turn. None if only pinned models
        stand in the way.
        """
        deadline = time.monotonic() + SWAP_WAIT_CAP_S
        await self._measure_queues()  # queued requests spare a model: look at the queues as they are now
        while True:
            advert = self.advert()
            victims = plan_evictions(advert, need, self.placements.pins())
            if victims is not None:
                return victims
            blocked = plan_evictions(advert, need, self.placements.pins(), busy_too=True)
            if blocked is None:
                return None
            if self.stopping.is_set() or model not in self.placements.wanted():
                return []  # no longer to be loaded here: the caller looks again
            if any((v := self._models.get(b)) is not None and v.state != m.MODEL_READY for b in blocked):
                # A model still loading gets its full turn once ready: swapping it out unserved would livelock.
                deadline = time.monotonic() + SWAP_WAIT_CAP_S
            elif time.monotonic() >= deadline:
                for victim in blocked:  # their queues wait; the unload lets running requests finish
                    if (slot := self._models.get(victim)) is not None:
                        slot.leaving.set()
                        slot.queue_depth = 0
                log.info("swapping %s out for %s after waiting %.0fs", ", ".join(blocked), model, SWAP_WAIT_CAP_S)
                return blocked
            await asyncio.sleep(SWAP_POLL_S)
            await self._measure_queues()

    async def _serve_model(self, slot: ModelSlot) -> None:
        started = time.monotonic()
        try:
            loaded = await asyncio.wrap_future(self.engine.call(lambda: self.loader(slot.spec)))
        except Exception as exc:
            log.exception("loading %s failed", slot.spec.id)
            self.metrics.load_failed(slot.spec.id)
            slot.state, slot.error, slot.failed_at = m.MODEL_FAILED, f"{type(exc).__name__}: {exc}", time.time()
            await self.advertise()
            await self.placements.load_failed(slot.spec.id, f"{self.worker_id}: {slot.error}")
            return
        if slot.leaving.is_set():
            return  # unloaded while it loaded: the weights go with this frame
        self.engine.add_model(loaded)
        seconds = time.monotonic() - started
        self._load_times[slot.spec.id] = seconds
        self.metrics.loaded(slot.spec.id, seconds)
        slot.pull = await self._open_pull_queue(slot)
        if slot.leaving.is_set():
            await slot.pull.close()
            return
        slot.state, slot.context_length = m.MODEL_READY, loaded.context_length
        slot.reasoning = getattr(loaded, "reasoning", None) is not None  # the synthetic model has no tags
        slot.last_used = time.time()
        await self.advertise()
        try:
            await self.serve_requests(slot, slot.pull, self._request_settled)
        finally:
            await slot.pull.close()

    async def _unload(self, slot: ModelSlot, reason: str) -> None:
        """Stop taking requests for the model, let those running finish, then free its memory."""
        model = slot.spec.id
        try:
            was_ready = slot.state == m.MODEL_READY
            slot.state = m.MODEL_UNLOADING if slot.state != m.MODEL_FAILED else slot.state
            slot.leaving.set()
            self.slot_freed.set()
            await self.advertise()
            if slot.task is not None:
                # The pull loop notices `leaving` within one fetch; cancelling it mid-fetch would strand
                # the requests it was being handed until JetStream's ack wait gives them to someone else.
                await asyncio.wait([slot.task], timeout=FETCH_TIMEOUT_S + 2.0)
            while slot.in_flight > 0 and not self.stopping.is_set():
                self.slot_freed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.slot_freed.wait(), timeout=1.0)
            if slot.task is not None:
                slot.task.cancel()
                await asyncio.gather(slot.task, return_exceptions=True)
            # Always: a load that finished while this unload waited has put the model in the engine.
            freed = await asyncio.wrap_future(self.engine.remove_model(model))
            if was_ready or freed:
                log.info("unloaded %s (%s); %s freed", model, reason, gib(freed))
                kind = self._unload_kind.pop(model, "unplaced")
                self.metrics.evicted(kind)
        finally:
            self._models.pop(model, None)
            self._unloading.pop(model, None)
            self._unload_kind.pop(model, None)
            self.placements.changed.set()  # it may have been placed here again meanwhile
            await self.advertise()

    async def _expire_idle(self) -> None:
        """Take idle models past their ``keep_alive`` off this worker's placements (pinned ones stay)."""
        now = time.time()
        pinned = self.placements.pinned_here()
        for model, slot in list(self._models.items()):
            keep = slot.spec.keep_alive_seconds
            idle = now - slot.last_used
            if (slot.state != m.MODEL_READY or keep < 0 or model in pinned or slot.in_flight or slot.queue_depth
                    or idle < keep):  # fmt: skip
                continue
            self._unload_kind[model] = "keep_alive"
            reason = f"idle on {self.worker_id} for {idle:.0f}s (keep_alive {keep:g}s)"
            # Only while the placement's other live workers keep min_replicas (checked at write time).
            await self.placements.leave_idle(model, reason, slot.spec.min_replicas)

    async def _measure_queues(self) -> None:
        for slot in list(self._models.values()):
            if slot.pull is not None and slot.state == m.MODEL_READY:
                with contextlib.suppress(BrokerError):  # shown as it was until the broker answers
                    slot.queue_depth = await slot.pull.pending()

    async def _open_pull_queue(self, slot: ModelSlot) -> PullQueue:
        """The model's consumer; retried while the broker is away (the worker is useless without it)."""
        while True:
            try:
                return await self.bus.pull_queue(slot.spec.id)
            except BrokerError as exc:
                log.warning("cannot bind the consumer of %s yet: %s", slot.spec.id, exc)
                await asyncio.sleep(1.0)


def _progress(slot: ModelSlot) -> float:
    """How far a load has got, judged by the time the last load of the model took (transformers reports none)."""
    if slot.state == m.MODEL_READY:
        return 1.0
    if slot.state != m.MODEL_LOADING or not slot.expected_load_s:
        return 0.0
    return min(0.99, (time.monotonic() - slot.loading_since) / slot.expected_load_s)
