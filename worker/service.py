"""The worker's asyncio side: pull requests, hand them to the engine, relay chunks, advertise.

A worker takes from a model's durable consumer only as many requests as it has
free slots, so warm load balancing needs no router: idle workers pull, busy
ones don't. Each request is acked once its last chunk is published; while it
runs, ``in_progress`` keeps JetStream from giving it to another worker.

Which models are loaded follows the placement bucket: a worker loads the models
whose placement names it and unloads the others (evicted, idle past their
``keep_alive``, or drained). Room for a new model is made by evicting, under the
worker's strategy, models that are neither pinned nor busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cortex.broker.bus import Bus, Delivery, PullQueue
from cortex.broker.decisions import change_placement, with_worker, without_worker
from cortex.broker.errors import BrokerError
from cortex.protocol import Chunk, GenerateRequest, ModelState, Pin, Placement, WorkerAdvert, codec, names
from cortex.protocol import messages as m
from cortex.protocol.placement import Choice, choose_worker, gib, pinned_models, plan_evictions
from cortex.worker.catalogue import ModelSpec
from cortex.worker.device import DeviceInfo
from cortex.worker.engine import Engine
from cortex.worker.outbox import Outbox
from cortex.worker.synthetic import SyntheticEngine

log = logging.getLogger("cortex.worker")

FETCH_TIMEOUT_S = 1.0
PROGRESS_INTERVAL_S = 10.0
DRAIN_TIMEOUT_S = 30.0
"""On shutdown, how long in-flight requests may run before they go back to the queue."""
LOAD_BYTES_PER_S = 50 * 2**20
"""For load progress before a model has loaded here once: a guess of how fast weights load."""
RETRY_FAILED_S = 30.0
"""A model no worker could load is not placed again by this worker for this long."""
SWAP_WAIT_CAP_S = 30.0
"""A model waiting for room on this worker waits at most this long for busy models to drain."""
SWAP_POLL_S = 0.25
ADVERT_MIN_GAP_S = 0.25
"""Adverts that follow a change (a finished request) come at most this often."""
CANCELLED_KEEP_S = 600.0
CANCELLED_MAX = 10_000
VERSION = "0.1.0"


@dataclass
class InFlight:
    delivery: Delivery
    request: GenerateRequest
    model: str


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


@dataclass
class WorkerService:
    bus: Bus
    engine: Engine | SyntheticEngine
    device: DeviceInfo
    catalogue: list[ModelSpec]
    serve: list[ModelSpec]
    worker_id: str
    slots: int
    loader: Callable[[ModelSpec], Any]
    """Loads a catalogue entry on the engine thread (the transformers loader, or the synthetic one)."""
    memory_budget: int = 0
    """Bytes models may take (0: the device's memory)."""
    eviction: str = "lru"
    dtype: str = "float32"
    """What ``dtype = "auto"`` loads as on this device (for memory estimates)."""
    _models: dict[str, ModelSlot] = field(default_factory=dict)
    _estimates: dict[str, int] = field(default_factory=dict)
    _cards: list[m.ModelCard] = field(default_factory=list)
    """The catalogue as adverts show it, built once."""
    _fleet: dict[str, WorkerAdvert] = field(default_factory=dict)
    _placements: dict[str, Placement] = field(default_factory=dict)
    _pins: dict[str, Pin] = field(default_factory=dict)
    _draining: bool = False
    _reconcile_needed: asyncio.Event = field(default_factory=asyncio.Event)
    _unloading: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _advert_soon: asyncio.Event = field(default_factory=asyncio.Event)
    _lifecycle: m.Lifecycle = field(default_factory=m.Lifecycle)
    _unload_kind: dict[str, str] = field(default_factory=dict)
    """Why a model is about to unload, for the evictions metric (set where the decision is made)."""
    _load_times: dict[str, float] = field(default_factory=dict)
    """How long each model took to load here last time: the yardstick of load progress."""
    _in_flight: dict[str, InFlight] = field(default_factory=dict)
    _reserved: int = 0
    _outbox: Outbox | None = None
    _slot_freed: asyncio.Event = field(default_factory=asyncio.Event)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _started_at: float = field(default_factory=time.time)
    _background: set[asyncio.Task[None]] = field(default_factory=set)
    _cancelled: dict[str, float] = field(default_factory=dict)
    _pulling: int = 0

    @property
    def free_slots(self) -> int:
        return self.slots - len(self._in_flight) - self._reserved

    async def run(self) -> None:
        """Serve until `stop` is called; then finish what is in flight and withdraw."""
        self._outbox = Outbox(asyncio.get_running_loop())
        self._estimates = {spec.id: spec.memory_needed(self.dtype) for spec in self.catalogue}
        self._cards = [spec.card(self._estimates[spec.id]) for spec in self.catalogue]
        await self._advertise()
        cancel_sub = await self.bus.subscribe(names.cancel_subject(), self._on_cancel)
        await self.bus.watch_fleet(self._on_advert)
        await self.bus.watch_decisions(self._on_decision)
        for spec in self.serve:
            await self._place_here(spec.id, "loaded at start (--model)")
        tasks = [
            asyncio.create_task(self._publisher(), name="chunk-publisher"),
            asyncio.create_task(self._advert_loop(), name="advert"),
            asyncio.create_task(self._progress_loop(), name="in-progress"),
            asyncio.create_task(self._reconcile_loop(), name="reconcile"),
        ]
        await self._stopping.wait()
        # Pull loops notice the stop within one fetch; a model still loading is abandoned.
        # Placements stay as they are: a restarted worker loads its models again.
        for slot in self._models.values():
            slot.leaving.set()
        serving = [slot.task for slot in self._models.values() if slot.task is not None]
        if serving:
            _, loading = await asyncio.wait(serving, timeout=FETCH_TIMEOUT_S + 5.0)
            for task in loading:
                task.cancel()
        await self._wait_in_flight(timeout=DRAIN_TIMEOUT_S)
        for request_id in list(self._in_flight):
            self.engine.cancel(request_id)
        await cancel_sub.unsubscribe()
        await self._drain_outbox()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for request_id in list(self._in_flight):
            await self._release(request_id, outcome="nak")  # another worker takes it up
        try:
            await self.bus.delete_advert(names.worker_key(self.worker_id))
        except BrokerError as exc:
            log.warning("could not withdraw advert: %s", exc)

    def stop(self) -> None:
        self._stopping.set()
        self._slot_freed.set()  # wake pull loops waiting for a slot

    # -- which models are loaded ---------------------------------------------

    def _on_advert(self, key: str, value: bytes | None) -> None:
        if not names.is_worker_key(key):
            return
        if value is None:
            self._fleet.pop(key, None)
            return
        try:
            self._fleet[key] = codec.decode_advert(value)
        except codec.DecodeError:
            self._fleet.pop(key, None)

    def _on_decision(self, key: str, value: bytes | None) -> None:
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
            elif name == self.worker_id:
                self._draining = value is not None
                self._slot_freed.set()  # pull loops look again
        except codec.DecodeError:
            log.warning("ignoring malformed %s", key)
            return
        self._reconcile_needed.set()

    async def _place_here(self, model: str, reason: str) -> None:
        try:
            await change_placement(self.bus, model, with_worker(self.worker_id, f"{self.worker_id}: {reason}"),
                                   by=self.worker_id)  # fmt: skip
        except BrokerError as exc:
            log.warning("cannot place %s here: %s", model, exc)

    async def _unplace_here(self, model: str, reason: str) -> None:
        try:
            await change_placement(self.bus, model, without_worker(self.worker_id, reason), by=self.worker_id)
        except BrokerError as exc:
            log.warning("cannot take %s off this worker's placement: %s", model, exc)

    def _wanted(self) -> set[str]:
        if self._draining:
            return set()
        return {model for model, p in self._placements.items() if self.worker_id in p.workers}

    async def _reconcile_loop(self) -> None:
        while True:
            await self._reconcile_needed.wait()
            self._reconcile_needed.clear()
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
        wanted = self._wanted()
        for model, slot in list(self._models.items()):
            if model not in wanted:
                why = "drained" if self._draining else "no longer placed here"
                self._begin_unload(slot, why, "drain" if self._draining else "unplaced")
        for model in sorted(wanted):
            if model not in self._wanted():
                continue  # evicted by an earlier load of this same pass
            slot = self._models.get(model)
            placement = self._placements[model]
            if slot is not None and not (slot.state == m.MODEL_FAILED and placement.updated_at > slot.failed_at):
                continue
            spec = next((s for s in self.catalogue if s.id == model), None)
            if spec is None:
                if self.worker_id not in placement.failed:
                    await self._load_failed(model, f"{self.worker_id} has no {model} in its catalogue")
            elif not self._stopping.is_set():
                await self._start_loading(spec)

    async def _start_loading(self, spec: ModelSpec) -> None:
        if self._unloading:  # the memory they free is counted only once it is free
            await asyncio.gather(*self._unloading.values(), return_exceptions=True)
        self._models.pop(spec.id, None)  # a failed earlier attempt
        need = self._estimates.get(spec.id, 0)
        victims = await self._make_room_for(spec.id, need)
        if spec.id not in self._wanted() or self._stopping.is_set():
            return
        if victims is None:
            why = f"{self.worker_id} cannot make room: it needs {gib(need)} and its other models are pinned"
            await self._load_failed(spec.id, why)
            return
        for victim in victims:
            reason = f"evicted from {self.worker_id} to make room for {spec.id} ({self.eviction})"
            log.info("%s", reason)
            self._unload_kind[victim] = self.eviction
            await self._unplace_here(victim, reason)
            slot = self._models.get(victim)
            if slot is not None:
                self._begin_unload(slot, reason, self.eviction)
            if victim in self._unloading:
                await self._unloading[victim]
        slot = ModelSlot(spec=spec, memory=need, loading_since=time.monotonic(),
                         expected_load_s=self._load_times.get(spec.id, max(1.0, need / LOAD_BYTES_PER_S)))  # fmt: skip
        self._models[spec.id] = slot
        slot.task = asyncio.create_task(self._serve_model(slot), name=f"serve-{spec.id}")
        await self._advertise()

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
            victims = plan_evictions(advert, need, self._pins.values())
            if victims is not None:
                return victims
            blocked = plan_evictions(advert, need, self._pins.values(), busy_too=True)
            if blocked is None:
                return None
            if self._stopping.is_set() or model not in self._wanted():
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
        life = self._lifecycle
        try:
            loaded = await asyncio.wrap_future(self.engine.call(lambda: self.loader(slot.spec)))
        except Exception as exc:
            log.exception("loading %s failed", slot.spec.id)
            life.load_failures[slot.spec.id] = life.load_failures.get(slot.spec.id, 0) + 1
            slot.state, slot.error, slot.failed_at = m.MODEL_FAILED, f"{type(exc).__name__}: {exc}", time.time()
            await self._advertise()
            await self._load_failed(slot.spec.id, f"{self.worker_id}: {slot.error}")
            return
        if slot.leaving.is_set():
            return  # unloaded while it loaded: the weights go with this frame
        self.engine.add_model(loaded)
        seconds = time.monotonic() - started
        self._load_times[slot.spec.id] = seconds
        life.cold_starts[slot.spec.id] = life.cold_starts.get(slot.spec.id, 0) + 1
        if not life.load_seconds_buckets:
            life.load_seconds_buckets = [0] * len(m.LOAD_SECONDS_BUCKETS)
        for i, bound in enumerate(m.LOAD_SECONDS_BUCKETS):
            life.load_seconds_buckets[i] += seconds <= bound
        life.load_seconds_sum += seconds
        life.loads += 1
        slot.pull = await self._open_pull_queue(slot)
        if slot.leaving.is_set():
            await slot.pull.close()
            return
        slot.state, slot.context_length = m.MODEL_READY, loaded.context_length
        slot.reasoning = getattr(loaded, "reasoning", None) is not None  # the synthetic model has no tags
        slot.last_used = time.time()
        await self._advertise()
        try:
            await self._pull_loop(slot, slot.pull)
        finally:
            await slot.pull.close()

    async def _load_failed(self, model: str, reason: str) -> None:
        """Leave the placement with the reason, and hand the model to the next best worker (or record why none)."""
        me = self.worker_id

        def change(current: Placement | None) -> Placement | None:
            failed = {**(current.failed if current else {}), me: reason}
            workers = [w for w in (current.workers if current else []) if w != me]
            if workers:
                return Placement(model=model, workers=workers, reason=current.reason if current else "", failed=failed)
            choice = choose_worker(model, self._fleet.values(), self._pins.values(), exclude=failed,
                                   placements=self._placements.values())  # fmt: skip
            if isinstance(choice, str):
                return Placement(model=model, reason=choice, failed=failed, error=f"{choice} ({reason})")
            return Placement(model=model, workers=[choice.worker], failed=failed,
                             reason=f"{choice.reason}, after {me} failed")  # fmt: skip

        try:
            await change_placement(self.bus, model, change, by=me)
        except BrokerError as exc:
            log.warning("cannot record the failed load of %s: %s", model, exc)

    async def _unload(self, slot: ModelSlot, reason: str) -> None:
        """Stop taking requests for the model, let those running finish, then free its memory."""
        model = slot.spec.id
        try:
            was_ready = slot.state == m.MODEL_READY
            slot.state = m.MODEL_UNLOADING if slot.state != m.MODEL_FAILED else slot.state
            slot.leaving.set()
            self._slot_freed.set()
            await self._advertise()
            if slot.task is not None:
                # The pull loop notices `leaving` within one fetch; cancelling it mid-fetch would strand
                # the requests it was being handed until JetStream's ack wait gives them to someone else.
                await asyncio.wait([slot.task], timeout=FETCH_TIMEOUT_S + 2.0)
            while slot.in_flight > 0 and not self._stopping.is_set():
                self._slot_freed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot_freed.wait(), timeout=1.0)
            if slot.task is not None:
                slot.task.cancel()
                await asyncio.gather(slot.task, return_exceptions=True)
            # Always: a load that finished while this unload waited has put the model in the engine.
            freed = await asyncio.wrap_future(self.engine.remove_model(model))
            if was_ready or freed:
                log.info("unloaded %s (%s); %s freed", model, reason, gib(freed))
                kind = self._unload_kind.pop(model, "unplaced")
                self._lifecycle.evictions[kind] = self._lifecycle.evictions.get(kind, 0) + 1
        finally:
            self._models.pop(model, None)
            self._unloading.pop(model, None)
            self._unload_kind.pop(model, None)
            self._reconcile_needed.set()  # it may have been placed here again meanwhile
            await self._advertise()

    async def _expire_idle(self) -> None:
        """Take idle models past their ``keep_alive`` off this worker's placements (pinned ones stay)."""
        now = time.time()
        pinned = pinned_models(self._pins.values(), self.worker_id)
        for model, slot in list(self._models.items()):
            keep = slot.spec.keep_alive_seconds
            idle = now - slot.last_used
            if (slot.state != m.MODEL_READY or keep < 0 or model in pinned or slot.in_flight or slot.queue_depth
                    or idle < keep):  # fmt: skip
                continue
            self._unload_kind[model] = "keep_alive"
            reason = f"idle on {self.worker_id} for {idle:.0f}s (keep_alive {keep:g}s)"
            try:
                await change_placement(self.bus, model, self._leave_above_minimum(slot.spec, reason), by=self.worker_id)
            except BrokerError as exc:
                log.warning("cannot take idle %s off this worker: %s", model, exc)

    def _leave_above_minimum(self, spec: ModelSpec, reason: str) -> Callable[[Placement | None], Placement | None]:
        """Leave a placement only while its other live workers keep ``min_replicas`` (checked at write time)."""
        me = self.worker_id
        live = {a.worker_id for a in self._fleet.values() if not a.draining}

        def change(current: Placement | None) -> Placement | None:
            if current is None or me not in current.workers:
                return None
            others = [w for w in current.workers if w != me and w in live]  # dead workers go too
            if len(others) < spec.min_replicas:
                return None  # the fleet keeps at least min_replicas of it
            return Placement(model=current.model, workers=others, reason=reason, failed=current.failed)

        return change

    async def _keep_min_replicas(self) -> None:
        """Place models with ``min_replicas`` or a pin before anyone asks.

        Every worker computes the same choice; the chosen one places itself (the
        compare-and-set keeps it to one). A pin to a worker places it there.
        """
        if self._draining:
            return
        live = {a.worker_id: a for a in self._fleet.values() if not a.draining}
        for spec in self.catalogue:
            pin = self._pins.get(spec.id)
            placement = self._placements.get(spec.id)
            serving = [w for w in (placement.workers if placement else []) if w in live]
            if self.worker_id in serving:
                continue
            if pin is not None and pin.worker == self.worker_id:
                if placement is None or self.worker_id not in placement.failed:
                    await self._place_here(spec.id, "pinned to this worker")
                continue
            wanted = max(spec.min_replicas, pin.replicas if pin is not None and not pin.worker else 0)
            if len(serving) >= wanted:
                continue
            recent = placement is not None and time.time() - placement.updated_at < RETRY_FAILED_S
            if recent and placement is not None and placement.error:
                continue  # nobody could load it a moment ago: no endless retries
            failed = set(placement.failed) if placement is not None and recent else set()
            others = [a for w, a in live.items() if w not in serving]
            choice = choose_worker(spec.id, others, self._pins.values(), exclude=failed,
                                   placements=self._placements.values())  # fmt: skip
            if isinstance(choice, Choice) and choice.worker == self.worker_id and not choice.evict:
                await self._place_here(spec.id, f"keeping {wanted} replica(s) ({choice.reason})")

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

    async def _pull_loop(self, slot: ModelSlot, pull: PullQueue) -> None:
        self._pulling += 1
        try:
            while not self._stopping.is_set() and not slot.leaving.is_set():
                free = self.free_slots
                if self._draining:
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
                    continue
                if free <= 0:
                    self._slot_freed.clear()
                    await self._slot_freed.wait()
                    continue
                # With several models, each pull takes a fair share of the free
                # slots so that an idle model's long poll cannot starve the others.
                share = -(-free // max(1, self._pulling))
                self._reserved += share
                try:
                    deliveries = await pull.fetch(share, timeout=FETCH_TIMEOUT_S)
                except BrokerError as exc:
                    log.warning("fetch for %s failed: %s", slot.spec.id, exc)
                    deliveries = []
                    await asyncio.sleep(0.5)
                finally:
                    self._reserved -= share
                    self._slot_freed.set()
                for delivery in deliveries:
                    await self._accept(slot, delivery)
        finally:
            self._pulling -= 1

    async def _accept(self, slot: ModelSlot, delivery: Delivery) -> None:
        try:
            request = codec.decode_request(delivery.data)
        except codec.DecodeError as exc:
            log.error("poison request on %s: %s", slot.spec.id, exc)
            await delivery.term()
            return
        if request.request_id in self._in_flight or request.request_id in self._cancelled:
            await delivery.ack()  # already running here, or its client has gone
            return
        if not request.reply_subject:
            log.error("request %s has no reply subject; dropped", request.request_id)
            await delivery.term()
            return
        self._in_flight[request.request_id] = InFlight(delivery=delivery, request=request, model=slot.spec.id)
        slot.in_flight += 1
        assert self._outbox is not None
        self.engine.submit(request, self._outbox.put)

    # -- chunks -----------------------------------------------------------------

    async def _publisher(self) -> None:
        assert self._outbox is not None
        while True:
            for chunk in await self._outbox.get_batch():
                await self._publish_safely(chunk)

    async def _drain_outbox(self) -> None:
        if self._outbox is not None:
            for chunk in self._outbox.take_all():
                await self._publish_safely(chunk)

    async def _publish_safely(self, chunk: Chunk) -> None:
        try:
            await self._publish(chunk)
        except Exception:
            # One bad request must not stop the chunks of all the others.
            log.exception("publishing a chunk of %s failed", chunk.request_id)
            await self._release(chunk.request_id, outcome="term")

    async def _publish(self, chunk: Chunk) -> None:
        flight = self._in_flight.get(chunk.request_id)
        if flight is None:
            return  # cancelled meanwhile
        try:
            await self.bus.publish(flight.request.reply_subject, codec.encode(chunk))
        except BrokerError as exc:
            log.warning("chunk for %s not published: %s", chunk.request_id, exc)
            if chunk.final:
                # The gateway never saw the end: give the request back rather than
                # let the client wait for its deadline.
                await self._release(chunk.request_id, outcome="nak")
            return
        if chunk.final:
            await self._release(chunk.request_id, outcome="ack")

    async def _release(self, request_id: str, *, outcome: str) -> None:
        """Forget a request and settle its message: ``ack``, ``nak`` or ``term``."""
        flight = self._in_flight.pop(request_id, None)
        if flight is None:
            return
        slot = self._models.get(flight.model)
        if slot is not None:
            slot.in_flight -= 1
            slot.last_used = time.time()
            self._advert_soon.set()  # placement decisions elsewhere go by how recently models were used
        if outcome == "ack":
            await flight.delivery.ack()
        elif outcome == "nak":
            await flight.delivery.nak(delay=1.0)
        else:
            await flight.delivery.term()
        self._slot_freed.set()

    def _on_cancel(self, _subject: str, payload: bytes) -> None:
        request_id = payload.decode("utf-8", "replace")
        self._remember_cancelled(request_id)
        if request_id in self._in_flight:
            self.engine.cancel(request_id)
            # The client is gone: the request is consumed, not redelivered.
            task = asyncio.get_running_loop().create_task(self._release(request_id, outcome="ack"))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _remember_cancelled(self, request_id: str) -> None:
        """Keep cancelled ids a while: the cancel may arrive before the request does."""
        now = time.monotonic()
        self._cancelled[request_id] = now
        if len(self._cancelled) > CANCELLED_MAX:
            cutoff = now - CANCELLED_KEEP_S
            self._cancelled = {rid: t for rid, t in self._cancelled.items() if t > cutoff}
            while len(self._cancelled) > CANCELLED_MAX:
                self._cancelled.pop(next(iter(self._cancelled)))

    async def _wait_in_flight(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self._in_flight and time.monotonic() < deadline:
            self._slot_freed.clear()
            try:
                await asyncio.wait_for(self._slot_freed.wait(), timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                break

    async def _progress_loop(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            for flight in list(self._in_flight.values()):
                await flight.delivery.in_progress()

    # -- adverts ----------------------------------------------------------------

    def advert(self) -> WorkerAdvert:
        total, free = self.device.memory()
        slots = list(self._models.values())
        used = sum(s.memory for s in slots if s.state in (m.MODEL_READY, m.MODEL_UNLOADING))
        reserved = sum(s.memory for s in slots if s.state == m.MODEL_LOADING)
        return WorkerAdvert(
            worker_id=self.worker_id,
            host=socket.gethostname(),
            device=self.device.label,
            device_name=self.device.name,
            memory_total=total,
            memory_free=free,
            models=[
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
                for s in slots
            ],
            catalogue=self._cards,
            memory_budget=self.memory_budget or total,
            memory_used=used,
            memory_reserved=reserved,
            draining=self._draining,
            devices=len(self.device.devices) or 1,
            eviction=self.eviction,
            lifecycle=self._lifecycle,
            slots_total=self.slots,
            slots_free=max(0, self.slots - len(self._in_flight)),
            version=VERSION,
            started_at=self._started_at,
            updated_at=time.time(),
            pid=os.getpid(),
        )

    async def _advertise(self) -> None:
        try:
            await self.bus.put_advert(names.worker_key(self.worker_id), codec.encode(self.advert()))
        except BrokerError as exc:
            log.warning("advert not written: %s", exc)

    async def _advert_loop(self) -> None:
        upkept = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._advert_soon.wait(), timeout=names.ADVERT_INTERVAL_S)
            self._advert_soon.clear()
            # The upkeep (NATS queue reads, placement checks) runs every interval; a finished
            # request, up to four wake-ups a second, only needs its new counts advertised.
            if time.monotonic() - upkept >= names.ADVERT_INTERVAL_S:
                upkept = time.monotonic()
                self._reconcile_needed.set()  # cheap when nothing changed; heals a missed notification
                await self._measure_queues()
                await self._expire_idle()
                await self._keep_min_replicas()
            await self._advertise()
            await asyncio.sleep(ADVERT_MIN_GAP_S)


def _progress(slot: ModelSlot) -> float:
    """How far a load has got, judged by the time the last load of the model took (transformers reports none)."""
    if slot.state == m.MODEL_READY:
        return 1.0
    if slot.state != m.MODEL_LOADING or not slot.expected_load_s:
        return 0.0
    return min(0.99, (time.monotonic() - slot.loading_since) / slot.expected_load_s)
