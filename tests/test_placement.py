"""The placement policy, on hand-made adverts: who loads a model, what it evicts, replicas for deep queues, what a
pin by count keeps, and the retry schedule of failed loads."""

from __future__ import annotations

import math
from functools import partial

import msgspec

from cortex.protocol import ModelCard, ModelState, Pin, Placement, WorkerAdvert
from cortex.protocol.choice import Choice, choose_worker, pinned_models, pinned_workers, plan_evictions
from cortex.protocol.placement import (
    add_worker,
    keep_replicas,
    leave_above_minimum,
    loading_copies,
    place_on_demand,
    record_failed_load,
    record_loaded,
    retry_failed_load,
    scale_out,
)
from cortex.protocol.retries import RETRY_CAP_S, RETRY_LIMIT, held_until, next_retry, retry_delay, retry_due
from cortex.worker.scaling import DeepQueues

MiB = 2**20
CATALOGUE = [ModelCard(id=f"m{i}", memory=100 * MiB, priority=i) for i in range(1, 8)]


def worker(name: str, *loaded: tuple[str, float], budget: int = 250, eviction: str = "lru", busy: tuple[str, ...] = (),
           queued: tuple[str, ...] = (), draining: bool = False) -> WorkerAdvert:  # fmt: skip
    models = [ModelState(id=m, state="ready", memory=100 * MiB, last_used=t, in_flight=1 if m in busy else 0,
                         queue_depth=3 if m in queued else 0) for m, t in loaded]  # fmt: skip
    return WorkerAdvert(worker_id=name, host="h", device="cpu", memory_budget=budget * MiB,
                        memory_used=100 * MiB * len(loaded), models=models, catalogue=CATALOGUE, eviction=eviction,
                        draining=draining)  # fmt: skip


def test_room_beats_eviction_and_the_choice_is_explained() -> None:
    choice = choose_worker("m3", [worker("a", ("m1", 1.0), ("m2", 2.0)), worker("b", ("m4", 3.0))], [])
    assert isinstance(choice, Choice)
    assert choice.worker == "b" and choice.evict == []
    assert "no eviction" in choice.reason and "preferred over a" in choice.reason


def test_colder_evictions_first_then_worker_id() -> None:
    fleet = [worker("a", ("m1", 50.0), ("m2", 60.0)), worker("b", ("m3", 10.0), ("m4", 70.0))]
    choice = choose_worker("m5", fleet, [])
    assert isinstance(choice, Choice) and (choice.worker, choice.evict) == ("b", ["m3"])
    assert "evicting m3 (lru)" in choice.reason
    assert choose_worker("m5", list(reversed(fleet)), []) == choice  # the order adverts arrive in does not matter


def test_pinned_busy_and_queued_models_are_never_evicted() -> None:
    advert = worker("a", ("m1", 1.0), ("m2", 2.0), busy=("m1",))
    assert plan_evictions(advert, 100 * MiB, []) == ["m2"]
    assert plan_evictions(advert, 100 * MiB, [Pin(model="m2")]) is None
    queued = worker("a", ("m1", 1.0), ("m2", 2.0), queued=("m1",))
    assert plan_evictions(queued, 100 * MiB, []) == ["m2"]
    assert plan_evictions(worker("a", ("m1", 1.0), ("m2", 2.0)), 100 * MiB, [Pin(model="m1", worker="b")]) == ["m1"]


def test_priority_strategy_evicts_the_lowest_priority_first() -> None:
    advert = worker("a", ("m5", 1.0), ("m2", 9.0), eviction="priority")
    assert plan_evictions(advert, 100 * MiB, []) == ["m2"]  # m2 is more recent but of lower priority
    assert plan_evictions(worker("a", ("m5", 1.0), ("m2", 9.0)), 100 * MiB, []) == ["m5"]  # lru


def test_draining_failed_and_too_small_workers_are_skipped_with_reasons() -> None:
    big = ModelCard(id="huge", memory=1000 * MiB)
    fleet = [msgspec.structs.replace(worker("a"), catalogue=[*CATALOGUE, big]), worker("b", draining=True)]
    reason = choose_worker("huge", fleet, [])
    assert isinstance(reason, str) and "a has 0.24 GiB in all and the model needs 0.98 GiB" in reason
    reason = choose_worker("m1", [worker("b", draining=True)], [])
    assert isinstance(reason, str) and "b is draining" in reason
    assert choose_worker("m1", [worker("a")], [], exclude={"a"}) == "no worker can load m1: a failed to load it"
    assert choose_worker("nope", [worker("a")], []) == "no live worker has nope in its catalogue"


