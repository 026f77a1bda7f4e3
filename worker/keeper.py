"""Which worker keeps watch over the whole fleet for the others: a lease in the placement bucket.

Watching every advert and heartbeat costs a reader in proportion to the fleet's
size; were every worker to do it, the broker would send each write to every
worker, N² messages in all (about 2 GB/s at 2,000 workers, `docs/scale.md`).
So one worker does it for all: the **keeper**, the worker whose `Keeper` record
stands under `names.KEEPER_KEY`. It watches the fleet, keeps pins and
``min_replicas`` placed, retries failed loads (`Placements.keep_placed`), and
says in its record whether some live worker is too old to read catalogues by
digest. The others read the fleet only for their own rare decisions.

The lease: the keeper rewrites its record every `names.KEEPER_RENEW_S` by
compare-and-set on its own last revision. Every worker sees the record through
its watch of the placement bucket; one not rewritten for `names.KEEPER_LEASE_S`
by a worker's own clock (so clock skew does not matter) is taken over by
compare-and-set on the revision seen, so one worker wins. A keeper that stops
deletes its record, and the others race for it after a random pause (spreading
a fleet's writes). A keeper whose rewrite fails because someone else wrote the
record steps down. Two keepers for a moment, or none for a lease, cost nothing
but time: every placement write is a compare-and-set transition that any
worker may make, as before there was a keeper.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from cortex.broker.bus import Bus
from cortex.broker.errors import BrokerError
from cortex.protocol import Keeper, codec, names

log = logging.getLogger("cortex.worker")

TAKE_JITTER_S = 1.0
"""A free lease is taken after a random pause up to this long, so a fleet does not write it all at once."""
WARN_EVERY_S = 30.0
"""A broker that cannot be reached is logged at most this often (the lease is tried every second)."""


@dataclass
class KeeperLease:
    bus: Bus
    worker_id: str
    instance: str
    inline_catalogues: Callable[[], bool | None]
    """What the keeper's own view says: some live worker reads catalogues only inline (published in its record);
    None while the view is not whole yet (the last record's word stands meanwhile)."""
    gained: Callable[[], Awaitable[None]]
    """Called when this worker becomes the keeper (it starts watching the fleet)."""
    lost: Callable[[], Awaitable[None]]
    """Called when it stops being the keeper (it stops watching)."""
    renew_s: float = names.KEEPER_RENEW_S
    lease_s: float = names.KEEPER_LEASE_S
    _record: Keeper | None = None
    """The record as last seen (None: none stands)."""
    _record_seen: float = field(default_factory=time.monotonic)
    """When the record last changed, by this worker's clock."""
    _revision: int = 0
    """The revision of this worker's own record while it holds the lease (0: it does not)."""
    _since: float = 0.0
    _inline: bool = False
    """The last record's `inline_catalogues`, kept while no record stands (a keeper changing hands)."""
    _warned_at: float = -WARN_EVERY_S
    _nudge: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def held(self) -> bool:
        return self._revision > 0

    def inline(self) -> bool:
        """Whether workers write their catalogues inline: by this worker's own view when it is whole (the keeper's),
        else by the keeper's word (the last one, while none stands)."""
        seen = self.inline_catalogues()
        return self._inline if seen is None else seen

    def on_record(self, value: bytes | None) -> None:
        """The placement bucket's watch brought the keeper's record (None: deleted)."""
        record = _decoded(value) if value is not None else None
        if value is not None and record is None:
            log.warning("ignoring a malformed %s record", names.KEEPER_KEY)
        if record != self._record:
            self._record, self._record_seen = record, time.monotonic()
        if record is not None:
            self._inline = record.inline_catalogues
        if record is None or (self.held and not self._mine(record)):
            self._nudge.set()

    async def run(self) -> None:
        """Hold the lease or wait to take it, until cancelled."""
        while True:
            try:
                if self.held:
                    await self._renew()
                else:
                    await self._take_if_free()
            except BrokerError as exc:
                if time.monotonic() - self._warned_at >= WARN_EVERY_S:
                    self._warned_at = time.monotonic()
                    log.warning("keeper lease: %s", exc)  # tried again in a moment
            except Exception:
                log.exception("keeper lease")  # tried again in a moment
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.renew_s):
                    await self._nudge.wait()
            self._nudge.clear()

    async def release(self) -> None:
        """Give the lease up (the worker stops; call it once `run` has ended): the record goes, so another worker
        takes it at once. Only this worker's own revision is deleted, never a successor's record."""
        if not self.held:
            return
        revision = self._revision
        await self._step_down()
        with contextlib.suppress(BrokerError):
            if not await self.bus.delete_decision(names.KEEPER_KEY, revision=revision):
                # A renewal that landed while its answer was lost (the run cancelled meanwhile) moved the record on:
                # still this worker's, it goes all the same, as `_write` adopts such a write.
                value, standing = await self.bus.read_decision(names.KEEPER_KEY)
                if self._stands_mine(value):
                    await self.bus.delete_decision(names.KEEPER_KEY, revision=standing)

    def _mine(self, record: Keeper) -> bool:
        return record.worker_id == self.worker_id and record.instance == self.instance

    def _own_record(self) -> bytes:
        now = time.time()
        return codec.encode(Keeper(worker_id=self.worker_id, instance=self.instance, since=self._since or now,
                                   renewed=now, inline_catalogues=self.inline()))  # fmt: skip

    async def _write(self, revision: int) -> int:
        """Write this worker's record over `revision` (0: absent): the revision written, 0 if another's stands.

        A write whose answer was lost may still have landed: the record standing
        is then this worker's, and its revision is the one to go on from.
        """
        try:
            written = await self.bus.swap_decision(names.KEEPER_KEY, self._own_record(), revision)
        except BrokerError:
            value, standing = await self.bus.read_decision(names.KEEPER_KEY)
            if not self._stands_mine(value):
                raise
            return standing
        if written:
            return written
        value, standing = await self.bus.read_decision(names.KEEPER_KEY)
        return standing if self._stands_mine(value) else 0

    def _stands_mine(self, value: bytes | None) -> bool:
        record = _decoded(value) if value is not None else None
        return record is not None and self._mine(record)

    async def _take_if_free(self) -> None:
        if self.bus.settling():
            # Cut off, or just back: the keeper could not renew either; its lease runs again from now.
            self._record_seen = time.monotonic()
            return
        if self._record is not None and time.monotonic() - self._record_seen < self.lease_s:
            return  # a keeper stands
        if self._record is None:
            await asyncio.sleep(random.uniform(0.0, TAKE_JITTER_S))
        value, revision = await self.bus.read_decision(names.KEEPER_KEY)
        current = _decoded(value) if value is not None else None  # a malformed record is taken over like a stale one
        if current is not None and current != self._record:
            self.on_record(value)  # rewritten since this worker last saw it: its keeper is alive
        if current is not None and time.monotonic() - self._record_seen < self.lease_s:
            return  # (the watch may have brought it during the pause)
        self._since = time.time()
        written = await self._write(revision)
        if not written:
            return  # another worker took it first
        self._revision = written
        log.info("%s keeps watch over the fleet (%s)", self.worker_id,
                 f"after {current.worker_id}" if current is not None else "none before")  # fmt: skip
        try:
            await self.gained()
        except Exception:
            log.exception("%s cannot keep watch over the fleet: giving the lease up", self.worker_id)
            await self.release()  # taken again, by this worker or another, once the record is gone
            raise

    async def _renew(self) -> None:
        written = await self._write(self._revision)
        if written:
            self._revision = written
            return
        log.info("%s no longer keeps watch over the fleet: its record was rewritten by another", self.worker_id)
        await self._step_down()

    async def _step_down(self) -> None:
        self._revision = 0
        self._since = 0.0
        await self.lost()


def _decoded(value: bytes) -> Keeper | None:
    try:
        return codec.decode_keeper(value)
    except codec.DecodeError:
        return None
