"""Where a worker's models come from and where they go: the loader threads and the host tier.

Loads run on `LOAD_THREADS` loader threads of their own, never on the engine
thread, so the models already loaded keep decoding while another loads, and
two loads can run side by side. They are daemon threads: a load cannot be
stopped mid-phase, and the worker's exit must not wait for one (a
`ThreadPoolExecutor`'s threads are joined when the interpreter exits). A model parked in the host tier comes back
from there (a copy to the device) instead of through the loader. Going away,
a model is freed, or parked (`cortex.worker.host_tier`) when there is a tier.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from cortex.protocol.choice import gib
from cortex.worker.catalogue import ModelSpec
from cortex.worker.device import memory_in_use, release_memory
from cortex.worker.engine import Engine
from cortex.worker.host_tier import HostTier, restore
from cortex.worker.loader import LoadedModel
from cortex.worker.synthetic import SyntheticEngine
from cortex.worker.tasks import looked_at

log = logging.getLogger("cortex.worker")

LOAD_THREADS = 2
"""Loads that run at once (memory allowing)."""

Loader = Callable[[ModelSpec, threading.Event], Any]
"""Loads a catalogue entry on a loader thread; setting the event calls it off (it raises `LoadAborted`)."""


@dataclass
class Loads:
    loader: Loader
    """The transformers loader, or the synthetic one."""
    engine: Engine | SyntheticEngine
    host_tier: HostTier | None = None
    """Where models leaving the device are parked (``--host-cache``); None: they are freed."""
    _pool: LoaderThreads = field(default_factory=lambda: LoaderThreads(LOAD_THREADS))
    _parkable: dict[str, bool] = field(default_factory=dict)
    """Whether the host tier can take each model loaded here, judged as it loaded (a model spread over several
    GPUs, or larger than the tier, is freed where it is: taking it out of the engine first would only delay that)."""

    def parked(self, model: str) -> bool:
        return self.host_tier is not None and model in self.host_tier

    def start(self, spec: ModelSpec, abort: threading.Event) -> asyncio.Future[Any]:
        """The model, loaded on a loader thread (from the host tier if it is parked there); raises what the
        loader raises, `LoadAborted` once `abort` is set and the load reaches its next phase.

        Await it shielded (`asyncio.shield`), never cancel it: a loader thread
        cannot be stopped mid-phase, and until it ends, the memory it fills is in use.
        """
        load = asyncio.wrap_future(self._pool.submit(self._load, spec, abort))
        load.add_done_callback(looked_at)  # one called off (an unload, a stop) is nobody's to report
        return load

    def _load(self, spec: ModelSpec, abort: threading.Event) -> Any:
        parked = self.host_tier.take(spec.id) if self.host_tier is not None else None
        loaded = restore(parked) if parked is not None else self.loader(spec, abort)
        if self.host_tier is not None and isinstance(loaded, LoadedModel):
            self._parkable[spec.id] = self.host_tier.size_if_parked(loaded) is not None
        return loaded

    async def put_away(self, model: str, *, park: bool) -> tuple[int, str]:
        """Take the model out of the engine: parked in the host tier when `park` and the tier can take it, else
        freed. The device bytes this freed (measured), and what became of it, in words."""
        if park and self.host_tier is not None and self._parkable.get(model) and isinstance(self.engine, Engine):
            taken = await asyncio.wrap_future(self.engine.take_model(model))
            if taken is not None:
                held = [taken]
                del taken  # `_park` holds the only reference: if the model is freed after all, it is freed there
                return await asyncio.to_thread(_park, self.host_tier, held)
        freed = await asyncio.wrap_future(self.engine.remove_model(model))
        if park and self.host_tier is not None and isinstance(self.engine, Engine):
            return freed, f"{gib(freed)} freed (the host tier cannot take it)"
        return freed, f"{gib(freed)} freed"

    async def discard(self, built: list[Any], *, park: bool) -> tuple[int, str]:
        """Put away a model that was loaded but never reached the engine (its slot left while it loaded): parked in
        the host tier when `park` and the tier can take it, else freed. `built` holds the only reference to it and
        is emptied here, so that freeing it frees its memory. As `put_away` returns."""
        tier = self.host_tier if park else None
        if tier is not None and isinstance(built[0], LoadedModel) and tier.size_if_parked(built[0]) is not None:
            return await asyncio.to_thread(_park, tier, built)
        return await asyncio.to_thread(_free, built)

    def shutdown(self) -> None:
        """No new loads; a load under way stops at its next phase once its abort event is set."""
        self._pool.shutdown()
        if self.host_tier is not None:
            self.host_tier.clear()


class LoaderThreads:
    """At most `size` loads at once, each on a daemon thread of its own (`ThreadPoolExecutor`'s verbs that `Loads`
    uses): nothing waits for a load under way when the process exits."""

    def __init__(self, size: int) -> None:
        self._slots = threading.BoundedSemaphore(size)
        self._waiting: set[Future[Any]] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._count = 0

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the loader threads are shut down")
            self._waiting.add(future)
            self._count += 1
            name = f"cortex-loader-{self._count}"
        threading.Thread(target=self._run, args=(future, fn, args), name=name, daemon=True).start()
        return future

    def _run(self, future: Future[Any], fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        with self._slots:
            with self._lock:
                self._waiting.discard(future)
            if not future.set_running_or_notify_cancel():
                return  # cancelled while it waited for a slot (a shutdown)
            try:
                result = fn(*args)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self) -> None:
        """No new loads; those still waiting for a slot are cancelled (one under way runs on)."""
        with self._lock:
            self._closed = True
            waiting, self._waiting = self._waiting, set()
        for future in waiting:
            future.cancel()


def _park(tier: HostTier, held: list[LoadedModel]) -> tuple[int, str]:
    """On a worker thread: the model `held` holds (its only reference) into `tier`, or freed if that fails; the
    device bytes this freed, and what became of it."""
    loaded = held.pop()
    device = loaded.device
    before = memory_in_use(device)
    try:
        dropped = tier.park(loaded)
    except Exception as exc:  # pinned memory refused, say: the model is freed instead
        log.warning("could not park %s in the host tier (%s): freeing it", loaded.spec.id, exc)
        del loaded
        freed = max(0, before - release_memory(device))
        return freed, f"{gib(freed)} freed (parking it failed)"
    model = loaded.spec.id
    del loaded  # the tier's reference is the one left
    if dropped:
        log.info("host tier: dropped %s (%s of %s in use)", ", ".join(dropped), gib(tier.used()), gib(tier.capacity))
    # A CPU worker's weights stay where they were: nothing freed, and no garbage collection to pay for.
    freed = 0 if device.type == "cpu" else max(0, before - release_memory(device))
    if model in dropped:
        return freed, f"{gib(freed)} freed (the host tier cannot take it)"
    return freed, f"{gib(freed)} freed, parked in the host tier"


def _free(held: list[Any]) -> tuple[int, str]:
    """On a worker thread: free the model `held` holds (its only reference); the device bytes this freed."""
    loaded = held.pop()
    device = getattr(loaded, "device", None)
    if device is None:  # the synthetic engine's model holds no weights
        return 0, "nothing to free"
    before = memory_in_use(device)
    del loaded
    freed = max(0, before - release_memory(device))
    return freed, f"{gib(freed)} freed"