def test_a_worker_that_has_the_model_keeps_it() -> None:
    choice = choose_worker("m1", [worker("a"), worker("b", ("m1", 1.0))], [])
    assert isinstance(choice, Choice) and choice.worker == "b" and choice.evict == []


def test_busy_models_make_a_worker_wait_not_refuse() -> None:
    busy = worker("a", ("m1", 1.0), ("m2", 2.0), busy=("m1",), queued=("m2",))
    choice = choose_worker("m3", [busy], [])
    assert isinstance(choice, Choice) and choice.evict == ["m1"]
    assert "once their requests are done" in choice.reason
    spare = worker("b", ("m4", 1.0), ("m5", 2.0))
    choice = choose_worker("m3", [busy, spare], [])
    assert isinstance(choice, Choice) and choice.worker == "b"  # an idle eviction beats waiting
    pinned = choose_worker("m3", [busy], [Pin(model="m1"), Pin(model="m2")])
    assert isinstance(pinned, str) and "pinned" in pinned


def test_a_model_that_needs_two_gpus_goes_to_a_worker_with_two() -> None:
    two = ModelCard(id="big", memory=100 * MiB, gpus=2)
    one_gpu = msgspec.structs.replace(worker("a"), catalogue=[two])
    two_gpus = msgspec.structs.replace(worker("b"), catalogue=[two], devices=2)
    choice = choose_worker("big", [one_gpu, two_gpus], [])
    assert isinstance(choice, Choice) and choice.worker == "b"
    reason = choose_worker("big", [one_gpu], [])
    assert isinstance(reason, str) and "a has 1 device(s) and the model needs 2" in reason


def test_gpu_lists_parse() -> None:
    import pytest

    from cortex.worker.device import parse_gpus

    assert parse_gpus("0") == [0] and parse_gpus("0,1") == [0, 1]
    for bad in ("", "a", "0,0", "-1"):
        with pytest.raises(ValueError):
            parse_gpus(bad)


def test_load_progress_follows_the_last_load_time() -> None:
    import time

    from cortex.worker.catalogue import ModelSpec
    from cortex.worker.residency import ModelSlot, _progress

    spec = ModelSpec(id="m", path="/nowhere")
    slot = ModelSlot(spec=spec, loading_since=time.monotonic() - 1.0, expected_load_s=4.0)
    assert 0.24 < _progress(slot) < 0.5
    slot.expected_load_s = 0.5
    assert _progress(slot) == 0.99  # late, but not done until it is ready
    slot.state = "ready"
    assert _progress(slot) == 1.0


def test_placements_not_yet_in_adverts_take_memory() -> None:
    from cortex.protocol import Placement

    fleet = [worker("a"), worker("b")]
    pending = [Placement(model="m1", workers=["a"]), Placement(model="m2", workers=["a"])]
    choice = choose_worker("m3", fleet, [], placements=pending)
    assert isinstance(choice, Choice) and choice.worker == "b"  # a burst of cold models spreads out
    waiting = choose_worker("m3", [worker("a")], [], placements=pending)
    assert isinstance(waiting, Choice) and "once their requests are done" in waiting.reason
    assert choose_worker("m1", fleet, [], placements=pending) == Choice("a", [], "a has it loading")


def test_a_worker_holding_the_model_in_its_host_tier_is_preferred() -> None:
    parked = msgspec.structs.replace(worker("b", ("m2", 5.0)), host_cached=["m1"])
    choice = choose_worker("m1", [worker("a"), parked], [])
    assert isinstance(choice, Choice) and choice.worker == "b"  # over a's room: b copies it back from host memory
    assert "from its host tier" in choice.reason and "preferred over a" in choice.reason
    idle = msgspec.structs.replace(worker("b", ("m2", 5.0), ("m3", 6.0)), host_cached=["m1"])
    choice = choose_worker("m1", [worker("a"), idle], [])
    assert isinstance(choice, Choice) and (choice.worker, choice.evict) == ("b", ["m2"])  # m2 goes to b's tier too
    full = msgspec.structs.replace(worker("b", ("m2", 5.0), ("m3", 6.0), busy=("m2", "m3")), host_cached=["m1"])
    choice = choose_worker("m1", [worker("a"), full], [])
    assert isinstance(choice, Choice) and choice.worker == "a"  # never waiting for busy models over loading now


