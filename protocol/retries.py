"""When a model no worker could load is tried again: the retry schedule, as pure functions of the placement.

A round is one go at loading the model on every worker that might (each that
fails hands it to the next best). When a round ends with none left, the
placement carries the `error`, the rounds so far (`attempts`) and when the next
round starts by itself (`retry_at`): 30 s after the first failed round, then
1 min, 2 min, 4 min, ... up to `RETRY_CAP_S`, and after `RETRY_LIMIT` rounds no
more (`cortexctl load` still retries at once). Until then gateways answer every
request for the model with a 503 carrying the error; from then, a worker's
upkeep tick or a new request starts the next round, whichever comes first::

    >>> [retry_delay(n) for n in (1, 2, 3, 6, 7)]
    [30.0, 60.0, 120.0, 600.0, 600.0]

An `error` with no failed load behind it (no worker could take the model at
all: too big, pinned models everywhere) is not scheduled: a request tries
again after `RETRY_FAILED_S`, as placements written before the schedule say.
"""

from __future__ import annotations

import math

from cortex.protocol.messages import Placement

RETRY_FAILED_S = 30.0
"""The first retry's delay; and how long a model nobody could place (no failed load) waits for the next request."""
RETRY_CAP_S = 600.0
"""The longest wait between two rounds."""
RETRY_LIMIT = 8
"""Rounds of failed loads after which the model is no longer retried by itself (about 37 minutes in all)."""


def retry_delay(attempts: int) -> float:
    """Seconds from the end of the `attempts`-th failed round to the next: 30 s doubling, capped at `RETRY_CAP_S`."""
    return min(RETRY_CAP_S, RETRY_FAILED_S * 2.0 ** max(0, attempts - 1))


def next_retry(attempts: int, now: float) -> float:
    """When the round after the `attempts`-th failed one starts (Unix time), or 0.0 once `RETRY_LIMIT` are spent."""
    return now + retry_delay(attempts) if attempts < RETRY_LIMIT else 0.0


def held_until(placement: Placement | None) -> float:
    """Until when nobody tries to place the model again (0.0: no error; inf: its retries are spent)."""
    if placement is None or not placement.error:
        return 0.0
    if placement.retry_at:
        return placement.retry_at
    if placement.attempts >= RETRY_LIMIT:
        return math.inf  # until cortexctl load (or pin) writes the placement again
    return placement.updated_at + RETRY_FAILED_S


def retry_due(placement: Placement | None, now: float) -> bool:
    """A scheduled round is due: the placement's workers should start it (a worker's upkeep tick asks this)."""
    return placement is not None and bool(placement.error) and 0.0 < placement.retry_at <= now
