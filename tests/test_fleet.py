"""The fleet with real worker processes: load on demand, exactly one load per burst, eviction, keep_alive.

Three workers share one catalogue of tiny models that each take 100 MiB (set in
the catalogue) and have a 250 MiB budget, so each holds two models at most.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec
import openai
import pytest

from cortex.broker.bus import Bus
from cortex.broker.decisions import change_placement, read_placement
from cortex.broker.server import EmbeddedNats
from cortex.protocol import Pin, Placement, WorkerAdvert, codec, names
from tests.conftest import Gateway, get_json, metric, on_bus, start_worker, stop_process, wait_for, write_catalogue

WORKERS = ["fleet-a", "fleet-b", "fleet-c"]
PROMPT = [{"role": "user", "content": "Hello"}]
BURST_TOKENS = 1600
"""Long enough that the queue of a burst of 24 stays deeper than one worker's four slots well past the 2 s window:
the tiny model writes about 3,000 tokens a second over four slots on an idle 2-core machine, so each round of four
takes about 2 s and the queue is deep for about 8 s (400 tokens were drained before the window on an idle machine)."""


@pytest.fixture(scope="module")
def fleet_catalogue(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    path = tmp_path_factory.mktemp("fleet") / "models.toml"
    entries = [f'[[models]]\nid = "f{i}"\npath = "{tiny_model_dir}"\nmemory = "100MiB"\nkeep_alive = -1\n'
               for i in range(1, 9)]  # fmt: skip
    entries.append(f'[[models]]\nid = "f-idle"\npath = "{tiny_model_dir}"\nmemory = "100MiB"\nkeep_alive = "1s"\n')
    entries.append(f'[[models]]\nid = "f-huge"\npath = "{tiny_model_dir}"\nmemory = "10GiB"\n')
    entries.append(f'[[models]]\nid = "f-hot"\npath = "{tiny_model_dir}"\nmemory = "10MiB"\nmax_replicas = 2\n')
    entries.append(f'[[models]]\nid = "f-min"\npath = "{tiny_model_dir}"\nmemory = "10MiB"\nmin_replicas = 1\n')
    broken = path.parent / "broken-model"  # a folder without weights: every load fails
    broken.mkdir()
    entries.append(f'[[models]]\nid = "f-broken"\npath = "{broken}"\nmemory = "10MiB"\n')
    path.write_text("\n".join(entries))
    return path


def start_fleet_worker(nats_server: EmbeddedNats, catalogue: Path, log: Path, name: str) -> subprocess.Popen[bytes]:
    """One of the three fleet workers: 250 MiB for 100 MiB models."""
    return start_worker(nats_server.url, catalogue, log, "--device", "cpu", "--slots", "4", "--worker-id", name,
                        "--memory-budget", "250MiB")  # fmt: skip


@pytest.fixture(scope="module")
def fleet(
    nats_server: EmbeddedNats, gateway: Gateway, fleet_catalogue: Path, logs_dir: Path
) -> Iterator[dict[str, subprocess.Popen[bytes]]]:
    procs = {}
    for name in WORKERS:
        procs[name] = start_fleet_worker(nats_server, fleet_catalogue, logs_dir / f"{name}.log", name)

    def all_up() -> bool:
        workers = get_json(f"{gateway.root_url}/health")
        models = {m["id"] for m in get_json(f"{gateway.base_url}/models")["data"]}  # type: ignore[index]
        return isinstance(workers, dict) and "f1" in models and workers["workers"] >= 4

    wait_for(all_up, timeout=120, what="fleet workers")
    yield procs
    for proc in procs.values():
        stop_process(proc)


@pytest.fixture(scope="module")
def client(gateway: Gateway, fleet: dict[str, subprocess.Popen[bytes]]) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0, timeout=120)


def ask(client: openai.OpenAI, model: str) -> int:
    reply = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=3, temperature=0)  # type: ignore[arg-type]
    assert reply.usage is not None
    return reply.usage.completion_tokens


def placement(nats_server: EmbeddedNats, model: str) -> Placement | None:
    return on_bus(nats_server.url, lambda bus: read_placement(bus, model))[0]


def adverts(nats_server: EmbeddedNats) -> list[WorkerAdvert]:
    """The live workers' adverts, read from the fleet bucket."""
    raw = on_bus(nats_server.url, Bus.read_fleet)
    return [codec.decode_advert(value) for key, value in raw.items() if names.is_worker_key(key)]


