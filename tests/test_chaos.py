"""Chaos: 100 streamed answers at 16 at a time through a worker SIGKILL, then through a nats-server restart.

Its own nats-server (a fixed port and store, so it can be restarted as the same
server), gateway and two workers serve one tiny model, every decoding step
slowed by `STEP_DELAY_S` so that answers are mid-stream when the trouble comes.
The requests mix OpenAI chat, OpenAI Responses and Anthropic Messages, all
streamed through the official SDKs (which retry 503s, as real clients do), plain
text or held to a JSON schema or a forced tool call. Each phase sends
`REQUESTS`; every one must complete without an SDK error, with the text (or
the call) of an uninterrupted answer to the same request from the session's
worker (same weights, float32, greedy) and its exact usage.

The moment of each fault is drawn from a seeded `random.Random`: the seed is
printed, and ``CORTEX_CHAOS_SEED=N`` replays it. Each phase prints its figures
(sent, completed, resumed, failed, time to notice, extra latency of a failover),
which ``docs/reliability.md`` quotes.
"""

from __future__ import annotations

import json
import os
import random
import re
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from cortex.broker.server import EmbeddedNats
from tests.conftest import (
    TINY_MODEL,
    Gateway,
    free_port,
    get_json,
    metric,
    start_gateway,
    start_worker,
    stop_process,
    wait_for,
)

MODEL = "tiny-chaos"
WORKERS = ("chaos-a", "chaos-b")
REQUESTS, CONCURRENCY = 100, 16
SLOTS = 12
"""Per worker: the two hold the 16 concurrent answers with room to take over some of the other's."""
STEP_DELAY_S = 0.1
"""Each answer (40 to 60 tokens) lasts about 5 s: a phase runs about 40 s, and a fault always finds answers mid-way."""
TEXT_TOKENS = 48
"""max_tokens of a plain answer: the tiny model never ends by itself at temperature 0, so it is exactly this long."""
ENDS_BY_ITSELF = 400
"""max_tokens of a constrained answer, which ends once its JSON document or its call is complete (40 to 70 tokens)."""
NOTE = {"type": "object", "properties": {"title": {"type": "string", "minLength": 50, "maxLength": 70}},
        "required": ["title"], "additionalProperties": False}  # fmt: skip
CALL = {"type": "object", "properties": {"topic": {"type": "string", "minLength": 5, "maxLength": 15}},
        "required": ["topic"], "additionalProperties": False}  # fmt: skip
PROMPTS = ("Tell me about the fox.", "Where is Paris?")
CHAT: dict[str, dict[str, Any]] = {
    "text": {"max_tokens": TEXT_TOKENS},
    "json": {"max_tokens": ENDS_BY_ITSELF,
             "response_format": {"type": "json_schema", "json_schema": {"name": "note", "schema": NOTE}}},
    "tool": {"max_tokens": ENDS_BY_ITSELF,
             "tools": [{"type": "function", "function": {"name": "file", "parameters": CALL}}],
             "tool_choice": {"type": "function", "function": {"name": "file"}}},
}  # fmt: skip
RESPONSES: dict[str, dict[str, Any]] = {
    "text": {"max_output_tokens": TEXT_TOKENS},
    "json": {"max_output_tokens": ENDS_BY_ITSELF,
             "text": {"format": {"type": "json_schema", "name": "note", "schema": NOTE, "strict": True}}},
    "tool": {"max_output_tokens": ENDS_BY_ITSELF, "tools": [{"type": "function", "name": "file", "parameters": CALL,
                                                             "strict": True}],
             "tool_choice": {"type": "function", "name": "file"}},
}  # fmt: skip
GREEDY = {"temperature": 0}
"""Anthropic's temperature goes in the body: the SDK no longer sends it (the gateway honours it)."""
ANTHROPIC: dict[str, dict[str, Any]] = {
    "text": {"max_tokens": TEXT_TOKENS, "extra_body": GREEDY},
    "json": {"max_tokens": ENDS_BY_ITSELF,
             "extra_body": GREEDY | {"output_config": {"format": {"type": "json_schema", "schema": NOTE}}}},
    "tool": {"max_tokens": ENDS_BY_ITSELF, "extra_body": GREEDY, "tools": [{"name": "file", "input_schema": CALL}],
             "tool_choice": {"type": "tool", "name": "file", "disable_parallel_tool_use": True}},
}  # fmt: skip
"""Each dialect's parameters for a plain answer, one held to a JSON schema, and one forced to call a tool."""
DIALECTS = ("chat", "responses", "anthropic")
KINDS = ("text", "json", "tool")
SDK_RETRIES = 8
"""As real clients would: a 503 while the broker is away (and 2 s after) is retried after its ``Retry-After``."""
CLIENT_TIMEOUT_S = 90.0
PHASE_TIMEOUT_S = 240.0
NOTICE_WITHIN_S = 10.0
PAUSE_S = 0.3
"""A pause between two pieces longer than this (three decoding steps) is the fault's."""
STARTUP_S = 120.0


