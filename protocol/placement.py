"""Where a model should load, and every change to a placement, as pure functions over the fleet's state.

Gateways (load on demand), workers (after a failed load, for a deep queue,
kept pins and replicas, the next round of a failed model) and cortexctl all
decide with the same functions over the same KV state, so they agree; the
compare-and-set on the placement key (`cortex.broker.decisions.change_placement`)
makes sure only one decision lands. Nothing here does I/O.

Which worker is chosen, and what it evicts, is `cortex.protocol.choice`.

Every transition of a placement is a function of the "transitions" section: it gets
the placement as it is (None if there is none) and returns the new one, or None
to leave it alone. Bind its keyword arguments with `functools.partial` and hand
it to `change_placement`, which may call it several times.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence

import msgspec

from cortex.protocol.choice import Choice, failed_recently, pick_worker, pinned_copies, recent_failures, serving_workers
from cortex.protocol.messages import (
    MODEL_FAILED,
    MODEL_READY,
    Pin,
    Placement,
    WorkerAdvert,
)
from cortex.protocol.retries import RETRY_LIMIT, next_retry, retry_due

Transition = Callable[[Placement | None], Placement | None]
"""A change of one model's placement: the placement as it is (None: none yet) to the new one (None: leave it)."""


# -- transitions ----------------------------------------------------------------


def failed_on(live: Mapping[str, WorkerAdvert], model: str) -> set[str]:
    """The live workers whose advert says they failed to load `model`."""
    return {w for w, a in live.items() if (s := a.state_of(model)) is not None and s.state == MODEL_FAILED}


def add_worker(current: Placement | None, *, model: str, worker: str, reason: str) -> Placement | None:
    """`worker` loads the model (cortexctl load and pin, a worker placing itself); its failure and any error go."""
    workers = list(current.workers) if current else []
    if worker in workers and current is not None and not current.error:
        return None
    failed = {w: why for w, why in (current.failed if current else {}).items() if w != worker}
    return Placement(model=current.model if current else model, reason=reason, failed=failed,
                     workers=workers if worker in workers else [*workers, worker])  # fmt: skip


def remove_worker(current: Placement | None, *, worker: str, reason: str) -> Placement | None:
    """`worker` unloads the model (evicted there, cortexctl unload --worker)."""
    if current is None or worker not in current.workers:
        return None
    return Placement(model=current.model, workers=[w for w in current.workers if w != worker], reason=reason,
                     failed=current.failed)  # fmt: skip


def remove_all_workers(current: Placement | None, *, reason: str) -> Placement | None:
    """Every worker unloads the model (cortexctl unload); the failures stay on record."""
    if current is None or not current.workers:
        return None
    return Placement(model=current.model, reason=reason, failed=current.failed)


def scale_out(
    current: Placement | None,
    *,
    model: str,
    seen: Sequence[str],
    live: Mapping[str, WorkerAdvert],
    pins: Iterable[Pin],
    placements: Iterable[Placement],
    max_replicas: int,
    evict_below: int | None,
    depth: int,
    now: float,
) -> Placement | None:
    """Another copy of a model whose queue has stayed deep, on the best live worker with room for it.

    The caller has seen the queue at least as deep as the serving slots for the
    window, on the placement naming `seen` (and every copy there ready:
    `loading_copies`). A worker that has room without evicting comes first;
    when none has and `evict_below` is set (the catalogue's ``scale_evicts``:
    the model's priority), one that can make room at once by evicting idle
    models of lower priority. Copies count only while they serve
    (`serving_workers`): the new placement is the serving workers, in their
    order, then the new one, so a dead or draining copy leaves (as
    `keep_replicas` does) rather than holding a place up to `max_replicas`.
    None once the placement has moved on (someone else decided), serves
    `max_replicas` copies, or no worker can take one.
    """
    serving = serving_workers(current, model, live)
    if current is None or current.error or not serving or len(serving) >= max_replicas:
        return None
    if list(current.workers) != list(seen):
        return None
    pins = list(pins)
    placements = list(placements)
    skip = set(recent_failures(current, now))
    skip |= failed_on(live, model)
    others = [a for w, a in live.items() if w not in serving]
    choice = pick_worker(model, others, pins, exclude=skip, placements=placements, evict=False).choice
    if choice is None and evict_below is not None:
        choice = pick_worker(model, others, pins, exclude=skip, placements=placements, evict_below=evict_below,
                             wait=False).choice  # fmt: skip
    if choice is None:
        return None
    reason = f"{choice.reason}; replica {len(serving) + 1} of {max_replicas}: {depth} requests queued"
    gone = [w for w in current.workers if w not in serving]
    reason += f" ({', '.join(gone)} left)" if gone else ""
    failed = {w: error for w, error in current.failed.items() if w != choice.worker}
    return Placement(model=current.model, workers=[*serving, choice.worker], reason=reason, failed=failed)


