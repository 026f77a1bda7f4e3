"""Noticing that nobody waits for a cold load any more.

A request for a model nobody has loaded waits in the model's queue while a
worker loads it, which can take minutes. When the requests that waited for it
are cancelled (their clients went away) or pass their deadlines meanwhile, the
load is work for nobody, holding memory another model could use: the worker
calls it off (`cortex.worker.residency`). This module only says when:
`abandoned` looks at the model's queue every `WATCH_S` seconds (the ids and
deadlines of the first requests, `Bus.queued_requests`) and returns once, for
`QUIET_S`, it held no live request and at least one dead request that waited
for this load.

A queue that empties is no sign of abandon: other workers serving the model
may have drained it (a replica added for load, ``cortexctl load`` of a model
served elsewhere). Nor is a load that no request waited for abandoned, and
dead requests left over from before it (a load called off earlier leaves
them queued) do not count: a request waited for this load when it was seen
live during it, or when its deadline passed after the load began. The dead
requests stay queued: a worker that later fetches them settles them (as seen,
once it has heard them cancelled, or past their deadline).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from cortex.broker.bus import Bus
from cortex.broker.errors import BrokerError
from cortex.protocol import codec

log = logging.getLogger("cortex.worker")

WATCH_S = 0.5
"""How often a loading model's queue is looked at."""
QUIET_S = 1.0
"""How long the queue must hold dead requests and no live one before the load is abandoned."""
PEEK_LIMIT = 64
"""Requests looked at per look; a queue holding this many is never judged abandoned (more may wait behind)."""


@dataclass(frozen=True)
class Queued:
    """A request in a model's queue: its stream sequence, its id, and its deadline (Unix time; 0: none)."""

    seq: int
    request_id: str
    deadline: float


async def abandoned(
    bus: Bus, model: str, *, was_cancelled: Callable[[str], bool], ended: asyncio.Event
) -> list[Queued] | None:
    """Wait until nobody waits for the load of `model`; the dead requests that waited for it, or None once `ended`
    is set (the load finished or was given up).

    A request is dead once the worker has heard it cancelled (`was_cancelled`)
    or its deadline has passed. While the broker cannot be read, the load is
    not abandoned.
    """
    began = time.time()
    waited: set[str] = set()
    """Requests seen live during this load."""
    quiet_since: float | None = None
    while not ended.is_set():
        queued = await _look(bus, model)
        now = time.time()
        gave_up: list[Queued] = []
        if queued is not None:
            live = [q for q in queued if not (was_cancelled(q.request_id) or 0 < q.deadline <= now)]
            if live and not waited:
                log.info("%d request(s) wait for the load of %s", len(live), model)
            waited.update(q.request_id for q in live)
            if not live:  # dead, all of them: those that waited for this load count
                gave_up = [q for q in queued if q.request_id in waited or began < q.deadline <= now]
        if gave_up:
            quiet_since = time.monotonic() if quiet_since is None else quiet_since
            if time.monotonic() - quiet_since >= QUIET_S:
                return gave_up
        else:
            quiet_since = None  # someone waits, nobody did, or the queue cannot be read: keep loading
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ended.wait(), timeout=WATCH_S)
    return None


async def _look(bus: Bus, model: str) -> list[Queued] | None:
    """The requests queued for `model` (one that does not decode is left out: the pull loop that meets it
    terminates it); None if the broker cannot say, or if `PEEK_LIMIT` of them or more wait (more may wait behind
    those looked at)."""
    try:
        found = await bus.queued_requests(model, PEEK_LIMIT)
    except BrokerError:
        return None
    if len(found) >= PEEK_LIMIT:
        return None
    queued = []
    for seq, payload in found:
        try:
            request = codec.decode_request(payload)
        except codec.DecodeError:
            continue
        queued.append(Queued(seq=seq, request_id=request.request_id, deadline=request.deadline))
    return queued
