"""What each API key used: one record per finished request in the ``CORTEX_USAGE`` stream, and Prometheus.

A record carries the prompt, completion and cached tokens, the status, and the
seconds the request held a batch slot on its worker (`Usage.slot_seconds`), so
`cortexctl usage` can add up any key over any time from every gateway's
records. Requests on an open gateway (no keys) are not recorded per key.

The request's rate-limit lease is given back here too, once it has ended.
Both are written after the answer went out, off the request's path.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from cortex.broker.bus import Bus
from cortex.broker.errors import BrokerError
from cortex.gateway.limits import Lease, Limiter
from cortex.gateway.metrics import Metrics, RequestTimer
from cortex.protocol import codec, names
from cortex.protocol.keys import ApiKey, UsageRecord

log = logging.getLogger("cortex.gateway")


@dataclass
class Accounting:
    bus: Bus
    limiter: Limiter
    metrics: Metrics
    gateway_id: str
    _pending: set[asyncio.Task[None]] = field(default_factory=set)

    def finish(
        self, key: ApiKey | None, lease: Lease | None, timer: RequestTimer, status: int
    ) -> asyncio.Task[None] | None:
        """A request under `key` ended with `status`: count it, record it, give its lease back (a task, returned so
        that the answer's last byte can wait for the lease: a client's next request may go to another gateway)."""
        if key is None:
            return None
        m = self.metrics
        m.key_requests.labels(key.name, str(status)).inc()
        for kind, count in (("prompt", timer.prompt_tokens), ("completion", timer.completion_tokens),
                            ("cached", timer.cached_tokens)):  # fmt: skip
            if count:
                m.key_tokens.labels(key.name, kind).inc(count)
        if timer.slot_seconds:
            m.key_slot_seconds.labels(key.name).inc(timer.slot_seconds)
        record = UsageRecord(
            key=key.name, model=timer.model, status=status, at=time.time(), prompt_tokens=timer.prompt_tokens,
            completion_tokens=timer.completion_tokens, cached_tokens=timer.cached_tokens,
            slot_seconds=timer.slot_seconds, dialect=timer.dialect, gateway=self.gateway_id,
        )  # fmt: skip
        task = asyncio.get_running_loop().create_task(self._settle(record, lease))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    async def _settle(self, record: UsageRecord, lease: Lease | None) -> None:
        if lease is not None:
            await self.limiter.release(lease, record.prompt_tokens + record.completion_tokens)  # never raises
        try:
            await self.bus.append_record(names.usage_subject(record.key), codec.encode(record))
        except BrokerError as exc:
            log.warning("usage of a request under key %s not recorded: %s", record.key, exc)

    async def flush(self) -> None:
        """Wait for what is being written (on shutdown)."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