def loading_copies(placement: Placement | None, model: str, live: Mapping[str, WorkerAdvert]) -> list[str]:
    """The serving workers of `placement` whose copy of `model` is not ready yet (placed but not started, or
    loading): while any is, its slots drain nothing yet, so a deep queue asks for no further replica."""
    out = []
    for worker in serving_workers(placement, model, live):
        state = live[worker].state_of(model)
        if state is None or state.state != MODEL_READY:
            out.append(worker)
    return out


def record_loaded(current: Placement | None, *, worker: str) -> Placement | None:
    """`worker` loaded the model: the rounds of failed loads in a row (`attempts`, `retry_at`) start again from
    none. None when there is nothing to reset, or the placement no longer names `worker`."""
    if current is None or worker not in current.workers or current.error:
        return None
    if not current.attempts and not current.retry_at:
        return None
    return msgspec.structs.replace(current, attempts=0, retry_at=0.0)


def leave_above_minimum(
    current: Placement | None, *, worker: str, live: Collection[str], min_replicas: int, reason: str
) -> Placement | None:
    """`worker` leaves (idle past keep_alive) only while the `live` others keep `min_replicas`; dead ones go too."""
    if current is None or worker not in current.workers:
        return None
    others = [w for w in current.workers if w != worker and w in live]
    if len(others) < min_replicas:
        return None  # the fleet keeps at least min_replicas of it
    return Placement(model=current.model, workers=others, reason=reason, failed=current.failed)


def place_on_demand(
    current: Placement | None,
    *,
    model: str,
    live: Mapping[str, WorkerAdvert],
    pins: Iterable[Pin],
    placements: Iterable[Placement],
    now: float,
) -> Placement | None:
    """The best `live` worker loads a model asked for, unless one serves it or nobody could a moment ago.

    Workers whose advert or recent placement says they failed to load it are
    skipped; when none can, the placement carries the reason as its `error`
    (the gateway answers 503 with it until `RETRY_FAILED_S` passes).
    """
    if serving_workers(current, model, live) or failed_recently(current, now):
        return None
    # A new round after failed loads (`retries`) tries every worker again, whatever its advert still says.
    attempts = current.attempts if current is not None and current.error else 0
    previous = {} if attempts else recent_failures(current, now)
    failed = set() if attempts else failed_on(live, model)
    pick = pick_worker(model, live.values(), pins, exclude=failed | set(previous), placements=placements)
    if pick.choice is None:
        if attempts:  # this round ends before it began: it counts as failed
            return Placement(model=model, reason=pick.reason, failed=previous, error=pick.reason,
                             attempts=attempts + 1, retry_at=next_retry(attempts + 1, now))  # fmt: skip
        return Placement(model=model, reason=pick.reason, failed=previous, error=pick.reason)
    reason = pick.reason + (f" (retry {attempts} of {RETRY_LIMIT - 1} after failed loads)" if attempts else "")
    return Placement(model=model, workers=[pick.choice.worker], reason=reason, failed=previous, attempts=attempts)


def retry_failed_load(
    current: Placement | None,
    *,
    model: str,
    live: Mapping[str, WorkerAdvert],
    pins: Iterable[Pin],
    placements: Iterable[Placement],
    now: float,
) -> Placement | None:
    """The next round of loads of a model every worker failed to load, once its `retry_at` has come.

    What the keeper's upkeep tick writes (`cortex.worker.keeper`; should two
    write it, the compare-and-set lets one land); a request arriving then does
    the same through `place_on_demand`.
    """
    if not retry_due(current, now):
        return None
    return place_on_demand(current, model=model, live=live, pins=pins, placements=placements, now=now)