@dataclass(frozen=True)
class Spec:
    """One kind of request: its dialect, plain text or constrained (a JSON schema, a forced call), its prompt."""

    dialect: str
    kind: str
    prompt: str

    def __str__(self) -> str:
        return f"{self.dialect}/{self.kind}/{PROMPTS.index(self.prompt)}"


SPECS = [Spec(d, k, p) for d in DIALECTS for k in KINDS for p in PROMPTS]


@dataclass
class Seen:
    """What one client saw of its answer: each piece with its arrival time, the end, the usage, or its error."""

    spec: Spec
    times: list[float] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    """Text, or a call's argument fragments."""
    calls: list[str] = field(default_factory=list)
    """The name of each tool call."""
    finish: str | None = None
    usage: tuple[int, int] | None = None
    """(prompt tokens, completion tokens), cached prompt tokens included."""
    error: BaseException | None = None
    request_id: str = ""
    """The gateway's id of the request (in the answer's id: ``chatcmpl-``, ``resp_``, ``msg_``)."""

    @property
    def answer(self) -> str:
        return "".join(self.pieces)

    def gaps(self) -> list[tuple[float, float]]:
        """(start, length) of each pause between two pieces."""
        return [(a, b - a) for a, b in zip(self.times, self.times[1:], strict=False)]


class Progress:
    """Pieces seen by every client of a phase so far, and answers ended, to time a fault by how far the phase has
    come."""

    def __init__(self) -> None:
        self.pieces = self.ended = 0
        self._changed = threading.Condition()

    def saw(self) -> None:
        with self._changed:
            self.pieces += 1
            self._changed.notify_all()

    def end(self, _: object) -> None:
        with self._changed:
            self.ended += 1
            self._changed.notify_all()

    def wait_for(self, pieces: int, timeout: float) -> bool:
        """Whether `pieces` came within `timeout`, before every answer ended."""
        with self._changed:
            self._changed.wait_for(lambda: self.pieces >= pieces or self.ended == REQUESTS, timeout)
            return self.pieces >= pieces


@dataclass
class Clients:
    openai: openai.OpenAI
    anthropic: anthropic.Anthropic

    @classmethod
    def of(cls, gateway: Gateway, retries: int) -> Clients:
        return cls(openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=retries,
                                 timeout=CLIENT_TIMEOUT_S, _strict_response_validation=True),
                   anthropic.Anthropic(base_url=gateway.root_url, api_key="x", max_retries=retries,
                                       timeout=CLIENT_TIMEOUT_S))  # fmt: skip


def ask(clients: Clients, model: str, spec: Spec, seen: Seen, saw: Callable[[], None] = lambda: None) -> None:
    """Stream `spec`'s request to `model`, filling in `seen`; the SDK's errors go into `seen.error`."""

    def piece(text: str) -> None:
        if text:
            seen.times.append(time.monotonic())
            seen.pieces.append(text)
            saw()

    try:
        {"chat": ask_chat, "responses": ask_responses, "anthropic": ask_anthropic}[spec.dialect](
            clients, model, spec, seen, piece
        )
    except Exception as exc:  # the test reports it
        seen.error = exc