# -- replicas for a deep queue ----------------------------------------------------------------------------------


def live(*adverts: WorkerAdvert) -> dict[str, WorkerAdvert]:
    return {a.worker_id: a for a in adverts}


HOT = ModelCard(id="hot", memory=100 * MiB, priority=5, max_replicas=2)


def hot_worker(name: str, *loaded: tuple[str, float], busy: tuple[str, ...] = ()) -> WorkerAdvert:
    advert = worker(name, *loaded, busy=busy)
    return msgspec.structs.replace(advert, catalogue=[*CATALOGUE, HOT], slots_total=4)


def scale(current: Placement | None, fleet: dict[str, WorkerAdvert], *, evict_below: int | None = None,
          seen: list[str] | None = None) -> Placement | None:  # fmt: skip
    seen = seen if seen is not None else list(current.workers if current else [])
    return scale_out(current, model="hot", seen=seen, live=fleet, pins=[], placements=[], max_replicas=2,
                     evict_below=evict_below, depth=20, now=0.0)  # fmt: skip


def test_a_deep_queue_gets_a_replica_on_a_worker_with_room_and_no_more() -> None:
    fleet = live(hot_worker("a", ("hot", 1.0)), hot_worker("b", ("m1", 1.0), ("m2", 2.0)), hot_worker("c", ("m3", 1.0)))
    new = scale(Placement(model="hot", workers=["a"]), fleet)
    assert new is not None and new.workers == ["a", "c"]  # b has no room without evicting
    assert "replica 2 of 2: 20 requests queued" in new.reason
    assert scale(new, fleet) is None  # max_replicas reached
    assert scale(Placement(model="hot", workers=["a"]), fleet, seen=["a", "x"]) is None  # it moved on meanwhile
    assert scale(None, fleet) is None and scale(Placement(model="hot", error="no"), fleet) is None


def test_a_replica_evicts_only_idle_lower_priority_models_and_only_when_allowed() -> None:
    full = live(hot_worker("a", ("hot", 1.0)), hot_worker("b", ("m1", 1.0), ("m2", 2.0)))
    placed = Placement(model="hot", workers=["a"])
    assert scale(placed, full) is None  # nobody has room, and scale_evicts is off
    new = scale(placed, full, evict_below=HOT.priority)
    assert new is not None and new.workers == ["a", "b"] and "evicting m1 (lru)" in new.reason
    assert scale(placed, full, evict_below=1) is None  # m1 (priority 1) is not below 1
    busy = live(hot_worker("a", ("hot", 1.0)), hot_worker("b", ("m1", 1.0), ("m2", 2.0), busy=("m1", "m2")))
    assert scale(placed, busy, evict_below=HOT.priority) is None  # never waits for busy models
    assert plan_evictions(full["b"], 100 * MiB, [], below=2) == ["m1"]
    assert plan_evictions(full["b"], 100 * MiB, [], below=1) is None


def test_a_full_worker_holding_the_model_in_its_host_tier_does_not_block_a_replica_elsewhere() -> None:
    parked = msgspec.structs.replace(hot_worker("b", ("m1", 1.0), ("m2", 2.0)), host_cached=["hot"])
    fleet = live(hot_worker("a", ("hot", 1.0)), parked, hot_worker("c", ("m3", 1.0)))
    others = [fleet["b"], fleet["c"]]
    ranked_first = choose_worker("hot", others, [])
    assert isinstance(ranked_first, Choice) and ranked_first.worker == "b" and ranked_first.evict  # its host tier
    no_evict = choose_worker("hot", others, [], evict=False)
    assert isinstance(no_evict, Choice) and (no_evict.worker, no_evict.evict) == ("c", [])
    new = scale(Placement(model="hot", workers=["a"]), fleet, evict_below=HOT.priority)
    assert new is not None and new.workers == ["a", "c"]  # c has room: nobody evicts, though b ranks first
    assert isinstance(choose_worker("hot", [fleet["b"]], [], evict=False), str)  # only b: no worker qualifies


def test_a_busy_worker_that_would_wait_is_left_out_not_chosen() -> None:
    busy = msgspec.structs.replace(worker("b", ("m2", 1.0), ("m3", 2.0), busy=("m2", "m3")), host_cached=["m1"])
    idle = worker("c", ("m4", 5.0), ("m5", 6.0))
    choice = choose_worker("m1", [busy, idle], [], wait=False)
    assert isinstance(choice, Choice) and choice.worker == "c" and not choice.waits
    assert isinstance(choose_worker("m1", [busy], [], wait=False), str)