def record_failed_load(
    current: Placement | None,
    *,
    model: str,
    worker: str,
    error: str,
    adverts: Iterable[WorkerAdvert],
    pins: Iterable[Pin],
    placements: Iterable[Placement],
    now: float,
) -> Placement:
    """`worker` could not load the model: it leaves with `error`, and the next best worker gets it (or none can).

    When none is left, the round has failed: the placement carries the error,
    one more `attempts`, and when the next round starts (`retries.next_retry`).
    `attempts` counts rounds in a row: a load that succeeds resets it
    (`record_loaded`), so a worker failing long after a retry round succeeded
    starts the count from one again.
    """
    failed = {**(current.failed if current else {}), worker: error}
    workers = [w for w in (current.workers if current else []) if w != worker]
    attempts = current.attempts if current else 0
    if workers:
        return Placement(model=model, workers=workers, reason=current.reason if current else "", failed=failed,
                         attempts=attempts)  # fmt: skip
    pick = pick_worker(model, adverts, pins, exclude=failed, placements=placements)
    if pick.choice is None:
        return Placement(model=model, reason=pick.reason, failed=failed, error=f"{pick.reason} ({error})",
                         attempts=attempts + 1, retry_at=next_retry(attempts + 1, now))  # fmt: skip
    return Placement(model=model, workers=[pick.choice.worker], failed=failed, attempts=attempts,
                     reason=f"{pick.reason}, after {worker} failed")  # fmt: skip


def keep_replicas(
    current: Placement | None,
    *,
    model: str,
    wanted: int,
    why: str,
    live: Mapping[str, WorkerAdvert],
    pins: Iterable[Pin],
    placements: Iterable[Placement],
    now: float,
) -> Placement | None:
    """A pinned or ``min_replicas`` model back to `wanted` copies on `live` workers (dead and draining ones leave).

    `live` holds the workers that count now, none draining. Each missing copy
    goes to the best live worker that can load the model at once, evicting
    idle unpinned models if it must (never waiting for busy ones, never one
    that failed to load it lately); the workers that died, drain or failed
    leave the placement, so a restarted one does not load an extra copy. None
    when the model has its copies, nobody could load it a moment ago, or no
    worker can take it now (every worker asks again on its next upkeep tick).

    With its copies there but a worker that does not count among the first
    `wanted` of the placement (the copies a pin by count keeps: `pinned_copies`),
    the serving workers move to the front, so extras become the kept copies;
    nobody leaves (a worker merely late with its heartbeat keeps its copy).
    """
    serving = serving_workers(current, model, live)
    if len(serving) >= wanted and current is not None:
        if pinned_copies(current, wanted) == serving[:wanted]:
            return None
        rest = [w for w in current.workers if w not in serving]
        reason = f"keeping {wanted} on {', '.join(serving[:wanted])} ({why}; {', '.join(rest)} not counted)"
        return Placement(model=model, workers=[*serving, *rest], reason=reason, failed=current.failed)
    if len(serving) >= wanted or failed_recently(current, now):
        return None
    skip = failed_on(live, model)
    skip |= set(recent_failures(current, now))
    chosen: list[Choice] = []
    while len(serving) + len(chosen) < wanted:
        taken = {*serving, *(c.worker for c in chosen)}
        others = [a for w, a in live.items() if w not in taken]
        choice = pick_worker(model, others, pins, exclude=skip, placements=placements, wait=False).choice
        if choice is None:
            break
        chosen.append(choice)
    if not chosen:
        return None
    added = [c.worker for c in chosen]
    left = [w for w in (current.workers if current else []) if w not in serving]
    reason = "; ".join(c.reason for c in chosen) + f" (keeping {wanted}: {why}"
    reason += f"; {', '.join(left)} left)" if left else ")"
    failed = {w: error for w, error in (current.failed if current else {}).items() if w not in added}
    return Placement(model=model, workers=[*serving, *added], reason=reason, failed=failed)