def ask_chat(clients: Clients, model: str, spec: Spec, seen: Seen, piece: Callable[[str], None]) -> None:
    stream = clients.openai.chat.completions.create(
        model=model, messages=[{"role": "user", "content": spec.prompt}], temperature=0, stream=True,
        stream_options={"include_usage": True}, **CHAT[spec.kind],
    )  # fmt: skip
    for chunk in stream:
        seen.request_id = chunk.id.removeprefix("chatcmpl-")
        if chunk.usage is not None:
            seen.usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
        for choice in chunk.choices:
            seen.finish = choice.finish_reason or seen.finish
            for call in choice.delta.tool_calls or []:
                if call.function is not None and call.function.name:
                    seen.calls.append(call.function.name)
                piece((call.function.arguments or "") if call.function is not None else "")
            piece(choice.delta.content or "")


def ask_responses(clients: Clients, model: str, spec: Spec, seen: Seen, piece: Callable[[str], None]) -> None:
    stream = clients.openai.responses.create(model=model, input=spec.prompt, temperature=0, stream=True,
                                             **RESPONSES[spec.kind])  # fmt: skip
    for event in stream:
        if event.type == "response.created":
            seen.request_id = event.response.id.removeprefix("resp_")
        elif event.type in ("response.output_text.delta", "response.function_call_arguments.delta"):
            piece(event.delta)
        elif event.type == "response.output_item.added" and event.item.type == "function_call":
            seen.calls.append(event.item.name)
        elif event.type in ("response.completed", "response.incomplete"):
            response = event.response
            reason = response.incomplete_details.reason if response.incomplete_details else None
            seen.finish = f"{response.status}:{reason}" if reason else response.status
            assert response.usage is not None
            seen.usage = (response.usage.input_tokens, response.usage.output_tokens)
        elif event.type in ("error", "response.failed"):
            raise RuntimeError(f"the stream broke: {event.model_dump_json()}")


def ask_anthropic(clients: Clients, model: str, spec: Spec, seen: Seen, piece: Callable[[str], None]) -> None:
    prompt = 0
    stream = clients.anthropic.messages.create(
        model=model, messages=[{"role": "user", "content": spec.prompt}], stream=True, **ANTHROPIC[spec.kind]
    )
    for event in stream:
        if event.type == "message_start":
            seen.request_id = event.message.id.removeprefix("msg_")
            usage = event.message.usage
            prompt = usage.input_tokens + (usage.cache_read_input_tokens or 0)
        elif event.type == "content_block_start" and event.content_block.type == "tool_use":
            seen.calls.append(event.content_block.name)
        elif event.type == "content_block_delta":
            if event.delta.type == "text_delta":
                piece(event.delta.text)
            elif event.delta.type == "input_json_delta":
                piece(event.delta.partial_json)
        elif event.type == "message_delta":
            seen.finish = event.delta.stop_reason
            seen.usage = (prompt, event.usage.output_tokens)


def conforms(spec: Spec, answer: str) -> bool:
    """A constrained answer parses and fits its schema (plain text always conforms)."""
    if spec.kind == "text":
        return True
    value = json.loads(answer)
    key, low, high = ("title", 50, 70) if spec.kind == "json" else ("topic", 5, 15)
    return isinstance(value, dict) and set(value) == {key} and low <= len(value[key]) <= high


# -- the stack ---------------------------------------------------------------------------------------------------------