def test_a_dead_replica_does_not_hold_a_place_up_to_max_replicas() -> None:
    fleet = live(hot_worker("a", ("hot", 1.0)), hot_worker("c", ("m3", 1.0)))
    placed = Placement(model="hot", workers=["dead", "a"])  # "dead" has no advert any more
    new = scale(placed, fleet)
    assert new is not None and new.workers == ["a", "c"]  # the dead copy leaves, the serving one keeps its place
    assert scale(new, fleet) is None  # two serve now: max_replicas


def test_a_copy_still_loading_holds_scale_out_back() -> None:
    loading = msgspec.structs.replace(hot_worker("b"), models=[ModelState(id="hot", state="loading", memory=100 * MiB)])
    fleet = live(hot_worker("a", ("hot", 1.0)), loading, hot_worker("c"))
    placed = Placement(model="hot", workers=["a", "b"])
    assert loading_copies(placed, "hot", fleet) == ["b"]
    assert loading_copies(Placement(model="hot", workers=["a", "c"]), "hot", fleet) == ["c"]  # placed, not started
    assert loading_copies(Placement(model="hot", workers=["a"]), "hot", fleet) == []
    assert loading_copies(None, "hot", fleet) == []


def test_a_successful_load_ends_the_count_of_failed_rounds() -> None:
    retried = Placement(model="m1", workers=["a"], failed={"b": "boom"}, attempts=3)  # round 4 under way on a
    ok = record_loaded(retried, worker="a")
    assert ok is not None and ok.workers == ["a"] and (ok.attempts, ok.retry_at) == (0, 0.0)
    assert record_loaded(ok, worker="a") is None  # nothing to reset: no write
    assert record_loaded(retried, worker="b") is None  # b is not placed
    # Much later the worker fails and nobody else can: the first failed round in a row, not the fourth.
    later = record_failed_load(ok, model="m1", worker="a", error="oom", adverts=[], pins=[], placements=[],
                               now=5000.0)  # fmt: skip
    assert (later.attempts, later.retry_at) == (1, 5030.0)
    assert record_failed_load(retried, model="m1", worker="a", error="oom", adverts=[], pins=[], placements=[],
                              now=5000.0).attempts == 4  # fmt: skip


def test_the_deep_clock_restarts_when_the_queue_drains_or_the_placement_changes() -> None:
    deep = DeepQueues()
    assert deep.observe("hot", ["a"], True, 10.0) == 0.0
    assert deep.observe("hot", ["a"], True, 12.5) == 2.5
    assert deep.observe("hot", ["a", "b"], True, 13.0) == 0.0  # a replica was added: slots changed
    assert deep.observe("hot", ["a", "b"], False, 14.0) == 0.0
    assert deep.observe("hot", ["a", "b"], True, 15.0) == 0.0


# -- pins by count ----------------------------------------------------------------------------------------------


def test_a_pin_by_count_keeps_the_first_copies_and_extras_are_ordinary() -> None:
    pins = [Pin(model="m1", replicas=2)]
    placements = {"m1": Placement(model="m1", workers=["a", "b", "c"])}
    assert [w for w in "abc" if pinned_models(pins, w, placements)] == ["a", "b"]
    assert all(pinned_models(pins, w) == {"m1"} for w in "abc")  # without placements: every copy, to be safe
    extra = worker("c", ("m1", 1.0), ("m2", 2.0))
    assert plan_evictions(extra, 100 * MiB, pins, placements=placements) == ["m1"]
    assert plan_evictions(worker("a", ("m1", 1.0), ("m2", 2.0)), 100 * MiB, pins, placements=placements) == ["m2"]
    # An extra copy leaves when idle while the others keep the count, never below it.
    leave = partial(leave_above_minimum, worker="c", min_replicas=2, reason="idle")
    assert leave(placements["m1"], live={"a", "b", "c"}) == Placement(model="m1", workers=["a", "b"], reason="idle")
    assert leave(placements["m1"], live={"b", "c"}) is None


