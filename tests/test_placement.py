"""The placement policy, on hand-made adverts: who loads a model, and what it evicts."""

from __future__ import annotations

import msgspec

from cortex.protocol import ModelCard, ModelState, Pin, WorkerAdvert
from cortex.protocol.placement import Choice, choose_worker, plan_evictions

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
