"""What a worker tells the fleet about itself: its advert with the lifecycle counters inside it, and its heartbeat.

The advert is the worker's only metrics channel: gateways export the counters
in `WorkerMetrics` from the adverts they watch, so a worker keeps one such
object and nothing else. The models it holds come from the caller at each
write (`cortex.worker.residency` knows them); this module knows the device,
the slots, the catalogue and the counters.

The heartbeat (`Advertiser.beat`) is what says the worker is alive: a small
key rewritten every `names.HEARTBEAT_INTERVAL_S` on a fixed schedule from the
asyncio loop, which never runs torch, so a long prefill or a model load on the
engine thread does not delay it; it expires 2 s after the worker dies.
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

import msgspec

from cortex.broker.bus import Bus
from cortex.broker.errors import BrokerError
from cortex.protocol import ModelState, WorkerAdvert, catalogues, codec, names
from cortex.protocol import messages as m
from cortex.protocol.heartbeat import Heartbeat
from cortex.worker.device import DeviceInfo
from cortex.worker.host_tier import HostTier

log = logging.getLogger("cortex.worker")

VERSION = "0.1.0"

CATALOGUE_DIGEST = "digest"
"""``--advert-catalogue digest``: the catalogue is written once under its digest, the advert names it (default)."""
CATALOGUE_INLINE = "inline"
"""``--advert-catalogue inline``: every advert carries the whole catalogue, as before (readers older than digests)."""
CATALOGUE_RETRY_S = 30.0
"""After a failed catalogue write, how long adverts carry the catalogue inline before the write is tried again
(in the background: no advert waits for it)."""


@dataclass
class WorkerMetrics:
    """The worker's one metrics object: model loads and unloads since it started, as the advert carries them."""

    lifecycle: m.Lifecycle = field(default_factory=m.Lifecycle)

    def loaded(self, model: str, seconds: float, *, from_host: bool = False) -> None:
        """A cold start of `model` that took `seconds` (`from_host`: a copy back from the host tier)."""
        life = self.lifecycle
        life.cold_starts[model] = life.cold_starts.get(model, 0) + 1
        if from_host:
            life.host_tier_loads[model] = life.host_tier_loads.get(model, 0) + 1
        if not life.load_seconds_buckets:
            life.load_seconds_buckets = [0] * len(m.LOAD_SECONDS_BUCKETS)
        for i, bound in enumerate(m.LOAD_SECONDS_BUCKETS):
            life.load_seconds_buckets[i] += seconds <= bound
        life.load_seconds_sum += seconds
        life.loads += 1

    def load_failed(self, model: str) -> None:
        life = self.lifecycle
        life.load_failures[model] = life.load_failures.get(model, 0) + 1

    def load_called_off(self, model: str) -> None:
        """A cold load of `model` called off: nobody waited for it any more."""
        life = self.lifecycle
        life.loads_called_off[model] = life.loads_called_off.get(model, 0) + 1

    def evicted(self, kind: str) -> None:
        """An unload, labelled by why (``lru``, ``priority``, ``keep_alive``, ``unplaced``, ``drain``)."""
        life = self.lifecycle
        life.evictions[kind] = life.evictions.get(kind, 0) + 1


