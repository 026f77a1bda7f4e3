"""Which workers are live: one rule over adverts and heartbeats, the same in gateways, workers and cortexctl.

A worker writes its advert (``cortex-fleet``, every 2 s, TTL 10 s) and, from its
asyncio loop, a heartbeat (``cortex-alive``, every `names.HEARTBEAT_INTERVAL_S`).
Each heartbeat expires `names.HEARTBEAT_TTL_S` after it was written; the server
then leaves a marker in its place, which watches see as a purge and which stays
`names.HEARTBEAT_GONE_S`; a worker that stops cleanly purges its key itself.

`LiveFleet` counts a worker while

- its advert was seen within `names.ADVERT_TTL_S`, and
- its heartbeat was seen within `names.HEARTBEAT_TTL_S` and is not gone since.

A worker whose heartbeat a reader has never seen (one older than heartbeats,
which sends none) counts by its advert alone. Every time is the reader's own
clock, passed in (``time.monotonic()``), so clock skew between hosts does not
matter. A snapshot (cortexctl) is read the same way: every key seen "now".

A worker restarted under the same id keeps its advert and its heartbeat going,
but not what its old process was doing: each heartbeat names the process
(`Heartbeat.instance`, also on that process's chunks), and `is_live` asked about
an instance that is no longer the one beating says no.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cortex.protocol import codec, names
from cortex.protocol.messages import WorkerAdvert

_GONE = -math.inf


@dataclass
class LiveFleet:
    """The adverts and heartbeats one reader has seen, and who of them counts as live now."""

    advert_window: float = names.ADVERT_TTL_S
    beat_window: float = float(names.HEARTBEAT_TTL_S)
    _adverts: dict[str, tuple[WorkerAdvert, float]] = field(default_factory=dict)
    """By advert key: the advert and when it was seen."""
    _beats: dict[str, float] = field(default_factory=dict)
    """By worker id: when its last heartbeat was seen (-inf once gone)."""
    _instances: dict[str, str] = field(default_factory=dict)
    """By worker id: the process its last heartbeat came from ("" for a worker that does not say)."""

    def on_change(self, key: str, value: bytes | None, now: float) -> bool:
        """Take a key of the fleet or heartbeat bucket (None: deleted, expired, withdrawn) seen at `now`.

        Returns whether who counts, or what their adverts say, may have changed
        (a beat that keeps a live worker live does not). Raises
        `codec.DecodeError` for an advert that does not decode (the old one is
        dropped first); other keys are ignored.
        """
        worker = names.worker_of_alive_key(key)
        if worker is not None:
            before = self._beat_counts(worker, now)
            self._beats[worker] = now if value is not None else _GONE
            if value is not None:
                self._instances[worker] = _instance_of(value)
            return before != self._beat_counts(worker, now)
        if not names.is_worker_key(key):
            return False
        old = self._adverts.pop(key, None)
        if value is None:
            return old is not None
        self._adverts[key] = (codec.decode_advert(value), now)
        return True

    def _beat_counts(self, worker_id: str, now: float) -> bool:
        beat = self._beats.get(worker_id)
        return beat is None or now - beat <= self.beat_window

    def _counts(self, advert: WorkerAdvert, seen: float, now: float) -> bool:
        return now - seen <= self.advert_window and self._beat_counts(advert.worker_id, now)

    def live(self, now: float) -> list[WorkerAdvert]:
        """The adverts of the workers that count now."""
        return [advert for advert, seen in self._adverts.values() if self._counts(advert, seen, now)]

    def is_live(self, worker_id: str, now: float, instance: str = "") -> bool:
        """Whether `worker_id` counts now; given the `instance` that sent a chunk, whether that process still does."""
        entry = self._adverts.get(names.worker_key(worker_id))
        if entry is None or not self._counts(entry[0], entry[1], now):
            return False
        beating = self._instances.get(worker_id, "")
        return not (instance and beating and beating != instance)

    def advert(self, worker_id: str) -> WorkerAdvert | None:
        """The last advert seen from `worker_id`, live or not."""
        entry = self._adverts.get(names.worker_key(worker_id))
        return entry[0] if entry is not None else None

    def next_change(self, now: float) -> float:
        """When the first worker that counts now stops counting, unless a beat or an advert comes first (inf: never)."""
        out = math.inf
        for advert, seen in self._adverts.values():
            if self._counts(advert, seen, now):
                beat = self._beats.get(advert.worker_id)
                out = min(out, seen + self.advert_window, math.inf if beat is None else beat + self.beat_window)
        return out


def _instance_of(value: bytes) -> str:
    try:
        return codec.decode_heartbeat(value).instance
    except codec.DecodeError:
        return ""  # the key alone is the beat; a value this reader cannot read names no process
