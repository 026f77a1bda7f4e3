"""Catalogues read by digest: fetched once per process, and adverts held until theirs is here.

Adverts name their worker's catalogue by digest (`cortex.protocol.catalogues`);
`cortex.protocol.codec.decode_advert` fills it in from the process's
`catalogues.CACHE`. This module keeps that cache filled before any advert
naming a digest reaches a reader:

- `Catalogues.fetch` reads one catalogue from ``cortex-catalogues`` by key (a
  single get; concurrent asks for the same digest share it), checks its digest
  and puts it in the cache;
- `HeldAdverts` sits between a fleet watch and its handler: an advert whose
  digest is in the cache (every advert but the first of a new catalogue) goes
  straight through; one whose digest is not is held (the latest per key) while
  a task fetches it, tried again with back-off until it comes, and then handed
  on. The watch's callback never waits on the broker, and adverts of other
  workers are never held up. Deletes go straight through (and drop what was
  held for the key).

A worker writes its catalogue before its first advert naming it, so a fetch
normally finds it at once; one that does not (the bucket purged) comes back
when the worker writes it again (`names.CATALOGUE_REFRESH_S`). Until then the
worker's new advert is held: readers go on with its previous one, or do not
count the worker yet, rather than take it for a worker with no models.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

import msgspec
from nats.js.errors import KeyDeletedError, KeyNotFoundError
from nats.js.kv import KeyValue

from cortex.broker.watch import FleetHandler
from cortex.protocol import catalogues, names

log = logging.getLogger("cortex.broker")

RETRY_FIRST_S = 0.25
RETRY_MAX_S = 10.0
"""A catalogue not found (or the broker not answering) is asked for again after 0.25 s, doubling up to this."""
WARN_AFTER_S = 5.0
"""An advert held this long for its catalogue is logged (once per digest)."""


class Catalogues:
    """Reads catalogues by digest into `catalogues.CACHE`."""

    def __init__(self, bucket: KeyValue, cache: catalogues.CatalogueCache = catalogues.CACHE) -> None:
        self._bucket = bucket
        self.cache = cache
        self._inflight: dict[str, asyncio.Future[str]] = {}

    async def fetch(self, digest: str) -> str:
        """Read `digest`'s catalogue into the cache, unless it is there; "" once it is, else why not."""
        if digest in self.cache:
            return ""
        running = self._inflight.get(digest)
        if running is None:
            running = self._inflight[digest] = asyncio.ensure_future(self._fetch_once(digest))
            running.add_done_callback(lambda _: self._inflight.pop(digest, None))
        return await asyncio.shield(running)

    async def fetch_all(self, digests: Iterable[str]) -> dict[str, str]:
        """`fetch` each digest not in the cache, at once; digest -> why it could not be read, for those that failed."""
        wanted = sorted({d for d in digests if d and d not in self.cache})
        results = await asyncio.gather(*(self.fetch(d) for d in wanted))
        return {d: why for d, why in zip(wanted, results, strict=True) if why}

    async def _fetch_once(self, digest: str) -> str:
        try:
            entry = await self._bucket.get(names.catalogue_key(digest))
        except (KeyNotFoundError, KeyDeletedError):
            return "not in the bucket"
        except ValueError:
            return "not a digest"
        except Exception as exc:  # the broker away or slow; nats-py raises several unrelated types here
            return f"not read: {exc!r}"
        value = entry.value or b""
        if catalogues.digest(value) != digest:
            return "stored under another digest"
        try:
            self.cache.put(digest, catalogues.decode_catalogue(value))
        except msgspec.DecodeError as exc:
            return f"does not decode: {exc}"
        return ""


class HeldAdverts:
    """A fleet watch's handler that hands on adverts only once their catalogue is in the cache."""

    def __init__(self, catalogues_: Catalogues, handler: FleetHandler) -> None:
        self._catalogues = catalogues_
        self._handler = handler
        self._held: dict[str, tuple[str, bytes]] = {}
        """By advert key: the digest it waits for and the advert."""
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self.none_held = asyncio.Event()
        """Set while no advert waits for its catalogue."""
        self.none_held.set()

    def on_change(self, key: str, value: bytes | None) -> None:
        if value is not None and names.is_worker_key(key):
            digest = catalogues.digest_of_advert(value)
            if digest and digest not in self._catalogues.cache:
                self._held[key] = (digest, value)
                self.none_held.clear()
                if digest not in self._resolving:
                    self._resolving[digest] = asyncio.create_task(self._resolve(digest), name=f"catalogue-{digest}")
                return
        if self._held.pop(key, None) is not None and not self._held:
            self.none_held.set()
        self._handler(key, value)

    def stop(self) -> None:
        for task in self._resolving.values():
            task.cancel()

    def _waiting_for(self, digest: str) -> list[str]:
        return [key for key, (wanted, _) in self._held.items() if wanted == digest]

    async def _resolve(self, digest: str) -> None:
        delay, since, warned = RETRY_FIRST_S, time.monotonic(), False
        try:
            while self._waiting_for(digest):
                why = await self._catalogues.fetch(digest)
                if not why:
                    break
                if not warned and time.monotonic() - since >= WARN_AFTER_S:
                    warned = True
                    log.warning("catalogue %s (named by %s) %s: their adverts wait for it", digest,
                                ", ".join(self._waiting_for(digest)), why)  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(2 * delay, RETRY_MAX_S)
        finally:
            self._resolving.pop(digest, None)
        if warned:
            log.info("catalogue %s read", digest)
        for key in self._waiting_for(digest):
            _, value = self._held.pop(key)
            try:
                self._handler(key, value)
            except Exception:  # one advert the handler cannot take must not keep the others from it
                log.exception("the fleet handler failed on %s", key)
        if not self._held:
            self.none_held.set()
