"""The batching engine in-process, on the tiny model through the real loader: batching changes nothing but speed."""

from __future__ import annotations

import gc
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from cortex.protocol import Chunk, GenerateRequest, Message, Sampling
from cortex.worker.catalogue import ModelSpec
from cortex.worker.engine import Engine, EngineLimits
from cortex.worker.loader import LoadedModel, load_model

PROMPTS = [
    "Hello café 🙂",
    "The quick brown fox",
    "x" * 50,
    "Paris is the capital",
    "a b c d e f g " * 10,
    "Cortex relays tokens",
    "1 2 3",
    "Ünïcödé têxt",
]
Outcome = tuple[str, str | None, int]
# bench/gpu.sh runs this file on CUDA. float32 everywhere: these tests check the batching logic,
# and 16-bit rounding differs between chunked and whole prefills (docs/architecture.md).
DEVICE = torch.device(os.environ.get("CORTEX_TEST_DEVICE", "cpu"))


def load_tiny(folder: Path) -> LoadedModel:
    return load_model(ModelSpec(id="tiny", path=str(folder), dtype="float32"), DEVICE)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> LoadedModel:
    return load_tiny(tiny_model_dir)


def make_engine(tiny: LoadedModel, **limits: int) -> Engine:
    engine = Engine(worker_id="test", limits=EngineLimits(**limits))
    engine.start()
    engine.add_model(tiny)
    return engine


@pytest.fixture
def engine(tiny: LoadedModel) -> Iterator[Engine]:
    engine = make_engine(tiny, prefix_cache_tokens=0)
    yield engine
    engine.stop()


def request(i: int, content: str, **sampling: object) -> GenerateRequest:
    sampling.setdefault("temperature", 0.0)
    sampling.setdefault("max_tokens", 20 + 5 * i)
    return GenerateRequest(
        request_id=f"r{i}", model="tiny", messages=[Message(role="user", content=content)],
        sampling=Sampling(**sampling),  # type: ignore[arg-type]
    )  # fmt: skip


class Collector:
    """Gathers the chunks of several requests; `wait` returns once all have finished."""

    def __init__(self, n: int) -> None:
        self.chunks: dict[str, list[Chunk]] = {}
        self._left = n
        self._lock = threading.Lock()
        self.done = threading.Event()

    def emit_for(self, request_id: str):  # type: ignore[no-untyped-def]
        self.chunks[request_id] = []

        def emit(chunk: Chunk) -> None:
            self.chunks[request_id].append(chunk)
            if chunk.final:
                with self._lock:
                    self._left -= 1
                    if self._left == 0:
                        self.done.set()

        return emit

    def outcome(self, request_id: str) -> Outcome:
        chunks = self.chunks[request_id]
        usage = chunks[-1].usage
        return "".join(c.text for c in chunks), chunks[-1].finish_reason, usage.completion_tokens if usage else -1


def run(engine: Engine, requests: list[GenerateRequest]) -> dict[str, Outcome]:
    collector = Collector(len(requests))
    for req in requests:
        engine.submit(req, collector.emit_for(req.request_id))
    assert collector.done.wait(120), "requests did not finish"
    return {req.request_id: collector.outcome(req.request_id) for req in requests}


@pytest.fixture(scope="module")
def one_at_a_time(tiny: LoadedModel) -> dict[str, Outcome]:
    engine = make_engine(tiny, prefix_cache_tokens=0)
    try:
        out: dict[str, Outcome] = {}
        for i, prompt in enumerate(PROMPTS):
            out.update(run(engine, [request(i, prompt)]))
        return out
    finally:
        engine.stop()


def test_batched_greedy_equals_unbatched(engine: Engine, one_at_a_time: dict[str, Outcome]) -> None:
    batched = run(engine, [request(i, p) for i, p in enumerate(PROMPTS)])
    assert batched == one_at_a_time
    assert {finish for _, finish, _ in batched.values()} == {"length"}
    assert [n for _, _, n in batched.values()] == [20 + 5 * i for i in range(len(PROMPTS))]


def test_chunked_prefill_equals_whole_prefill(tiny: LoadedModel, one_at_a_time: dict[str, Outcome]) -> None:
    engine = make_engine(tiny, prefill_chunk=7, prefix_cache_tokens=0)
    try:
        assert run(engine, [request(i, p) for i, p in enumerate(PROMPTS)]) == one_at_a_time
    finally:
        engine.stop()


def test_preemption_under_a_small_kv_budget_changes_nothing(
    tiny: LoadedModel, one_at_a_time: dict[str, Outcome]
) -> None:
    engine = make_engine(tiny, kv_budget_tokens=300, prefix_cache_tokens=0)
    try:
        assert run(engine, [request(i, p) for i, p in enumerate(PROMPTS)]) == one_at_a_time
        assert engine.preemptions > 0
    finally:
        engine.stop()


