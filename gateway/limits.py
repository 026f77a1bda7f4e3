"""Per-key rate limits that hold across every gateway: requests and tokens per minute, requests at once.

A key's `LimitWindow` lives in the ``cortex-limits`` bucket. To let a request
in, a gateway reads the window, forgets what is more than a minute old, checks
the key's limits, adds the request, and writes the window back only if no other
gateway wrote it meanwhile (compare-and-set on the KV revision); if one did, it
reads again. So two gateways never both take the last place: what a burst over
several gateways gets through is exactly the limit. Within one gateway the
requests of one key take turns (a lock), so the races left are between gateways.

- ``rpm``: at most that many requests let in within any 60 s (a sliding
  window, not a calendar minute).
- ``tpm``: a request is let in while the tokens (prompt and completion) of the
  requests that finished in the last 60 s are under the limit. A request's
  tokens are known only once it ends, so what was let in runs whole: requests
  started together before any finished can overshoot it (``max_concurrent``
  bounds that).
- ``max_concurrent``: at most that many requests between being let in and
  their end. A gateway that dies holding some gives them back at their deadline.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cortex.broker.bus import Bus
from cortex.broker.errors import BrokerError
from cortex.gateway.errors import ApiError, NoCapacity, RateLimited
from cortex.protocol import codec, names
from cortex.protocol.keys import LIMIT_WINDOW_S, ApiKey, LimitWindow

log = logging.getLogger("cortex.gateway")

MAX_TRIES = 64
"""Compare-and-set rounds before a request is told to retry (each lost round means another gateway let one in)."""


@dataclass(frozen=True)
class Lease:
    """A request let in under a key's limits; given back (with its tokens) when it ends."""

    key: ApiKey
    request_id: str
    headers: dict[str, str]
    """The rate-limit headers for the response, both dialects' (each SDK reads its own)."""


@dataclass(frozen=True)
class Refusal:
    kind: str
    """OpenAI's error type for it: ``requests`` or ``tokens``."""
    message: str
    wait: float
    """Seconds until the request would be let in, as far as the window can tell."""


@dataclass
class Limiter:
    bus: Bus
    _turns: dict[str, asyncio.Lock] = field(default_factory=dict)

    async def admit(self, key: ApiKey | None, request_id: str, deadline: float) -> Lease | None:
        """Let a request in under `key`'s limits (None: no key or no limit), or raise RateLimited."""
        if key is None or not key.limited:
            return None
        async with self._turns.setdefault(key.name, asyncio.Lock()):
            for attempt in range(MAX_TRIES):
                value, revision = await self._read(key)
                now = time.time()
                window = _decode(value)
                window.prune(now)
                refusal = refuse(key, window, now)
                if refusal is not None:
                    retry = max(1, math.ceil(refusal.wait))
                    headers = rate_headers(key, window, now) | {"retry-after-ms": str(max(1, int(refusal.wait * 1000)))}
                    raise RateLimited(refusal.message, kind=refusal.kind, retry_after=retry, headers=headers)
                window.requests.append(now)
                if key.max_concurrent or key.tpm:
                    window.running[request_id] = deadline
                if await self._write(key, window, revision):
                    return Lease(key=key, request_id=request_id, headers=rate_headers(key, window, now))
                await asyncio.sleep(random.uniform(0, 0.001 * 2 ** min(attempt, 5)))  # another gateway won: again
        raise NoCapacity(f"The rate limits of `{key.name}` are too contended to check right now; retry shortly.",
                         code="rate_limit_busy")  # fmt: skip

    async def release(self, lease: Lease, tokens: int) -> None:
        """The request has ended: give its place back and charge its `tokens` (for ``tpm``)."""
        key = lease.key
        if not (key.max_concurrent or key.tpm):
            return  # nothing of it is kept but its admission
        async with self._turns.setdefault(key.name, asyncio.Lock()):
            try:
                for attempt in range(MAX_TRIES):
                    value, revision = await self._read(key)
                    now = time.time()
                    window = _decode(value)
                    window.running.pop(lease.request_id, None)
                    if key.tpm and tokens:
                        window.token_times.append(now)
                        window.token_counts.append(tokens)
                    window.prune(now)
                    if await self._write(key, window, revision):
                        return
                    await asyncio.sleep(random.uniform(0, 0.001 * 2 ** min(attempt, 5)))
                log.warning("could not give back the place of %s under key %s: too contended", lease.request_id,
                            key.name)  # fmt: skip
            except (BrokerError, ApiError) as exc:  # _read/_write say NoCapacity: nobody to tell here but the log
                log.warning("could not give back the place of %s under key %s (it ends at its deadline): %s",
                            lease.request_id, key.name, exc)  # fmt: skip

    async def _read(self, key: ApiKey) -> tuple[bytes | None, int]:
        try:
            return await self.bus.read_limit(names.limit_key(key.name))
        except BrokerError as exc:
            raise NoCapacity(f"The rate limits of `{key.name}` cannot be checked: {exc}",
                             code="broker_unavailable") from exc  # fmt: skip

    async def _write(self, key: ApiKey, window: LimitWindow, revision: int) -> bool:
        try:
            return await self.bus.write_limit(names.limit_key(key.name), codec.encode(window), revision)
        except BrokerError as exc:
            raise NoCapacity(f"The rate limits of `{key.name}` cannot be checked: {exc}",
                             code="broker_unavailable") from exc  # fmt: skip


