"""Liveness by heartbeat, and pins that outlive their worker.

A worker that dies leaves every gateway's ``/health`` and ``/v1/models`` and
``cortexctl status`` within seconds (about 2 s, measured in docs/fleet.md; the
tests allow `GONE_WITHIN_S`), while a busy one stays listed; a pinned or
``min_replicas`` model whose worker dies or drains is loaded on another worker,
which evicts an idle unpinned model if it must.

Workers take 100 MiB models (set in the catalogue) with a 250 MiB budget, as in
test_fleet.py, so each holds two. Each test starts its own workers and names its
own models, so tests share nothing but the session's nats-server.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import openai
import pytest

from cortex.broker.decisions import read_placement
from cortex.broker.server import EmbeddedNats
from cortex.gateway.errors import ModelNotFound, NoCapacity
from cortex.gateway.fleet import FleetView
from cortex.protocol import ModelCard, ModelState, Pin, Placement, WorkerAdvert, codec, names
from cortex.protocol.heartbeat import Heartbeat
from cortex.protocol.liveness import LiveFleet
from cortex.protocol.placement import keep_replicas
from tests.conftest import Gateway, get_json, on_bus, start_gateway, start_worker, stop_process, wait_for

GONE_WITHIN_S = 6.0
"""Deadline for a killed worker to leave every view (measured: about 2 s)."""
MOVED_WITHIN_S = 30.0
"""Deadline for a pinned model to be loaded elsewhere: noticed, placed, room made, loaded."""
STARTUP_S = 120.0
MiB = 2**20


# -- the rules, on hand-made adverts --------------------------------------------


def advert(name: str, *loaded: str, busy: tuple[str, ...] = (), draining: bool = False) -> WorkerAdvert:
    catalogue = [ModelCard(id=m, memory=100 * MiB) for m in ("p", "x", "y")]
    models = [ModelState(id=m, state="ready", memory=100 * MiB, last_used=float(i), in_flight=int(m in busy))
              for i, m in enumerate(loaded)]  # fmt: skip
    return WorkerAdvert(worker_id=name, host="h", device="cpu", memory_budget=250 * MiB, models=models,
                        memory_used=100 * MiB * len(loaded), catalogue=catalogue, draining=draining)  # fmt: skip


def beat(name: str) -> tuple[str, bytes]:
    return names.alive_key(name), codec.encode(Heartbeat(worker_id=name))


def test_a_heartbeat_is_a_tagged_message_under_the_workers_key() -> None:
    key, value = beat("org/w 1")
    assert key == "alive.org_2Fw_201" and names.worker_of_alive_key(key) == "org/w 1"
    assert names.worker_of_alive_key(names.worker_key("w")) is None
    assert msgspec.json.decode(value) == {"type": "heartbeat", "worker_id": "org/w 1"}
    assert codec.decode_heartbeat(value) == Heartbeat(worker_id="org/w 1")


def test_a_worker_counts_while_its_heartbeat_does() -> None:
    fleet = LiveFleet()
    fleet.on_change(names.worker_key("w"), codec.encode(advert("w")), now=0.0)
    assert fleet.on_change(*beat("w"), now=0.0) is False  # heard before it counted: no change of who counts
    assert fleet.is_live("w", 1.9) and fleet.next_change(1.0) == 2.0
    assert fleet.on_change(*beat("w"), now=1.5) is False  # a beat that keeps it live changes nothing
    assert not fleet.is_live("w", 3.6) and fleet.live(3.6) == []  # three beats missed: gone
    assert fleet.on_change(*beat("w"), now=4.0) is True and fleet.is_live("w", 4.0)  # back
    assert fleet.on_change(names.alive_key("w"), None, now=4.1) is True  # expired or withdrawn: gone at once
    assert not fleet.is_live("w", 4.1) and fleet.advert("w") is not None


def test_a_process_that_is_no_longer_the_one_beating_is_not_live() -> None:
    fleet = LiveFleet()
    fleet.on_change(names.worker_key("w"), codec.encode(advert("w")), now=0.0)
    fleet.on_change(names.alive_key("w"), codec.encode(Heartbeat(worker_id="w", instance="one")), now=0.0)
    assert fleet.is_live("w", 0.5, "one") and fleet.is_live("w", 0.5) and fleet.is_live("w", 0.5, "")
    # Restarted under the same id before its old heartbeat lapsed: the worker is live, its old process is not.
    fleet.on_change(names.alive_key("w"), codec.encode(Heartbeat(worker_id="w", instance="two")), now=1.0)
    assert fleet.is_live("w", 1.5) and fleet.is_live("w", 1.5, "two") and not fleet.is_live("w", 1.5, "one")
    fleet.on_change(names.alive_key("w"), b"not a heartbeat", now=1.6)  # names no process: judge by the key alone
    assert fleet.is_live("w", 1.7, "one")


def test_a_worker_without_heartbeats_counts_by_its_advert_alone() -> None:
    fleet = LiveFleet()
    fleet.on_change(names.worker_key("old"), codec.encode(advert("old")), now=0.0)
    assert fleet.is_live("old", 9.9) and not fleet.is_live("old", 10.1)


def test_a_model_whose_workers_just_left_is_a_503_not_a_404() -> None:
    fleet = FleetView()
    fleet.on_change(names.worker_key("w"), codec.encode(advert("w", "x")))
    assert fleet.find("x").ready_on == ["w"]
    fleet.on_change(names.worker_key("w"), None)  # gone for now (a restart, a broker election)
    with pytest.raises(NoCapacity):
        fleet.find("x")  # the SDKs retry a 503
    with pytest.raises(ModelNotFound):
        fleet.find("never-offered")


def test_a_pin_whose_worker_died_goes_to_the_best_live_worker_evicting_an_idle_model() -> None:
    live = {"b": advert("b", "x", "y"), "c": advert("c", "x", "y", busy=("x", "y"))}
    current = Placement(model="p", workers=["a"])
    new = keep_replicas(current, model="p", wanted=1, why="pinned", live=live, pins=[Pin(model="p")], placements=[],
                        now=0.0)  # fmt: skip
    assert new is not None and new.workers == ["b"]  # c would have to wait for its busy models
    assert "evicting x (lru)" in new.reason and "keeping 1: pinned; a left" in new.reason
    assert keep_replicas(new, model="p", wanted=1, why="pinned", live=live, pins=[], placements=[], now=0.0) is None


def test_a_pin_never_waits_for_busy_models_nor_goes_to_a_draining_worker() -> None:
    live = {"b": advert("b", "x", "y", busy=("x", "y")), "c": advert("c", draining=True)}
    assert keep_replicas(None, model="p", wanted=1, why="pinned", live=live, pins=[], placements=[], now=0.0) is None


def test_missing_copies_are_added_at_once_and_a_live_one_stays() -> None:
    live = {"a": advert("a", "p"), "b": advert("b"), "c": advert("c")}
    current = Placement(model="p", workers=["a", "dead"])
    new = keep_replicas(current, model="p", wanted=3, why="min_replicas 3", live=live, pins=[], placements=[],
                        now=0.0)  # fmt: skip
    assert new is not None and new.workers == ["a", "b", "c"]


# -- real processes ---------------------------------------------------------------


def write_catalogue(folder: Path, model_dir: Path, **extra: str) -> Path:
    """A catalogue of 100 MiB models, one per keyword (its value: more TOML lines for it)."""
    path = folder / "models.toml"
    path.write_text("\n".join(f'[[models]]\nid = "{model}"\npath = "{model_dir}"\nmemory = "100MiB"\n'
                              f"keep_alive = -1\n{more}\n" for model, more in extra.items()))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def gw(nats_server: EmbeddedNats, logs_dir: Path) -> Iterator[Gateway]:
    gateway = start_gateway(nats_server.url, logs_dir)
    yield gateway
    stop_process(gateway.proc)


StartWorker = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def start(nats_server: EmbeddedNats, logs_dir: Path) -> Iterator[StartWorker]:
    """Start a worker (name, catalogue, more options); every one is stopped after the test."""
    procs: list[subprocess.Popen[bytes]] = []

    def run(name: str, catalogue: Path, *args: str) -> subprocess.Popen[bytes]:
        proc = start_worker(nats_server.url, catalogue, logs_dir / f"{name}.log", "--device", "cpu", "--slots", "2",
                            "--worker-id", name, "--memory-budget", "250MiB", *args)  # fmt: skip
        procs.append(proc)
        return proc

    yield run
    for proc in procs:
        stop_process(proc)


def cortexctl(nats_server: EmbeddedNats, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cortex.broker", *args, "--nats", nats_server.url],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def status_workers(nats_server: EmbeddedNats) -> set[str]:
    result = cortexctl(nats_server, "status", "--json")
    assert result.returncode == 0, result.stderr
    return {w["worker_id"] for w in json.loads(result.stdout)["workers"]}


def health(gw: Gateway) -> dict[str, object]:
    body = get_json(f"{gw.root_url}/health")
    assert isinstance(body, dict)
    return body


def loaded_on(gw: Gateway, model: str) -> list[str]:
    try:
        entry = get_json(f"{gw.base_url}/models/{model}")
    except urllib.error.HTTPError as exc:
        if exc.code in (404, 503):  # no live worker has it in its catalogue (503: one did moments ago)
            return []
        raise
    return list(entry["loaded_on"])  # type: ignore[index]


def placement(nats_server: EmbeddedNats, model: str) -> Placement | None:
    return on_bus(nats_server.url, lambda bus: read_placement(bus, model))[0]


def kill(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()  # SIGKILL: no goodbye, the advert and the heartbeat stay until they expire
    proc.wait()


def test_a_killed_worker_leaves_health_models_and_status(
    gw: Gateway, nats_server: EmbeddedNats, start: StartWorker, tmp_path: Path, tiny_model_dir: Path
) -> None:
    worker = start("live-kill", write_catalogue(tmp_path, tiny_model_dir, lk=""), "--model", "lk")
    wait_for(lambda: loaded_on(gw, "lk") == ["live-kill"] and "live-kill" in status_workers(nats_server),
             timeout=STARTUP_S, what="live-kill serving lk", proc=worker)  # fmt: skip
    workers = health(gw)["workers"]
    assert isinstance(workers, int) and "lk" in health(gw)["models_ready"]  # type: ignore[operator]
    kill(worker)

    def gone() -> bool:
        now = health(gw)
        return (now["workers"] == workers - 1 and "lk" not in now["models_ready"]  # type: ignore[operator]
                and loaded_on(gw, "lk") == [] and "live-kill" not in status_workers(nats_server))  # fmt: skip

    wait_for(gone, timeout=GONE_WITHIN_S, what="the killed worker gone from /health, /v1/models and cortexctl status")


def test_a_busy_worker_stays_listed_throughout(
    gw: Gateway, nats_server: EmbeddedNats, start: StartWorker, tmp_path: Path, tiny_model_dir: Path
) -> None:
    # Every decode step pauses 50 ms and a long prompt is prefilled in one pass: the engine thread is
    # never idle while the requests run, and the heartbeat has to come from the asyncio side regardless.
    worker = start("live-busy", write_catalogue(tmp_path, tiny_model_dir, lb=""), "--model", "lb", "--step-delay",
                   "0.05", "--prefill-chunk", "4096", "--max-prefill-tokens", "4096")  # fmt: skip
    wait_for(lambda: loaded_on(gw, "lb") == ["live-busy"], timeout=STARTUP_S, what="live-busy serving lb", proc=worker)
    client = openai.OpenAI(base_url=gw.base_url, api_key="x", max_retries=0, timeout=120)
    prompts = ["Tell me a story. " * 200, "Hello"]  # the first one is a long prefill
    answers: list[object] = []

    def ask(prompt: str) -> None:
        try:
            reply = client.chat.completions.create(model="lb", messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=150, temperature=0)  # fmt: skip
            answers.append(reply.usage.completion_tokens if reply.usage else reply)
        except openai.APIError as exc:
            answers.append(exc)

    askers = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for asker in askers:
        asker.start()
    missing: list[str] = []
    polls = 0
    while any(asker.is_alive() for asker in askers):
        polls += 1
        if loaded_on(gw, "lb") != ["live-busy"] or "lb" not in health(gw)["models_ready"]:  # type: ignore[operator]
            missing.append(f"gateway, poll {polls}")
        if polls % 5 == 0 and "live-busy" not in status_workers(nats_server):
            missing.append(f"cortexctl status, poll {polls}")
        time.sleep(0.1)
    for asker in askers:
        asker.join()
    assert answers == [150, 150]  # 150 steps of at least 50 ms each: listed for 7.5 s at least
    assert polls >= 20 and missing == []


def test_a_pinned_model_whose_worker_is_killed_loads_elsewhere_evicting_an_idle_model(
    gw: Gateway, nats_server: EmbeddedNats, start: StartWorker, tmp_path: Path, tiny_model_dir: Path
) -> None:
    catalogue = write_catalogue(tmp_path, tiny_model_dir, lpin="", lx="", ly="")
    first = start("live-pa", catalogue)
    wait_for(lambda: "live-pa" in status_workers(nats_server), timeout=STARTUP_S, what="live-pa", proc=first)
    pinned = cortexctl(nats_server, "pin", "lpin")
    assert pinned.returncode == 0 and "lpin pinned on live-pa" in pinned.stdout, pinned.stdout + pinned.stderr
    try:
        wait_for(lambda: loaded_on(gw, "lpin") == ["live-pa"], timeout=STARTUP_S, what="lpin on live-pa")
        second = start("live-pb", catalogue, "--model", "lx", "--model", "ly")  # full: 200 of 250 MiB, idle
        wait_for(lambda: loaded_on(gw, "lx") == loaded_on(gw, "ly") == ["live-pb"], timeout=STARTUP_S,
                 what="lx and ly on live-pb", proc=second)  # fmt: skip
        kill(first)
        wait_for(lambda: loaded_on(gw, "lpin") == ["live-pb"], timeout=MOVED_WITHIN_S, what="lpin moved to live-pb")
        kept = placement(nats_server, "lpin")
        assert kept is not None and kept.workers == ["live-pb"] and "live-pa left" in kept.reason, kept
        evicted = [m for m in ("lx", "ly") if loaded_on(gw, m) == []]
        assert len(evicted) == 1
        reason = placement(nats_server, evicted[0])
        assert reason is not None and "evicted from live-pb to make room for lpin" in reason.reason
    finally:
        assert cortexctl(nats_server, "unpin", "lpin").returncode == 0


def test_a_pinned_model_on_a_draining_worker_moves(
    gw: Gateway, nats_server: EmbeddedNats, start: StartWorker, tmp_path: Path, tiny_model_dir: Path
) -> None:
    catalogue = write_catalogue(tmp_path, tiny_model_dir, ldrain="", lz1="", lz2="")
    first = start("live-da", catalogue)
    wait_for(lambda: "live-da" in status_workers(nats_server), timeout=STARTUP_S, what="live-da", proc=first)
    assert cortexctl(nats_server, "pin", "ldrain").returncode == 0
    try:
        wait_for(lambda: loaded_on(gw, "ldrain") == ["live-da"], timeout=STARTUP_S, what="ldrain on live-da")
        second = start("live-db", catalogue, "--model", "lz1", "--model", "lz2")
        wait_for(lambda: loaded_on(gw, "lz1") == loaded_on(gw, "lz2") == ["live-db"], timeout=STARTUP_S,
                 what="lz1 and lz2 on live-db", proc=second)  # fmt: skip
        assert cortexctl(nats_server, "drain", "live-da").returncode == 0
        wait_for(lambda: loaded_on(gw, "ldrain") == ["live-db"], timeout=MOVED_WITHIN_S, what="ldrain moved to live-db")
        assert sorted(m for m in ("lz1", "lz2") if loaded_on(gw, m) == ["live-db"]) in (["lz1"], ["lz2"])
    finally:
        assert cortexctl(nats_server, "undrain", "live-da").returncode == 0
        assert cortexctl(nats_server, "unpin", "ldrain").returncode == 0


def test_min_replicas_are_kept_after_a_kill(
    gw: Gateway, nats_server: EmbeddedNats, start: StartWorker, tmp_path: Path, tiny_model_dir: Path
) -> None:
    catalogue = write_catalogue(tmp_path, tiny_model_dir, lmin="min_replicas = 1")
    first = start("live-ma", catalogue)
    wait_for(lambda: loaded_on(gw, "lmin") == ["live-ma"], timeout=STARTUP_S, what="lmin placed before anyone asks",
             proc=first)  # fmt: skip
    second = start("live-mb", catalogue)
    wait_for(lambda: "live-mb" in status_workers(nats_server), timeout=STARTUP_S, what="live-mb", proc=second)
    kill(first)
    wait_for(lambda: loaded_on(gw, "lmin") == ["live-mb"], timeout=MOVED_WITHIN_S, what="lmin loaded on live-mb")
    kept = placement(nats_server, "lmin")
    assert kept is not None and kept.workers == ["live-mb"] and "min_replicas 1" in kept.reason


def test_a_pin_by_count_keeps_exactly_that_many_copies_through_a_death(
    gw: Gateway, nats_server: EmbeddedNats, start: StartWorker, tmp_path: Path, tiny_model_dir: Path
) -> None:
    # keep_alive 8s: a copy beyond the pin's count is an ordinary one and leaves once idle; the pinned ones stay.
    # Long enough that the extra copy is still there when `cortexctl status` is read just after it loaded, short
    # enough that it leaves well within MOVED_WITHIN_S.
    catalogue = tmp_path / "models.toml"
    catalogue.write_text(
        f'[[models]]\nid = "lcount"\npath = "{tiny_model_dir}"\nmemory = "100MiB"\nkeep_alive = "8s"\n'
    )
    names_ = ["live-ca", "live-cb", "live-cc"]
    procs = {name: start(name, catalogue) for name in names_}
    wait_for(lambda: set(names_) <= status_workers(nats_server), timeout=STARTUP_S, what="three workers",
             proc=procs["live-ca"])  # fmt: skip
    assert cortexctl(nats_server, "pin", "lcount", "--replicas", "2").returncode == 0
    try:
        wait_for(lambda: len(loaded_on(gw, "lcount")) == 2, timeout=STARTUP_S, what="two pinned copies")
        kept = sorted(loaded_on(gw, "lcount"))
        spare = next(name for name in names_ if name not in kept)
        assert cortexctl(nats_server, "load", "lcount", "--worker", spare).returncode == 0  # an extra copy
        wait_for(lambda: spare in loaded_on(gw, "lcount"), timeout=STARTUP_S, what="an extra copy")
        shown = json.loads(cortexctl(nats_server, "status", "--json").stdout)["placements"]["lcount"]
        assert sorted(shown["pinned"]) == kept and shown["extra"] == [spare]
        wait_for(lambda: sorted(loaded_on(gw, "lcount")) == kept, timeout=MOVED_WITHIN_S,
                 what="the extra copy gone once idle, the pinned ones kept")  # fmt: skip
        kill(procs[kept[0]])
        wait_for(lambda: sorted(loaded_on(gw, "lcount")) == sorted([kept[1], spare]), timeout=MOVED_WITHIN_S,
                 what="the dead worker's pinned copy loaded on the third worker")  # fmt: skip
        now = placement(nats_server, "lcount")
        assert now is not None and sorted(now.workers) == sorted([kept[1], spare])  # exactly two, the dead one left
    finally:
        assert cortexctl(nats_server, "unpin", "lcount").returncode == 0