def test_prefix_reuse_reports_cached_tokens_and_same_output(tiny: LoadedModel) -> None:
    engine = make_engine(tiny)
    try:
        system = "You are a helpful assistant. " * 6
        first = engine_usage(engine, request(0, system, max_tokens=10))
        again = engine_usage(engine, request(1, system, max_tokens=10))
        assert first[1].cached_tokens == 0
        assert again[1].cached_tokens > 0
        assert again[1].cached_tokens < again[1].prompt_tokens
        assert first[0] == again[0]
    finally:
        engine.stop()


def engine_usage(engine: Engine, req: GenerateRequest):  # type: ignore[no-untyped-def]
    collector = Collector(1)
    engine.submit(req, collector.emit_for(req.request_id))
    assert collector.done.wait(60)
    chunks = collector.chunks[req.request_id]
    return "".join(c.text for c in chunks), chunks[-1].usage


def test_stop_strings_inside_a_batch(engine: Engine, one_at_a_time: dict[str, Outcome]) -> None:
    stops = {f"r{i}": one_at_a_time[f"r{i}"][0][5:8] for i in range(len(PROMPTS))}
    out = run(engine, [request(i, p, stop=[stops[f"r{i}"]]) for i, p in enumerate(PROMPTS)])
    for rid, (text, finish, _) in out.items():
        full = one_at_a_time[rid][0]
        assert text == full[: full.index(stops[rid])]
        assert finish == "stop"


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(engine: Engine) -> None:
    sampled = [request(i, p, temperature=0.8, top_p=0.95, seed=100 + i) for i, p in enumerate(PROMPTS)]
    alone = run(engine, sampled[:1])
    together = run(engine, sampled)
    assert together["r0"] == alone["r0"]


def test_cancellation_frees_the_slot_and_spares_the_others(engine: Engine) -> None:
    collector = Collector(2)
    long = [request(i, p, max_tokens=300) for i, p in enumerate(PROMPTS[:3])]
    started = threading.Event()

    def emit_victim(chunk: Chunk) -> None:
        victim_chunks.append(chunk)
        started.set()

    victim_chunks: list[Chunk] = []
    engine.submit(long[0], emit_victim)
    for req in long[1:]:
        engine.submit(req, collector.emit_for(req.request_id))
    assert started.wait(30)
    engine.cancel("r0")
    assert engine.call(engine.running).result(30) <= 2
    assert collector.done.wait(120)
    assert [collector.outcome(r.request_id)[2] for r in long[1:]] == [300, 300]
    assert not any(c.final for c in victim_chunks)
    assert engine.call(engine.running).result(30) == 0


def test_prompt_too_long_is_rejected_without_running(engine: Engine) -> None:
    out = Collector(1)
    engine.submit(request(0, "fox " * 5000), out.emit_for("r0"))
    assert out.done.wait(30)
    (chunk,) = out.chunks["r0"]
    assert chunk.error is not None and chunk.error.code == "context_length_exceeded"