@dataclass
class Stack:
    """This module's own nats-server, gateway and two workers."""

    nats: EmbeddedNats
    catalogue: Path
    logs: Path
    gateway: Gateway | None = None
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    starts: int = 0

    def start_worker(self, worker_id: str) -> None:
        self.starts += 1
        self.workers[worker_id] = start_worker(
            self.nats.url, self.catalogue, self.logs / f"{worker_id}-{self.starts}.log", "--model", MODEL,
            "--device", "cpu", "--slots", str(SLOTS), "--worker-id", worker_id, "--step-delay", str(STEP_DELAY_S),
        )  # fmt: skip

    @property
    def gw(self) -> Gateway:
        assert self.gateway is not None
        return self.gateway

    def serving(self, worker_id: str) -> bool:
        try:
            entry = get_json(f"{self.gw.base_url}/models/{MODEL}")
        except OSError:
            return False
        assert isinstance(entry, dict)
        return bool(entry.get("ready")) and worker_id in entry.get("loaded_on", [])

    def wait_serving(self) -> None:
        for worker_id in WORKERS:
            wait_for(partial(self.serving, worker_id), timeout=STARTUP_S, what=f"{worker_id} serving {MODEL}",
                     proc=self.workers[worker_id])  # fmt: skip

    def failed_over(self) -> set[str]:
        """The ids of the requests the gateway's log says it failed over."""
        log = (self.logs / f"gateway-{self.gw.port}.log").read_text(errors="replace")
        return set(re.findall(r"failover \d+ of ([0-9a-f]+)", log))

    def stop(self) -> None:
        for proc in self.workers.values():
            proc.kill()
            proc.wait(timeout=30)
        if self.gateway is not None:
            stop_process(self.gateway.proc)
        self.nats.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, logs_dir: Path) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("chaos")
    catalogue = home / "models.toml"
    catalogue.write_text(f'[[models]]\nid = "{MODEL}"\npath = "{tiny_model_dir}"\ndtype = "float32"\nkeep_alive = -1\n')
    nats = EmbeddedNats(store_dir=home / "store", port=free_port(), log_file=logs_dir / "chaos-nats.log")
    stack = Stack(nats=nats, catalogue=catalogue, logs=logs_dir)
    try:
        nats.start()
        for worker_id in WORKERS:
            stack.start_worker(worker_id)
        stack.gateway = start_gateway(nats.url, logs_dir)
        stack.wait_serving()
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def references(gateway: Gateway) -> dict[Spec, Seen]:
    """Each kind of request answered once, uninterrupted, by the session's worker: same weights, float32, greedy."""
    clients = Clients.of(gateway, retries=0)
    out = {spec: Seen(spec) for spec in SPECS}
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda spec: ask(clients, TINY_MODEL, spec, out[spec]), SPECS))
    for spec, seen in out.items():
        assert seen.error is None, f"{spec}: {seen.error!r}"
        assert seen.usage is not None and conforms(spec, seen.answer), f"{spec}: {seen}"
        if spec.kind == "text":
            assert seen.usage[1] == TEXT_TOKENS, f"{spec}: {seen}"
        else:
            assert seen.usage[1] < ENDS_BY_ITSELF and (spec.kind == "json") != bool(seen.calls), f"{spec}: {seen}"
    return out


