"""The gateway's model list at scale: kept until what it shows changes, and placement reasons that do not grow with
the fleet. `FleetView` is fed encoded adverts and heartbeats as its watches hand them over."""

from __future__ import annotations

import time

import msgspec
import pytest

from cortex.gateway.errors import NoCapacity
from cortex.gateway.fleet import FleetView
from cortex.protocol import ModelCard, ModelState, Placement, WorkerAdvert, codec, names
from cortex.protocol.choice import Choice, _with_pending, choose_worker

MiB = 2**20
CATALOGUE = [ModelCard(id="m1", memory=100 * MiB, aliases=["one"]), ModelCard(id="m2", memory=100 * MiB)]


def advert(worker: str, *models: ModelState, catalogue: list[ModelCard] = CATALOGUE) -> WorkerAdvert:
    return WorkerAdvert(worker_id=worker, host="h", device="cpu", memory_budget=250 * MiB, catalogue=catalogue,
                        models=list(models), updated_at=time.time())  # fmt: skip


def ready(model: str, **fields: object) -> ModelState:
    return ModelState(id=model, state="ready", memory=100 * MiB, **fields)  # type: ignore[arg-type]


def feed(view: FleetView, *adverts: WorkerAdvert) -> None:
    for a in adverts:
        view.on_change(names.worker_key(a.worker_id), codec.encode(a))


def test_the_model_list_stands_until_what_it_shows_changes() -> None:
    view = FleetView()
    feed(view, advert("a", ready("m1")), advert("b"))
    first = view.models()
    assert first["m1"].ready_on == ["a"] and set(first) == {"m1", "m2"}
    feed(view, advert("a", ready("m1", last_used=time.time(), prefix_keys=["k"])), advert("b"))  # nothing shown
    assert view.models() is first
    feed(view, advert("a", ready("m1", in_flight=2)))  # a counter the list shows
    assert view.models()["m1"].in_flight == 2
    feed(view, advert("b", ready("m2")))
    assert view.models()["m2"].ready_on == ["b"]
    wider = [*CATALOGUE, ModelCard(id="m3", memory=MiB)]
    feed(view, advert("b", ready("m2"), catalogue=wider))  # a catalogue changed
    assert "m3" in view.models()
    feed(view, advert("c", catalogue=[ModelCard(id="m4")]))  # a worker came
    assert "m4" in view.models()
    view.on_change(names.worker_key("c"), None)  # and went
    assert "m4" not in view.models()
    view.note_placement(Placement(model="m2", workers=["b"], reason="written here"))  # as `ensure_placed` does
    assert view.models()["m2"].placement == view.placements["m2"]


def test_names_resolve_by_alias_and_a_vanished_model_is_a_503() -> None:
    view = FleetView(stale_after=0.3)
    feed(view, advert("a", catalogue=[ModelCard(id="m1", aliases=["one"]), ModelCard(id="m2")]))
    assert view.find("one").id == "m1" and view.find("m2").id == "m2"
    feed(view, advert("a", catalogue=[ModelCard(id="m2")]))  # m1 leaves the catalogue
    with pytest.raises(NoCapacity):
        view.find("one")
    time.sleep(0.4)  # the worker's advert goes stale: the list does not stand past it
    assert view.models() == {}
    with pytest.raises(NoCapacity):
        view.find("m2")


def test_a_worker_that_stops_beating_leaves_and_comes_back() -> None:
    view = FleetView()
    feed(view, advert("a", ready("m1")))
    view.on_change(names.alive_key("a"), b"{}")
    assert view.models()["m1"].ready_on == ["a"]
    view.on_change(names.alive_key("a"), None)  # its heartbeat is gone
    assert view.models() == {}
    view.on_change(names.alive_key("a"), b"{}")
    feed(view, advert("a", ready("m1")))
    assert view.models()["m1"].ready_on == ["a"]


def test_the_reason_names_three_runners_up_and_counts_the_rest() -> None:
    fleet = [advert(f"w{i}") for i in range(7)]
    choice = choose_worker("m1", fleet, [])
    assert isinstance(choice, Choice) and choice.worker == "w0"
    assert choice.reason.endswith("(preferred over w1, w2, w3 and 3 more)")
    draining = [msgspec.structs.replace(a, draining=True) for a in fleet]
    reason = choose_worker("m1", draining, [])
    assert reason == ("no worker can load m1: w0 is draining; w1 is draining; w2 is draining; w3 is draining; "
                      "w4 is draining; and 2 more workers")  # fmt: skip


def test_only_placements_naming_the_worker_reserve_memory() -> None:
    a = advert("a")
    placements = [Placement(model="m1", workers=["b"]), Placement(model="m2", workers=["a", "b"])]
    pending = _with_pending(a, placements)
    assert [(s.id, s.state) for s in pending.models] == [("m2", "loading")]
    assert pending.memory_reserved == 100 * MiB
    assert _with_pending(a, [Placement(model="m9", workers=["a"])]) is a  # not in its catalogue
