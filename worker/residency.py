"""Which models this worker holds, and why: placements in, loads and unloads out.

Which models are loaded follows the placement bucket: a worker loads the models
whose placement names it and unloads the others (evicted, idle past their
``keep_alive``, or drained). Room for a new model is made by evicting, under the
worker's strategy, models that are neither pinned nor busy. What the placements
say, and every change this worker makes to them, goes through
`cortex.worker.placements`.

Loads run on the residency's loader threads (never the engine thread, which
keeps decoding the other models meanwhile), several at once where memory
allows: each reserves its memory estimate as it starts, and a load that needs
room waits for its evictions first. A cold load whose waiting requests were all
cancelled or timed out is called off (`cortex.worker.load_watch`) unless the
model is pinned, kept at ``min_replicas`` or was loaded at start. With a host
tier (``--host-cache``), a model leaving the device for any reason but a drain
or a stop is parked in host memory (`cortex.worker.host_tier`), and loading it
again is a copy back. Unloads, from the moment one is decided until the
memory is free, are `cortex.worker.unloading`'s.

The queues of the models served here are read on each upkeep tick, and every
`SCALE_POLL_S` for those with requests running that could have another
replica: each reading goes to `Placements.consider_scaling` (queue-driven
scale-out, `cortex.worker.scaling`).

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
from functools import partial
from typing import Any

from cortex.broker.bus import Bus
from cortex.broker.errors import BrokerError
from cortex.broker.pull import PullQueue
from cortex.protocol import ModelState, WorkerAdvert
from cortex.protocol import messages as m
from cortex.protocol.choice import gib, plan_evictions
from cortex.worker.advert import Advertiser, WorkerMetrics
from cortex.worker.catalogue import ModelSpec
from cortex.worker.engine import Engine
from cortex.worker.inflight import FETCH_TIMEOUT_S, Settled
from cortex.worker.load_watch import abandoned
from cortex.worker.loader import LoadAborted
from cortex.worker.loading import Loads
from cortex.worker.placements import Placements
from cortex.worker.pull_guard import LeavingPull
from cortex.worker.scaling import consider_scaling, watch_queues
from cortex.worker.slot import ModelSlot
from cortex.worker.slot import progress as _progress
from cortex.worker.synthetic import SyntheticEngine
from cortex.worker.unloading import Unloads

log = logging.getLogger("cortex.worker")

LOAD_BYTES_PER_S = 50 * 2**20
"""For load progress before a model has loaded here once: a guess of how fast weights load."""
SWAP_WAIT_CAP_S = 30.0
"""A model waiting for room on this worker waits at most this long for busy models to drain."""
SWAP_POLL_S = 0.25
HOST_TIER_LOAD_S = 0.5
"""For load progress: what a copy back from the host tier is expected to take."""


ServeRequests = Callable[[ModelSlot, Any, Settled], Awaitable[None]]
"""Runs a ready model's pull loop until its slot is ``leaving`` (`cortex.worker.inflight.Requests.pull_loop`),
on its `PullQueue` wrapped in a `LeavingPull` (which fetches like one)."""


@dataclass
class Residency:
    bus: Bus
    engine: Engine | SyntheticEngine
    catalogue: list[ModelSpec]
    worker_id: str
    loads: Loads
    """The loader threads and the host tier."""
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
    was_cancelled: Callable[[str], bool] = lambda _request_id: False
    """Whether this worker has heard a request cancelled (`cortex.worker.inflight.Requests.was_cancelled`)."""
    started_with: frozenset[str] = frozenset()
    """The models loaded at start (``--model``): their loads are never called off."""
    _models: dict[str, ModelSlot] = field(default_factory=dict)
    _starting: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    """Models whose load is being started (waiting for room), so a reconcile starts each once."""
    _background: set[asyncio.Task[None]] = field(default_factory=set)
    _load_times: dict[str, float] = field(default_factory=dict)
    """How long each model took to load here last time: the yardstick of load progress."""
    unloads: Unloads = field(init=False)
    """The unloads under way (`cortex.worker.unloading`)."""

    def __post_init__(self) -> None:
        self.unloads = Unloads(models=self._models, loads=self.loads, placements=self.placements,
                               metrics=self.metrics, advertise=self.advertise, stopping=self.stopping,
                               slot_freed=self.slot_freed)  # fmt: skip

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
        await consider_scaling(list(self._models.values()), self.placements)
        await self._expire_idle()
        await self.placements.keep_placed()

    async def watch_queues(self) -> None:
        """Between upkeep ticks, the queues of busy models that could have another replica (`scaling`)."""
        await watch_queues(lambda: list(self._models.values()), self.placements)

    async def stop_serving(self) -> None:
        """On shutdown: every pull loop stops within one fetch; a model still loading is abandoned.

        Placements stay as they are: a restarted worker loads its models again.
        """
        for start in self._starting.values():
            start.cancel()
        for slot in self._models.values():  # their state stays as it is: the advert is withdrawn soon
            slot.leaving.set()
            slot.abort.set()
            slot.load_over.set()
        serving = [slot.task for slot in self._models.values() if slot.task is not None]
        if serving:
            _, loading = await asyncio.wait(serving, timeout=FETCH_TIMEOUT_S + 5.0)
            for task in loading:  # a load's thread goes on (it stops at its next phase); its task need not
                task.cancel()
            await asyncio.gather(*loading, return_exceptions=True)
        # Fetches cut short end within their timeout, then their queues close: all before the bus does. What is
        # left then is cancelled and waited for, so nothing ends with an error after the event loop is gone.
        deadline = asyncio.get_running_loop().time() + FETCH_TIMEOUT_S + 2.0
        while self._background and (left := deadline - asyncio.get_running_loop().time()) > 0:
            await asyncio.wait(list(self._background), timeout=left)
        late = [*self._background, *self.unloads.pending.values()]  # an unload may wait for a load's thread
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        self.loads.shutdown()

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

    async def _reconcile(self) -> None:
        """Load what the placements name this worker for; unload the rest. Loads start side by side."""
        wanted = self.placements.wanted()
        for model, slot in list(self._models.items()):
            if model not in wanted:
                why = "drained" if self.placements.draining.is_set() else "no longer placed here"
                self.unloads.begin(slot, why, "drain" if self.placements.draining.is_set() else "unplaced")
        for model in sorted(wanted):
            if model in self._starting or model in self.unloads.pending or self.stopping.is_set():
                continue
            held = self._models.get(model)
            placement = self.placements.placement(model)
            if held is not None and not (held.state == m.MODEL_FAILED and placement.updated_at > held.failed_at):
                continue
            spec = next((s for s in self.catalogue if s.id == model), None)
            if spec is None:
                if self.worker_id not in placement.failed:
                    await self.placements.load_failed(model, f"{self.worker_id} has no {model} in its catalogue")
                continue
            start = asyncio.create_task(self._start_loading(spec), name=f"start-{model}")
            self._starting[model] = start
            start.add_done_callback(partial(self._started, model))

    def _started(self, model: str, task: asyncio.Task[None]) -> None:
        if self._starting.get(model) is task:
            del self._starting[model]
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("starting the load of %s failed", model, exc_info=exc)  # tried again on the next change

    async def _start_loading(self, spec: ModelSpec) -> None:
        """Reserve the model's memory (evicting what must go), then load it on a loader thread and serve it."""
        model = spec.id
        if (failed := self._models.get(model)) is not None and failed.state == m.MODEL_FAILED:
            del self._models[model]  # a failed earlier attempt
        need = self.estimates.get(model, 0)
        room = await self._make_room_for(model, need)
        if room is None:
            return
        slot, victims = room
        # The memory is counted free only once the victims are gone (a load never overlaps its evictions).
        unloads = [self.unloads.pending[v] for v in victims if v in self.unloads.pending]
        if unloads:
            await asyncio.gather(*unloads, return_exceptions=True)
        if slot.leaving.is_set() or model not in self.placements.wanted() or self.stopping.is_set():
            if self._models.get(model) is slot and model not in self.unloads.pending:
                del self._models[model]  # given up before it began: nothing to unload
                await self.advertise()
            return
        slot.loading_since = time.monotonic()
        slot.task = asyncio.create_task(self._serve_model(slot), name=f"serve-{model}")
        watch = asyncio.create_task(self._watch_load(slot), name=f"watch-load-{model}")
        self._background.add(watch)
        watch.add_done_callback(self._background.discard)
        await self.advertise()

    async def _make_room_for(self, model: str, need: int) -> tuple[ModelSlot, list[str]] | None:
        """Reserve `need` bytes for `model`: its slot, loading, and the models to evict for it, once they are idle
        (swap-aware queueing); None (having said why where it must) when it is not to be loaded after all.

        Models with requests running or queued are served first; after
        `SWAP_WAIT_CAP_S` they stop taking requests (theirs wait in the queue)
        so the model that has waited gets its turn. The plan and the reservation
        happen with no await between them, so loads starting side by side never
        count the same free memory twice.
        """
        deadline = time.monotonic() + SWAP_WAIT_CAP_S
        await self._measure_queues()  # queued requests spare a model: look at the queues as they are now
        while True:
            if self.stopping.is_set() or model not in self.placements.wanted():
                return None
            advert = self.advert()
            placed = self.placements.placements()
            victims = plan_evictions(advert, need, self.placements.pins(), placements=placed)
            if victims is not None and (not victims or not self.unloads.pending):
                return self._reserve(model, need, victims), victims
            if self.unloads.pending:  # what they free is counted once it is free, which may spare an eviction
                await asyncio.gather(*self.unloads.pending.values(), return_exceptions=True)
                continue
            blocked = plan_evictions(advert, need, self.placements.pins(), busy_too=True, placements=placed)
            if blocked is None:
                why = f"{self.worker_id} cannot make room: it needs {gib(need)} and its other models are pinned"
                await self.placements.load_failed(model, why)
                return None
            if any((v := self._models.get(b)) is not None and v.state != m.MODEL_READY for b in blocked):
                # A model still loading gets its full turn once ready: swapping it out unserved would livelock.
                deadline = time.monotonic() + SWAP_WAIT_CAP_S
            elif time.monotonic() >= deadline:
                for victim in blocked:  # their queues wait; the unload lets running requests finish
                    if (slot := self._models.get(victim)) is not None:
                        slot.leaving.set()
                        slot.queue_depth = 0
                log.info("swapping %s out for %s after waiting %.0fs", ", ".join(blocked), model, SWAP_WAIT_CAP_S)
                return self._reserve(model, need, blocked), blocked
            await asyncio.sleep(SWAP_POLL_S)
            await self._measure_queues()

    def _reserve(self, model: str, need: int, victims: list[str]) -> ModelSlot:
        """The model's slot, loading (from now on its memory counts as reserved in the advert), and its victims'
        evictions begun."""
        guess = self._load_times.get(model, max(1.0, need / LOAD_BYTES_PER_S))
        expected = HOST_TIER_LOAD_S if self.loads.parked(model) else guess
        slot = ModelSlot(spec=self._spec(model), memory=need, loading_since=time.monotonic(), expected_load_s=expected)
        self._models[model] = slot
        for victim in victims:
            reason = f"evicted from {self.worker_id} to make room for {model} ({self.eviction})"
            log.info("%s", reason)
            self.unloads.kinds[victim] = self.eviction
            if (held := self._models.get(victim)) is not None:
                self.unloads.begin(held, reason, self.eviction, unplace=True)
        return slot

    def _spec(self, model: str) -> ModelSpec:
        return next(s for s in self.catalogue if s.id == model)

    async def _serve_model(self, slot: ModelSlot) -> None:
        started = time.monotonic()
        slot.load = self.loads.start(slot.spec, slot.abort)
        try:
            loaded = await asyncio.shield(slot.load)  # cancelling this task leaves the thread's load to the unload
        except LoadAborted as exc:
            log.info("%s", exc)
            return
        except Exception as exc:
            if slot.abort.is_set():
                return  # called off: whatever it raised on the way out is no failure of the model
            log.exception("loading %s failed", slot.spec.id)
            self.metrics.load_failed(slot.spec.id)
            slot.state, slot.error, slot.failed_at = m.MODEL_FAILED, f"{type(exc).__name__}: {exc}", time.time()
            await self.advertise()
            await self.placements.load_failed(slot.spec.id, f"{self.worker_id}: {slot.error}")
            return
        finally:
            slot.load_over.set()
        if slot.leaving.is_set():
            return  # unloaded while it loaded: the unload puts away what the load built
        self.engine.add_model(loaded)
        slot.in_engine, slot.load = True, None  # the engine holds the model now, and nothing else here may
        seconds = time.monotonic() - started
        from_host = bool(getattr(loaded, "from_host", False))
        if not from_host:  # the yardstick of load progress is a load from disk
            self._load_times[slot.spec.id] = seconds
        self.metrics.loaded(slot.spec.id, seconds, from_host=from_host)
        slot.pull = await self._open_pull_queue(slot)
        if slot.leaving.is_set():
            await slot.pull.close()
            return
        slot.state, slot.context_length, slot.served = m.MODEL_READY, loaded.context_length, True
        slot.reasoning = getattr(loaded, "reasoning", None) is not None  # the synthetic model has no tags
        slot.last_used = time.time()
        await self.advertise()
        await self.placements.loaded(slot.spec.id)  # a round of failed loads that ends here ends the count
        pull = LeavingPull(slot.pull, slot.leaving, self._background)
        try:
            await self.serve_requests(slot, pull, self._request_settled)
        finally:
            await pull.close()

    async def _watch_load(self, slot: ModelSlot) -> None:
        """Call the load off once nobody waits for it (`cortex.worker.load_watch`), unless the model is kept."""
        model = slot.spec.id
        if model in self.started_with or slot.spec.min_replicas > 0:
            return  # never called off, whoever waits (a pin, which comes and goes, is judged at the end)
        dead = await abandoned(self.bus, model, was_cancelled=self.was_cancelled, ended=slot.load_over)
        if dead is None:
            return
        if kept := self._kept(slot.spec):
            log.info("nobody waits for %s any more, but it is %s: its load goes on", model, kept)
            return
        reason = (f"{self.worker_id} called off the load of {model}: the {len(dead)} request(s) waiting for it "
                  "were cancelled or timed out")  # fmt: skip
        log.info("%s", reason)
        self.metrics.load_called_off(model)
        self.unloads.begin(slot, reason, "called_off", unplace=True)  # the dead requests stay queued (load_watch)

    def _kept(self, spec: ModelSpec) -> str:
        """Why the load of `spec` must go on whoever waits for it ("" if nothing keeps it)."""
        if spec.id in self.started_with:
            return "loaded at start (--model)"
        if spec.id in self.placements.pinned_here():
            return "pinned"
        if spec.min_replicas > 0:
            return f"kept at min_replicas {spec.min_replicas}"
        return ""

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
            self.unloads.kinds[model] = "keep_alive"
            reason = f"idle on {self.worker_id} for {idle:.0f}s (keep_alive {keep:g}s)"
            # Only while the placement's other live workers keep min_replicas, or a pin's count (checked at write time).
            await self.placements.leave_idle(model, reason, self.placements.kept_copies(model, slot.spec.min_replicas))

    async def _measure_queues(self) -> None:
        for slot in list(self._models.values()):
            if slot.pull is not None and slot.state == m.MODEL_READY:
                with contextlib.suppress(BrokerError):  # shown as it was until the broker answers
                    slot.queue_depth = await slot.pull.pending()

    async def _open_pull_queue(self, slot: ModelSlot) -> PullQueue:
        """The model's consumer; retried while the broker is away (the worker is useless without it)."""
        while True:
            try:
                return await self.bus.pull_queue(slot.spec.id, self.worker_id)  # its affine queue too
            except BrokerError as exc:
                log.warning("cannot bind the consumer of %s yet: %s", slot.spec.id, exc)
                await asyncio.sleep(1.0)