def _decode(value: bytes | None) -> LimitWindow:
    if not value:
        return LimitWindow()
    try:
        return codec.decode_limit_window(value)
    except codec.DecodeError as exc:
        log.warning("a malformed rate-limit window was reset: %s", exc)
        return LimitWindow()


def refuse(key: ApiKey, window: LimitWindow, now: float) -> Refusal | None:
    """Why `window` (pruned at `now`) has no room for one more request under `key`'s limits, or None if it has."""
    if key.rpm and len(window.requests) >= key.rpm:
        frees_at = window.requests[len(window.requests) - key.rpm] + LIMIT_WINDOW_S
        return Refusal("requests", f"Rate limit reached for key `{key.name}`: {key.rpm} requests per minute.",
                       frees_at - now)  # fmt: skip
    if key.tpm and window.tokens >= key.tpm:
        return Refusal("tokens", f"Rate limit reached for key `{key.name}`: {key.tpm} tokens per minute.",
                       _tokens_free_at(key.tpm, window) - now)  # fmt: skip
    if key.max_concurrent and len(window.running) >= key.max_concurrent:
        return Refusal("requests", f"Rate limit reached for key `{key.name}`: {key.max_concurrent} requests at once.",
                       1.0)  # fmt: skip
    return None


def _tokens_free_at(tpm: int, window: LimitWindow) -> float:
    """When enough of the window's charges have aged out that it is under `tpm` again."""
    left = window.tokens
    for at, count in zip(window.token_times, window.token_counts, strict=True):
        left -= count
        if left < tpm:
            return at + LIMIT_WINDOW_S
    return time.time()


def rate_headers(key: ApiKey, window: LimitWindow, now: float) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` and Anthropic's ``anthropic-ratelimit-*`` headers for the limits `key` has."""
    out: dict[str, str] = {}
    if key.rpm:
        reset = window.requests[0] + LIMIT_WINDOW_S - now if window.requests else 0.0
        out |= _headers("requests", key.rpm, key.rpm - len(window.requests), reset, now)
    if key.tpm:
        reset = window.token_times[0] + LIMIT_WINDOW_S - now if window.token_times else 0.0
        out |= _headers("tokens", key.tpm, key.tpm - window.tokens, reset, now)
    return out


def _headers(what: str, limit: int, remaining: int, reset: float, now: float) -> dict[str, str]:
    reset = max(0.0, reset)
    at = datetime.fromtimestamp(now + reset, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        f"x-ratelimit-limit-{what}": str(limit),
        f"x-ratelimit-remaining-{what}": str(max(0, remaining)),
        f"x-ratelimit-reset-{what}": f"{reset:.3f}s",
        f"anthropic-ratelimit-{what}-limit": str(limit),
        f"anthropic-ratelimit-{what}-remaining": str(max(0, remaining)),
        f"anthropic-ratelimit-{what}-reset": at,
    }