def last_used(nats_server: EmbeddedNats, model: str) -> float:
    """When `model` last finished a request, as its worker advertises it."""
    return max((s.last_used for a in adverts(nats_server) for s in a.models if s.id == model), default=0.0)


def loads(logs_dir: Path, model: str) -> int:
    return sum((logs_dir / f"{w}.log").read_text().count(f"loaded {model} on") for w in WORKERS)


def loaded_on(gateway: Gateway, model: str) -> list[str]:
    entry = get_json(f"{gateway.base_url}/models/{model}")
    return list(entry["loaded_on"])  # type: ignore[index]


def test_a_burst_for_a_cold_model_loads_it_exactly_once(
    client: openai.OpenAI, gateway: Gateway, nats_server: EmbeddedNats, logs_dir: Path
) -> None:
    with ThreadPoolExecutor(20) as pool:
        assert list(pool.map(lambda _: ask(client, "f1"), range(20))) == [3] * 20
    assert loads(logs_dir, "f1") == 1
    where = placement(nats_server, "f1")
    assert where is not None and len(where.workers) == 1 and where.reason.startswith(where.workers[0])
    assert loaded_on(gateway, "f1") == where.workers


def test_models_spread_then_the_coldest_is_evicted(
    client: openai.OpenAI, gateway: Gateway, nats_server: EmbeddedNats
) -> None:
    for model in ["f2", "f3", "f4", "f5", "f6"]:  # with f1: two per worker, every budget full
        assert ask(client, model) == 3
    counts = [sum(w in loaded_on(gateway, f"f{i}") for i in range(1, 7)) for w in WORKERS]
    assert counts == [2, 2, 2]
    ask(client, "f1")  # f1 is now the warmest; f2 the coldest
    wait_for(lambda: last_used(nats_server, "f1") > last_used(nats_server, "f6"), timeout=10, what="adverts current")
    holder = loaded_on(gateway, "f2")[0]
    assert ask(client, "f7") == 3
    assert loaded_on(gateway, "f7") == [holder]
    wait_for(lambda: loaded_on(gateway, "f2") == [], timeout=10, what="f2 evicted")
    evicted = placement(nats_server, "f2")
    assert evicted is not None and evicted.workers == []
    assert f"evicted from {holder} to make room for f7 (lru)" in evicted.reason


def test_a_pinned_model_is_never_evicted(client: openai.OpenAI, gateway: Gateway, nats_server: EmbeddedNats) -> None:
    coldest = "f3"  # untouched since it loaded
    holder = loaded_on(gateway, coldest)[0]

    on_bus(nats_server.url, lambda bus: bus.write_decision(names.pin_key(coldest), codec.encode(Pin(model=coldest)), 0))
    wait_for(lambda: get_json(f"{gateway.base_url}/models/{coldest}")["pinned"], timeout=5, what="pin seen")  # type: ignore[index]
    assert ask(client, "f8") == 3
    assert loaded_on(gateway, coldest) == [holder]


def test_an_idle_model_unloads_after_keep_alive(client: openai.OpenAI, gateway: Gateway) -> None:
    assert ask(client, "f-idle") == 3
    wait_for(lambda: loaded_on(gateway, "f-idle") == [], timeout=15, what="f-idle unloaded after keep_alive 1s")


def test_min_replicas_are_loaded_before_anyone_asks(
    gateway: Gateway, fleet: dict[str, subprocess.Popen[bytes]]
) -> None:
    wait_for(lambda: len(loaded_on(gateway, "f-min")) == 1, timeout=20, what="f-min loaded without a request")