def test_the_workers_a_pin_keeps_are_the_ones_it_counts() -> None:
    placed = Placement(model="m1", workers=["a", "b", "c"])
    assert pinned_workers(Pin(model="m1", replicas=2), placed) == ["a", "b"]
    assert pinned_workers(Pin(model="m1", worker="b"), placed) == ["b"]
    assert pinned_workers(Pin(model="m1", worker="x"), placed) == [] and pinned_workers(None, placed) == []
    assert pinned_workers(Pin(model="m1"), None) == []


def test_a_dead_pinned_copy_hands_its_place_to_an_extra_one() -> None:
    fleet = {w: worker(w, ("m1", 1.0)) for w in ("b", "c")}
    current = Placement(model="m1", workers=["a", "b", "c"])  # a died; two copies serve still
    new = keep_replicas(current, model="m1", wanted=2, why="pinned", live=fleet, pins=[], placements=[], now=0.0)
    assert new is not None and new.workers == ["b", "c", "a"]  # nobody leaves; b and c are the kept copies now
    assert keep_replicas(new, model="m1", wanted=2, why="pinned", live=fleet, pins=[], placements=[], now=0.0) is None


# -- retries of failed loads ------------------------------------------------------------------------------------


def test_the_retry_schedule_doubles_to_a_cap_and_stops() -> None:
    assert [retry_delay(n) for n in range(1, 7)] == [30.0, 60.0, 120.0, 240.0, 480.0, RETRY_CAP_S]
    assert retry_delay(RETRY_LIMIT + 5) == RETRY_CAP_S
    assert next_retry(1, 1000.0) == 1030.0 and next_retry(RETRY_LIMIT, 1000.0) == 0.0
    failed = Placement(model="m1", error="boom", attempts=2, retry_at=1060.0, updated_at=1000.0)
    assert held_until(failed) == 1060.0 and not retry_due(failed, 1059.0) and retry_due(failed, 1060.0)
    spent = msgspec.structs.replace(failed, attempts=RETRY_LIMIT, retry_at=0.0)
    assert held_until(spent) == math.inf and not retry_due(spent, 1e12)
    unplaceable = Placement(model="m1", error="too big", updated_at=1000.0)  # no failed load: a request retries
    assert held_until(unplaceable) == 1030.0 and not retry_due(unplaceable, 2000.0)
    assert held_until(Placement(model="m1", workers=["a"])) == 0.0


def test_a_failed_round_is_scheduled_and_the_next_round_tries_every_worker_again() -> None:
    failed_state = ModelState(id="m1", state="failed", error="boom")
    fleet = {w: msgspec.structs.replace(worker(w), models=[failed_state], memory_used=0) for w in ("a", "b")}
    round_one = Placement(model="m1", workers=["b"], failed={"a": "boom"})
    done = record_failed_load(round_one, model="m1", worker="b", error="boom", adverts=fleet.values(), pins=[],
                              placements=[], now=1000.0)  # fmt: skip
    assert done.workers == [] and done.error and set(done.failed) == {"a", "b"}
    assert (done.attempts, done.retry_at) == (1, 1030.0)
    retry = partial(retry_failed_load, model="m1", live=fleet, pins=[], placements=[])
    assert retry(done, now=1029.0) is None  # not yet
    again = retry(done, now=1030.0)
    assert again is not None and again.workers == ["a"] and not again.error and again.attempts == 1
    assert "retry 1 of" in again.reason
    assert retry(again, now=2000.0) is None  # under way: nothing to do
    # The second round fails too: a longer wait.
    mid = record_failed_load(again, model="m1", worker="a", error="boom", adverts=fleet.values(), pins=[],
                             placements=[], now=1040.0)  # fmt: skip
    assert mid.workers == ["b"] and mid.attempts == 1
    second = record_failed_load(mid, model="m1", worker="b", error="boom", adverts=fleet.values(), pins=[],
                                placements=[], now=1041.0)  # fmt: skip
    assert (second.attempts, second.retry_at) == (2, 1101.0)
    # A request after the retry time starts the round as the worker would; cortexctl load starts afresh.
    by_request = place_on_demand(second, model="m1", live=fleet, pins=[], placements=[], now=1101.0)
    assert by_request is not None and by_request.workers == ["a"] and by_request.attempts == 2
    assert place_on_demand(second, model="m1", live=fleet, pins=[], placements=[], now=1100.0) is None
    manual = add_worker(second, model="m1", worker="b", reason="cortexctl load")
    assert manual is not None and manual.workers == ["b"] and not manual.error and manual.retry_at == 0.0