@pytest.fixture(scope="module")
def seed() -> int:
    value = int(os.environ.get("CORTEX_CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    print(f"\nchaos seed {value} (replay: CORTEX_CHAOS_SEED={value})")
    return value


# -- a phase -----------------------------------------------------------------------------------------------------------


@dataclass
class Phase:
    """One phase's answers and figures."""

    name: str
    seen: list[Seen]
    references: dict[Spec, Seen]
    fault_at: float
    """When (monotonic) the fault came."""
    resumed: int
    """Failovers the gateway counted."""
    failed_over: set[str]
    """The ids of the requests the gateway's log says it failed over."""
    figures: dict[str, Any]

    def wrong(self) -> list[str]:
        """Every answer that failed or differs from its uninterrupted reference, and how."""
        out = []
        for i, seen in enumerate(self.seen):
            ref = self.references[seen.spec]
            if seen.error is not None:
                last = f"{seen.times[-1] - self.fault_at:+.1f} s from the fault" if seen.times else "none"
                out.append(f"#{i} {seen.spec}: {type(seen.error).__name__}: {seen.error} (after {len(seen.pieces)} of "
                           f"{len(ref.pieces)} pieces; the last one {last})")  # fmt: skip
            elif (seen.answer, seen.calls, seen.finish, seen.usage) != (ref.answer, ref.calls, ref.finish, ref.usage):
                out.append(f"#{i} {seen.spec}: got {seen.answer!r} {seen.calls} {seen.finish} {seen.usage}, "
                           f"uninterrupted {ref.answer!r} {ref.calls} {ref.finish} {ref.usage}")  # fmt: skip
            elif not conforms(seen.spec, seen.answer):
                out.append(f"#{i} {seen.spec}: {seen.answer!r} does not fit its schema")
        return out

    def paused(self) -> list[float]:
        """Per answer that paused at the fault (over `PAUSE_S`, in its first second): seconds from the fault to the
        piece that ended the pause. A broker that is stopped still passes messages for a few milliseconds."""
        out = []
        for seen in self.seen:
            pauses = [(start, length) for start, length in seen.gaps()
                      if start < self.fault_at + 1.0 and start + length > self.fault_at]  # fmt: skip
            start, length = max(pauses, key=lambda pause: pause[1], default=(0.0, 0.0))
            if length > PAUSE_S:
                out.append(start + length - self.fault_at)
        return out

    def report(self) -> str:
        """The phase's figures, as one line of JSON."""
        wrong = self.wrong()
        gaps = [length for seen in self.seen for _, length in seen.gaps()]
        median = statistics.median(gaps) if gaps else 0.0
        # A resumed answer's longest pause is its failover's (one that had shown nothing yet, such as a tool call
        # whose opening markup is held back, has no pause to measure).
        resumed = [s for s in self.seen if s.request_id in self.failed_over]
        failovers = [max(length for _, length in s.gaps()) for s in resumed
                     if s.times and s.times[0] < self.fault_at < s.times[-1]]  # fmt: skip
        waits = self.paused()

        def spread(values: list[float], less: float = 0.0) -> list[float]:
            """min, median and max of `values` less `less`, in seconds."""
            if not values:
                return []
            return [round(v - less, 2) for v in (min(values), statistics.median(values), max(values))]

        self.figures |= {
            "sent": len(self.seen), "completed": len(self.seen) - len(wrong), "resumed": self.resumed,
            "failed": len(wrong), "resumed_seen_in_log": len(self.failed_over & {s.request_id for s in self.seen}),
            "paused_at_fault": len(waits), "fault_to_next_piece_s": spread(waits), "median_gap_s": round(median, 3),
            "failover_gap_s": spread(failovers), "extra_latency_s": spread(failovers, median),
        }  # fmt: skip
        if "noticed_s" in self.figures:
            self.figures["noticed_to_next_piece_s"] = spread(waits, self.figures["noticed_s"])
        return f"chaos {self.name}: " + json.dumps(self.figures)


def run_phase(
    name: str, stack: Stack, references: dict[Spec, Seen], seed: int, fault: Callable[[random.Random], dict[str, Any]]
) -> Phase:
    """Send `REQUESTS` at `CONCURRENCY`; once a share of their pieces drawn from `seed` has come, run `fault`."""
    rng = random.Random(seed)
    plan = [SPECS[i % len(SPECS)] for i in range(REQUESTS)]
    rng.shuffle(plan)
    expected = sum(len(references[spec].pieces) for spec in plan)
    at_piece = int(expected * rng.uniform(0.15, 0.45))
    clients = Clients.of(stack.gw, retries=SDK_RETRIES)
    progress = Progress()
    seen = [Seen(spec) for spec in plan]
    before = metric(stack.gw, "cortex_failovers_total", model=MODEL)
    started = time.monotonic()
    pool = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix=f"chaos-{name}")
    try:
        futures = [pool.submit(ask, clients, MODEL, spec, s, progress.saw) for spec, s in zip(plan, seen, strict=True)]
        for future in futures:
            future.add_done_callback(progress.end)
        if not progress.wait_for(at_piece, timeout=PHASE_TIMEOUT_S):
            failed = [f"{s.spec}: {s.error!r}" for s in seen if s.error is not None]
            raise AssertionError(f"only {progress.pieces} of {expected} pieces came: {failed[:5]}")
        fault_at = time.monotonic()
        figures = {"seed": seed, "fault_after_s": round(fault_at - started, 1), **fault(rng)}
        _, hanging = wait(futures, timeout=PHASE_TIMEOUT_S - (time.monotonic() - started))
        assert not hanging, f"{len(hanging)} answers still running after {PHASE_TIMEOUT_S:.0f} s"
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    figures["elapsed_s"] = round(time.monotonic() - started, 1)
    resumed = int(metric(stack.gw, "cortex_failovers_total", model=MODEL) - before)
    return Phase(name=name, seen=seen, references=references, fault_at=fault_at, resumed=resumed,
                 failed_over=stack.failed_over(), figures=figures)  # fmt: skip


def check(phase: Phase, stack: Stack) -> None:
    print("\n" + phase.report())
    wrong = phase.wrong()
    assert not wrong, (f"{len(wrong)} of {REQUESTS} answers failed or differ ({phase.figures}); logs in {stack.logs}:\n"
                       + "\n".join(wrong[:12]))  # fmt: skip


# -- the phases --------------------------------------------------------------------------------------------------------


def test_a_worker_killed_mid_stream_and_restarted(stack: Stack, references: dict[Spec, Seen], seed: int) -> None:
    def kill_and_restart(rng: random.Random) -> dict[str, Any]:
        victim = rng.choice(WORKERS)
        wait_for(lambda: metric(stack.gw, "cortex_model_in_flight", model=MODEL, worker=victim) >= 1, timeout=10,
                 what=f"answers running on {victim}")  # fmt: skip
        killed_at = time.monotonic()
        stack.workers[victim].kill()  # SIGKILL: no goodbye, its advert and heartbeat stay until they expire
        stack.workers[victim].wait(timeout=30)
        deadline = killed_at + NOTICE_WITHIN_S
        while stack.serving(victim):  # polled often: the time to notice is a figure
            assert time.monotonic() < deadline, f"the gateway still lists {victim} {NOTICE_WITHIN_S:.0f} s after"
            time.sleep(0.02)
        noticed = time.monotonic() - killed_at
        # The same worker id, once the gateway saw it go (the time to notice is measured above); a restart sooner is
        # test_failover's same-id case.
        stack.start_worker(victim)
        wait_for(lambda: stack.serving(victim), timeout=STARTUP_S, what=f"{victim} back", proc=stack.workers[victim])
        return {"killed": victim, "noticed_s": round(noticed, 2), "back_s": round(time.monotonic() - killed_at, 1)}

    phase = run_phase("worker SIGKILL", stack, references, seed, kill_and_restart)
    stack.wait_serving()
    check(phase, stack)
    assert phase.resumed >= 1, f"the kill came while answers ran on the victim, yet none failed over: {phase.figures}"


def test_a_nats_server_restart_mid_stream(stack: Stack, references: dict[Spec, Seen], seed: int) -> None:
    stack.wait_serving()

    def restart(_: random.Random) -> dict[str, Any]:
        at = time.monotonic()
        stack.nats.stop()
        stack.nats.start()  # the same port and store: streams, consumers and buckets come back from the disk
        outage = time.monotonic() - at

        def healthy() -> bool:
            try:
                return get_json(f"{stack.gw.root_url}/health") is not None and all(map(stack.serving, WORKERS))
            except OSError:
                return False

        wait_for(healthy, timeout=30, what="the gateway connected again and both workers listed")
        return {"outage_s": round(outage, 2), "healthy_again_s": round(time.monotonic() - at, 2)}

    phase = run_phase("nats-server restart", stack, references, seed + 1, restart)
    check(phase, stack)