def test_a_model_every_worker_fails_to_load_is_a_503_with_the_reasons(client: openai.OpenAI, logs_dir: Path) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        ask(client, "f-broken")
    assert info.value.status_code == 503
    message = info.value.message
    assert "cannot be loaded" in message and "fleet-a" in message and "fleet-b" in message and "fleet-c" in message
    attempts = sum((logs_dir / f"{w}.log").read_text().count("loading f-broken failed") for w in WORKERS)
    assert attempts == 3  # each worker tried once, then the fleet gave up


def test_a_failed_model_shows_its_next_retry_and_retries_by_itself(nats_server: EmbeddedNats, logs_dir: Path) -> None:
    # A round of its own, read right after it fails: whatever time passed since the test before (whose failed
    # round the workers retry by themselves 30 s on), this one starts from a round just failed.
    started = time.time()
    assert cortexctl(nats_server, "load", "f-broken", "--worker", "fleet-a").returncode == 0

    def failed_round() -> Placement | None:
        p = placement(nats_server, "f-broken")
        return p if p is not None and p.error and not p.workers and p.updated_at >= started else None

    wait_for(lambda: failed_round() is not None, timeout=30, what="the round started by cortexctl load to fail")
    broken = failed_round()
    assert broken is not None and broken.attempts == 1  # cortexctl load starts the count afresh
    assert broken.retry_at == pytest.approx(broken.updated_at + 30.0, abs=1.0)
    assert "next retry" in cortexctl(nats_server, "status").stdout

    def tried() -> int:
        return sum((logs_dir / f"{w}.log").read_text().count("loading f-broken failed") for w in WORKERS)

    before = tried()
    due = msgspec.structs.replace(broken, retry_at=time.time())  # as if its 30 s had passed: nothing else changes

    async def make_due(bus: Bus) -> Placement | None:
        return await change_placement(bus, "f-broken", lambda current: due, by="test")

    on_bus(nats_server.url, make_due)
    wait_for(lambda: (p := placement(nats_server, "f-broken")) is not None and p.attempts == 2, timeout=30,
             what="a second round of loads, started by the workers")  # fmt: skip
    again = placement(nats_server, "f-broken")
    assert again is not None and again.error and again.retry_at == pytest.approx(again.updated_at + 60.0, abs=1.0)
    assert tried() >= before + 3  # each worker tried again