def test_logits_processors_steer_one_row_and_spare_the_others(
    engine: Engine, tiny: LoadedModel, one_at_a_time: dict[str, Outcome]
) -> None:
    forced = tiny.tokenizer(" the", add_special_tokens=False)["input_ids"][0]
    piece = tiny.tokenizer.decode([forced])
    assert piece.strip()

    def only_fox(_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        masked = torch.full_like(logits, float("-inf"))
        masked[forced] = 0.0
        return masked

    collector = Collector(len(PROMPTS))
    for i, prompt in enumerate(PROMPTS):
        req = request(i, prompt)
        engine.submit(req, collector.emit_for(req.request_id), [only_fox] if i == 3 else None)
    assert collector.done.wait(120)
    for i in range(len(PROMPTS)):
        got = collector.outcome(f"r{i}")
        assert got == (piece * (20 + 5 * i), "length", 20 + 5 * i) if i == 3 else got == one_at_a_time[f"r{i}"]


def test_a_failing_logits_processor_fails_only_its_row(engine: Engine, one_at_a_time: dict[str, Outcome]) -> None:
    def broken(_ids: list[int], _logits: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("processor bug")

    collector = Collector(3)
    for i in range(3):
        req = request(i, PROMPTS[i])
        engine.submit(req, collector.emit_for(req.request_id), [broken] if i == 1 else None)
    assert collector.done.wait(60)
    failed = collector.chunks["r1"][-1]
    assert failed.error is not None and "processor bug" in failed.error.message
    assert collector.outcome("r0") == one_at_a_time["r0"] and collector.outcome("r2") == one_at_a_time["r2"]
    assert run(engine, [request(3, PROMPTS[3])])["r3"] == one_at_a_time["r3"]  # the engine lives on


@pytest.fixture
def owning_engine(tiny_model_dir: Path) -> Iterator[tuple[Engine, Callable[[], bool]]]:
    """An engine holding the only reference to its own copy of the tiny model, and a check that it is gone."""
    loaded = load_tiny(tiny_model_dir)
    weights = weakref.ref(loaded.model)
    engine = make_engine(loaded)
    del loaded

    def freed() -> bool:
        gc.collect()
        return weights() is None

    yield engine, freed
    engine.stop()


def test_a_removed_model_is_freed(owning_engine: tuple[Engine, Callable[[], bool]]) -> None:
    engine, freed = owning_engine
    collector = Collector(1)
    engine.submit(request(0, "Hello"), collector.emit_for("r0"))
    assert collector.done.wait(30)
    engine.remove_model("tiny").result(timeout=30)
    assert freed(), "something still holds the unloaded model"
    assert engine.remove_model("tiny").result(timeout=30) == 0  # already gone


@pytest.mark.parametrize("top_p", [1e-50, 1e-300, 1e-9])
def test_a_tiny_top_p_keeps_the_most_likely_token(top_p: float) -> None:
    from cortex.worker.sampling import sample

    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    picked = sample(logits, temperature=1.0, top_p=top_p, generator=torch.Generator().manual_seed(1))
    assert picked == int(torch.argmax(logits))


def test_a_prompt_no_context_can_hold_is_refused_by_its_length(engine: Engine, tiny: LoadedModel) -> None:
    assert tiny.max_token_chars > 0
    bound = 2 * tiny.context_length * tiny.max_token_chars
    collector = Collector(2)
    for req in (request(0, "x" * (bound + 1)), request(1, "x" * (bound // 4))):
        engine.submit(req, collector.emit_for(req.request_id))
    assert collector.done.wait(60)
    refused = [c.error for c in collector.chunks["r0"] if c.error]
    assert refused and refused[0].code == "context_length_exceeded" and "characters long" in refused[0].message
    tokenized = [c.error for c in collector.chunks["r1"] if c.error]  # under the bound: counted in tokens
    assert tokenized and " in the messages" in tokenized[0].message


def test_a_long_prompt_being_tokenized_does_not_hold_up_running_streams(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from tests.tiny_model import build_tiny_model

    loaded = load_tiny(build_tiny_model(tmp_path_factory.mktemp("long-context"), max_positions=65536))
    engine = make_engine(loaded, prefix_cache_tokens=0)
    streaming: list[Chunk] = []
    started = threading.Event()

    def emit_streaming(chunk: Chunk) -> None:
        streaming.append(chunk)
        started.set()

    try:
        engine.submit(request(0, PROMPTS[1], max_tokens=20000, ignore_eos=True), emit_streaming)
        assert started.wait(30)
        long = Collector(1)
        before = len(streaming)
        # ~900k characters: under what the context could hold by length, so it is tokenized (a second
        # or so), then refused for its ~200k tokens. The stream above must go on meanwhile.
        engine.submit(request(1, "The quick brown fox " * 45_000, max_tokens=4), long.emit_for("r1"))
        assert long.done.wait(120)
        steps_meanwhile = len(streaming) - before
        cancelled = Collector(1)
        engine.submit(request(2, "x " * 60_000), cancelled.emit_for("r2"))  # cancelled while still in admission
        engine.cancel("r2")
        engine.cancel("r0")
        assert engine.call(engine.running).result(30) == 0
    finally:
        engine.stop()
    error = long.chunks["r1"][-1].error
    assert error is not None and error.code == "context_length_exceeded"
    assert steps_meanwhile >= 5, f"the running stream made {steps_meanwhile} steps while a prompt was tokenized"
    assert not any(c.final for c in cancelled.chunks["r2"]) and not any(c.final for c in streaming)


def test_a_model_removed_while_its_request_is_admitted_ends_that_request_and_is_freed(
    owning_engine: tuple[Engine, Callable[[], bool]],
) -> None:
    engine, freed = owning_engine
    collector = Collector(2)
    engine.submit(request(0, "x " * 20_000), collector.emit_for("r0"))  # tokenizing it takes a moment
    removed = engine.remove_model("tiny")  # queued behind the request: it is admitted first, then removed
    engine.submit(request(1, "Hello"), collector.emit_for("r1"))  # after the removal: refused at once
    removed.result(timeout=60)
    assert collector.done.wait(60)
    assert freed(), "something still holds the removed model"
    for rid in ("r0", "r1"):
        last = collector.chunks[rid][-1]
        assert last.final and last.error is not None, (rid, last)
    assert collector.chunks["r1"][-1].error.code == "model_not_loaded"  # type: ignore[union-attr]