@dataclass
class Advertiser:
    """Builds and writes the worker's advert under its key in the fleet bucket."""

    bus: Bus
    worker_id: str
    device: DeviceInfo
    slots: int
    memory_budget: int
    """Bytes models may take (0: the device's memory)."""
    eviction: str
    cards: list[m.ModelCard]
    """The catalogue as adverts show it, built once."""
    metrics: WorkerMetrics
    draining: asyncio.Event
    """Set while the worker drains (its owner, the residency side, sets and clears it)."""
    busy: Callable[[], int]
    """How many requests the worker is running now."""
    started_at: float
    instance: str = ""
    """This start of the worker process (`Heartbeat.instance`)."""
    host_tier: HostTier | None = None
    """The models kept in host memory (``--host-cache``), shown in the advert."""
    prefix_keys: Callable[[str], list[str] | None] | None = None
    """The prefix keys of the requests answered here last, per model; None for a model whose affine subject this
    worker does not pull from (`cortex.worker.conversations`)."""
    catalogue_mode: str = CATALOGUE_DIGEST
    """`CATALOGUE_DIGEST` or `CATALOGUE_INLINE` (``--advert-catalogue``)."""
    older_readers: Callable[[], bool] = lambda: False
    """Whether another live worker's advert comes from a release before catalogues by digest (it would take a digest
    advert for a worker with no models): while one does, the catalogue goes inline too (`catalogues.reads_digests`)."""
    keeper: Callable[[], bool] = lambda: False
    """Whether this worker holds the keeper's lease (said in the advert)."""
    _soon: asyncio.Event = field(default_factory=asyncio.Event)
    _digested: tuple[list[m.ModelCard], bytes, str] | None = None
    """The cards last digested, encoded, and their digest (`cards` is replaced, never changed in place)."""
    _stored: tuple[str, float, int] = ("", 0.0, -1)
    """The digest whose catalogue this worker last wrote, when (monotonic), and the bus's reconnect count then."""
    _failed_at: float | None = None
    """When the last catalogue write failed (monotonic); None once one succeeds."""
    _retry: asyncio.Task[None] | None = None
    """The catalogue write tried again in the background after a failure."""

    def _catalogue(self) -> tuple[bytes, str]:
        """The catalogue encoded, and its digest (in this process's cache from now on: its own readers need it)."""
        if self._digested is None or self._digested[0] is not self.cards:
            encoded = catalogues.encode_catalogue(self.cards)
            self._digested = (self.cards, encoded, catalogues.digest(encoded))
            catalogues.CACHE.put(self._digested[2], self.cards)
        return self._digested[1], self._digested[2]

    def advert(self, models: list[ModelState]) -> WorkerAdvert:
        if self.prefix_keys is not None:  # conversation affinity: what gateways match a prompt's prefixes against
            models = [msgspec.structs.replace(s, prefix_keys=keys, affine=True)
                      if (keys := self.prefix_keys(s.id)) is not None else s for s in models]  # fmt: skip
        total, free = self.device.memory()
        used = sum(s.memory for s in models if s.state in (m.MODEL_READY, m.MODEL_UNLOADING))
        reserved = sum(s.memory for s in models if s.state == m.MODEL_LOADING)
        return WorkerAdvert(
            worker_id=self.worker_id,
            host=socket.gethostname(),
            device=self.device.label,
            device_name=self.device.name,
            memory_total=total,
            memory_free=free,
            models=models,
            catalogue=self.cards,
            memory_budget=self.memory_budget or total,
            memory_used=used,
            memory_reserved=reserved,
            draining=self.draining.is_set(),
            devices=len(self.device.devices) or 1,
            eviction=self.eviction,
            lifecycle=self.metrics.lifecycle,
            slots_total=self.slots,
            slots_free=max(0, self.slots - self.busy()),
            version=VERSION,
            started_at=self.started_at,
            updated_at=time.time(),
            pid=os.getpid(),
            host_cached=self.host_tier.models() if self.host_tier is not None else [],
            host_cache_bytes=self.host_tier.capacity if self.host_tier is not None else 0,
            host_cache_used=self.host_tier.used() if self.host_tier is not None else 0,
            catalogue_digest=self._catalogue()[1] if self.catalogue_mode == CATALOGUE_DIGEST else "",
            advert_format=catalogues.ADVERT_FORMAT,
            keeper=self.keeper(),
        )

    async def publish(self, models: list[ModelState]) -> None:
        """Write the advert; by digest, its catalogue first when it is new or due again (`names.CATALOGUE_REFRESH_S`),
        and the advert with the catalogue inline while that write fails or an older worker reads adverts."""
        advert = self.advert(models)
        if advert.catalogue_digest and (not await self._store_catalogue() or self.older_readers()):
            advert = msgspec.structs.replace(advert, catalogue_digest="")
        try:
            await self.bus.put_advert(names.worker_key(self.worker_id), codec.encode(catalogues.on_the_wire(advert)))
        except BrokerError as exc:
            log.warning("advert not written: %s", exc)

    async def _store_catalogue(self) -> bool:
        """Whether the catalogue is stored under its digest (written now if it is new or due again).

        Due again every `names.CATALOGUE_REFRESH_S`, and after the connection
        came back (`Bus.reconnects`): a broker restarted without its buckets
        lost it. After a failed write, adverts go inline at once and the write
        is tried again every `CATALOGUE_RETRY_S` in the background.
        """
        encoded, digest = self._catalogue()
        stored, at, reconnects = self._stored
        now = time.monotonic()
        if stored == digest and now - at < names.CATALOGUE_REFRESH_S and reconnects == self.bus.reconnects:
            return True
        if self._failed_at is None:
            return await self._write_catalogue(digest, encoded)
        if now - self._failed_at >= CATALOGUE_RETRY_S and (self._retry is None or self._retry.done()):
            self._retry = asyncio.create_task(self._retry_catalogue(digest, encoded))
        return False

    async def _retry_catalogue(self, digest: str, encoded: bytes) -> None:
        if await self._write_catalogue(digest, encoded):
            self.soon()  # the next advert names it again

    async def _write_catalogue(self, digest: str, encoded: bytes) -> bool:
        reconnects = self.bus.reconnects  # before the write: a reconnect during it writes again
        try:
            await self.bus.put_catalogue(names.catalogue_key(digest), encoded)
        except BrokerError as exc:
            if self._failed_at is None:
                log.warning("catalogue %s not written (adverts carry it inline meanwhile): %s", digest, exc)
            self._failed_at = time.monotonic()
            return False
        if self._stored[0] != digest or self._failed_at is not None:
            log.info("catalogue %s written (%d models, %d bytes)", digest, len(self.cards), len(encoded))
        self._stored, self._failed_at = (digest, time.monotonic(), reconnects), None
        return True

    async def withdraw(self) -> None:
        """Delete the advert and the heartbeat, so the fleet stops counting on this worker at once."""
        if self._retry is not None:
            self._retry.cancel()
        try:
            await self.bus.withdraw_heartbeat(names.alive_key(self.worker_id))
            await self.bus.delete_advert(names.worker_key(self.worker_id))
        except BrokerError as exc:
            log.warning("could not withdraw advert: %s", exc)

    async def beat(self) -> None:
        """Rewrite the heartbeat every `names.HEARTBEAT_INTERVAL_S` until cancelled.

        On a fixed schedule (a slow write does not push the next one back; beats
        missed while the broker was away are not made up); a broker that does
        not answer is logged once, and once again when it does.
        """
        key, seq, failing = names.alive_key(self.worker_id), 0, False
        due = time.monotonic()
        while True:
            beat = Heartbeat(worker_id=self.worker_id, seq=seq, sent_at=time.time(), instance=self.instance)
            value = codec.encode(beat)
            try:
                await self.bus.put_heartbeat(key, value)
            except BrokerError as exc:
                if not failing:
                    log.warning("heartbeat not written (the fleet will count this worker gone): %s", exc)
                failing = True
            else:
                if failing:
                    log.info("heartbeat written again")
                failing = False
            seq += 1
            due += names.HEARTBEAT_INTERVAL_S
            if (late := time.monotonic() - due) > names.HEARTBEAT_INTERVAL_S:  # at HEARTBEAT_TTL_S the fleet drops us
                log.warning("heartbeat %.1fs late (a slow broker, or something held up the event loop)", late)
            due = max(due, time.monotonic())
            await asyncio.sleep(due - time.monotonic())

    def soon(self) -> None:
        """Ask for an advert before the next interval (placement decisions elsewhere go by fresh counts)."""
        self._soon.set()

    async def wait_due(self, interval: float) -> None:
        """Return when `soon` was called, or after `interval` seconds, whichever comes first."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._soon.wait(), timeout=interval)
        self._soon.clear()