def test_a_model_too_big_for_every_worker_is_a_clear_503(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        ask(client, "f-huge")
    assert info.value.status_code == 503
    assert "fleet-a has 0.24 GiB in all and the model needs 10.00 GiB" in info.value.message


def serving_hot(nats_server: EmbeddedNats) -> set[str]:
    """The workers `cortexctl status --json` shows running requests of f-hot."""
    result = cortexctl(nats_server, "status", "--json")
    assert result.returncode == 0, result.stderr
    return {w["worker_id"] for w in json.loads(result.stdout)["workers"]
            for m in w.get("models", []) if m["id"] == "f-hot" and m.get("in_flight")}  # fmt: skip


def test_a_burst_sent_at_once_is_served_by_a_second_replica(
    client: openai.OpenAI, gateway: Gateway, nats_server: EmbeddedNats
) -> None:
    """24 long requests at once for a cold max_replicas = 2 model: its queue stays deep, and a worker adds the
    second copy with no further request arriving."""

    def long_request(_: int) -> int:
        reply = client.chat.completions.create(model="f-hot", messages=PROMPT, max_tokens=BURST_TOKENS, temperature=0)  # type: ignore[arg-type]
        return reply.usage.completion_tokens if reply.usage else 0

    started = time.monotonic()
    seen: set[str] = set()
    with ThreadPoolExecutor(24) as pool:
        answers = [pool.submit(long_request, i) for i in range(24)]
        while len(seen) < 2 and not all(answer.done() for answer in answers):
            seen = serving_hot(nats_server)  # during the burst, both at once
        two_serving = time.monotonic() - started
        assert [answer.result(timeout=120) for answer in answers] == [BURST_TOKENS] * 24
    print(f"burst of 24: two workers serving after {two_serving:.1f}s, all answered after "
          f"{time.monotonic() - started:.1f}s")  # fmt: skip
    assert len(seen) == 2
    where = placement(nats_server, "f-hot")
    assert where is not None and len(where.workers) == 2 and "replica 2 of 2" in where.reason


@pytest.fixture(scope="module")
def swap_worker(
    nats_server: EmbeddedNats, gateway: Gateway, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory,
    logs_dir: Path,
) -> Iterator[Path]:  # fmt: skip
    """One worker with room for one of its two models: they must take turns."""
    catalogue = write_catalogue(tmp_path_factory.mktemp("swap") / "models.toml", tiny_model_dir, ("s1", "s2"),
                                memory="100MiB")  # fmt: skip
    log_path = logs_dir / "swap.log"
    proc = start_worker(nats_server.url, catalogue, log_path, "--device", "cpu", "--slots", "2", "--worker-id",
                        "swapper", "--memory-budget", "150MiB", "--step-delay", "0.005")  # fmt: skip
    wait_for(lambda: "s1" in {m["id"] for m in get_json(f"{gateway.base_url}/models")["data"]}, timeout=60,  # type: ignore[index]
             what="swap worker", proc=proc)  # fmt: skip
    yield log_path
    stop_process(proc)


def test_two_hot_models_on_one_small_worker_take_turns(client: openai.OpenAI, swap_worker: Path) -> None:
    def busy_client(model: str) -> list[int]:
        out = []
        for _ in range(2):
            reply = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=100, temperature=0)  # type: ignore[arg-type]
            out.append(reply.usage.completion_tokens if reply.usage else 0)
        return out

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(busy_client, ["s1", "s2"] * 4))
    assert results == [[100, 100]] * 8  # every request served: none refused for want of room
    text = swap_log = swap_worker.read_text()
    loads = text.count("loaded s1 on") + text.count("loaded s2 on")
    assert 2 <= loads <= 6, swap_log  # they took turns, without thrashing


def test_a_model_with_a_request_in_flight_is_not_evicted(client: openai.OpenAI, swap_worker: Path) -> None:
    # The swap worker pauses after every decode step, so 1,500 tokens hold s1 busy for 7.5 s at least:
    # once its first token has arrived, the request for s2 surely meets it in flight.
    with client.chat.completions.create(model="s1", messages=PROMPT, max_tokens=1500, temperature=0, stream=True,  # type: ignore[arg-type]
                                        stream_options={"include_usage": True}) as stream:  # fmt: skip
        chunks = iter(stream)
        next(chunks)  # s1 is generating
        with ThreadPoolExecutor(1) as pool:
            second = pool.submit(ask, client, "s2")  # waits for room: s1 must finish its answer first
            usage = [chunk.usage for chunk in chunks if chunk.usage is not None]
            assert usage[-1].completion_tokens == 1500  # never cut short by an eviction
            assert second.result(timeout=120) == 3
    log = swap_worker.read_text()
    assert log.rindex("unloaded s1") > log.rindex("loaded s1 on")


def cortexctl(nats_server: EmbeddedNats, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cortex.broker", *args, "--nats", nats_server.url],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_cortexctl_unload_load_and_models(client: openai.OpenAI, gateway: Gateway, nats_server: EmbeddedNats) -> None:
    result = cortexctl(nats_server, "unload", "f1")
    assert result.returncode == 0, result.stderr
    wait_for(lambda: loaded_on(gateway, "f1") == [], timeout=15, what="f1 unloaded")
    result = cortexctl(nats_server, "load", "f1", "--worker", "fleet-c")
    assert result.returncode == 0 and "f1 placed on fleet-c" in result.stdout, result.stdout + result.stderr
    wait_for(lambda: loaded_on(gateway, "f1") == ["fleet-c"], timeout=15, what="f1 loaded on fleet-c")
    listing = cortexctl(nats_server, "models").stdout
    assert "f1" in listing and "fleet-c (ready)" in listing and "cortexctl load --worker" in listing
    refused = cortexctl(nats_server, "unload", "f3")  # pinned by an earlier test
    assert refused.returncode == 1 and "pinned" in refused.stdout


def test_a_model_asked_for_while_it_unloads_loads_again(client: openai.OpenAI, nats_server: EmbeddedNats) -> None:
    assert cortexctl(nats_server, "unload", "f1").returncode == 0
    assert ask(client, "f1") == 3  # placed again at once; its worker reloads it after the unload finishes


def test_pin_with_replicas_keeps_that_many(gateway: Gateway, nats_server: EmbeddedNats) -> None:
    result = cortexctl(nats_server, "pin", "f-min", "--replicas", "2")
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for(lambda: len(loaded_on(gateway, "f-min")) == 2, timeout=20, what="two replicas of pinned f-min")
    status = cortexctl(nats_server, "status").stdout
    assert "PLACED ON" in status and "f-min" in status
    assert cortexctl(nats_server, "unpin", "f-min").returncode == 0


def test_drain_moves_work_elsewhere_and_undrain_restores(
    client: openai.OpenAI, gateway: Gateway, nats_server: EmbeddedNats
) -> None:
    assert cortexctl(nats_server, "unpin", "f3").returncode == 0
    assert cortexctl(nats_server, "drain", "fleet-c").returncode == 0
    wait_for(lambda: all("fleet-c" not in loaded_on(gateway, f"f{i}") for i in range(1, 9)), timeout=20,
             what="fleet-c unloaded its models")  # fmt: skip
    assert ask(client, "f1") == 3  # served by another worker
    assert "fleet-c" not in loaded_on(gateway, "f1")
    status = cortexctl(nats_server, "status")
    assert "draining" in status.stdout
    assert cortexctl(nats_server, "undrain", "fleet-c").returncode == 0
    wait_for(lambda: not next(a for a in adverts(nats_server) if a.worker_id == "fleet-c").draining, timeout=15,
             what="fleet-c back in service")  # fmt: skip


def test_lifecycle_metrics(gateway: Gateway, fleet: dict[str, subprocess.Popen[bytes]]) -> None:
    # The drain test's unloads reach the metrics with the worker's next advert.
    wait_for(lambda: metric(gateway, "cortex_evictions_total", reason="drain") >= 1, timeout=15,
             what="drain evictions in the metrics")  # fmt: skip
    assert metric(gateway, "cortex_cold_starts_total", model="f1") >= 1
    for reason in ("lru", "keep_alive", "drain"):
        assert metric(gateway, "cortex_evictions_total", reason=reason) >= 1, reason
    assert metric(gateway, "cortex_model_load_seconds_count") >= 8
    assert metric(gateway, "cortex_worker_memory_bytes", device="cpu", kind="budget", worker="fleet-a") == 250 * 2**20
    assert metric(gateway, "cortex_model_resident", state="ready") >= 1


def test_a_pin_survives_a_worker_restart(
    fleet: dict[str, subprocess.Popen[bytes]], gateway: Gateway, nats_server: EmbeddedNats,
    fleet_catalogue: Path, logs_dir: Path,
) -> None:  # fmt: skip
    result = cortexctl(nats_server, "pin", "f8", "--worker", "fleet-b")
    assert result.returncode == 0, result.stdout + result.stderr
    wait_for(lambda: "fleet-b" in loaded_on(gateway, "f8"), timeout=20, what="f8 pinned on fleet-b")
    assert stop_process(fleet["fleet-b"]) == 0
    wait_for(lambda: "fleet-b" not in loaded_on(gateway, "f8"), timeout=15, what="fleet-b gone")
    fleet["fleet-b"] = start_fleet_worker(nats_server, fleet_catalogue, logs_dir / "fleet-b-restarted.log", "fleet-b")
    wait_for(lambda: "fleet-b" in loaded_on(gateway, "f8"), timeout=60, what="f8 back on restarted fleet-b")
    assert cortexctl(nats_server, "unpin", "f8").returncode == 0
