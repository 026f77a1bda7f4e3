"""Mid-stream failover end to end: two real workers serve one model, one is SIGKILLed mid-answer.

Every answer held on the killed worker goes on on the other, as one stream
through the official SDKs: the text of an uninterrupted run, nothing repeated or
lost, with stop strings, logprobs and a tool call cut in its arguments; the
failover limit ends an answer with a clear error; a client that left is never
resumed; a worker restarted under the same id at once fails its old answers over as soon as its new process
beats. The replay itself is tested in-process in ``tests/test_resume.py``.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from cortex.broker.bus import Bus
from cortex.broker.provision import ACK_WAIT_S
from cortex.broker.server import EmbeddedNats
from cortex.protocol import codec, names
from cortex.protocol.heartbeat import Heartbeat
from tests.conftest import (
    TINY_MODEL,
    Gateway,
    get_json,
    metric,
    start_gateway,
    start_worker,
    stop_process,
    wait_for,
)

MODEL = "tiny-failover"
ASK = [{"role": "user", "content": "go on"}]
LENGTH = 200
"""Tokens of each answer: the tiny model never ends by itself, so every answer is exactly this long."""
SLOW_S, SLOWER_S = 0.1, 0.05
"""Decoding step delays of the first worker (holding every answer mid-way while the second starts) and the second."""
LONG_STRING = {"type": "object", "properties": {"text": {"type": "string", "minLength": 150, "maxLength": 200}},
               "required": ["text"], "additionalProperties": False}  # fmt: skip
NOTE_TOOL = [{"type": "function", "function": {"name": "note", "parameters": LONG_STRING}}]
FORCE_NOTE = {"type": "function", "function": {"name": "note"}}
ROUND_TIMEOUT_S = 120.0


@dataclass
class Workers:
    """The failover workers of this module, by worker id."""

    nats_url: str
    catalogue: Path
    logs: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, worker_id: str, step_delay: float) -> None:
        self.procs[worker_id] = start_worker(
            self.nats_url, self.catalogue, self.log(worker_id), "--model", MODEL, "--device", "cpu", "--slots", "8",
            "--worker-id", worker_id, "--step-delay", str(step_delay),
        )  # fmt: skip

    def log(self, worker_id: str) -> Path:
        return self.logs / f"{worker_id}.log"

    def kill(self, worker_id: str) -> float:
        """SIGKILL: no goodbye, its advert stays until it expires. Returns when (monotonic)."""
        at = time.monotonic()
        self.procs[worker_id].kill()
        self.procs[worker_id].wait(timeout=30)
        return at


def serving(gateway: Gateway, worker_id: str, model: str = MODEL) -> bool:
    try:
        entry = get_json(f"{gateway.base_url}/models/{model}")
    except OSError:
        return False
    assert isinstance(entry, dict)
    return entry.get("ready", False) and worker_id in entry.get("loaded_on", [])


@dataclass
class Probe:
    """What one client saw of its answer, with arrival times, filled in by a thread."""

    name: str
    min_pieces: int = 3
    pieces: list[tuple[float, str]] = field(default_factory=list)
    """(monotonic time, content or tool-call arguments) of each delta with any."""
    logprobs: list[tuple[str, float]] = field(default_factory=list)
    finish: str | None = None
    usage: int = 0
    calls: dict[int, list[str]] = field(default_factory=dict)
    result: Any = None
    error: BaseException | None = None
    started: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)

    def saw(self, piece: str) -> None:
        self.pieces.append((time.monotonic(), piece))
        if len(self.pieces) >= self.min_pieces:
            self.started.set()

    @property
    def text(self) -> str:
        return "".join(p for _, p in self.pieces)

    def pause_after(self, moment: float) -> float:
        """Seconds from `moment` to the first piece after the longest pause around it (the failover's)."""
        before = [t for t, _ in self.pieces if t <= moment][-1:]
        times = before + [t for t, _ in self.pieces if t > moment]
        resumed = max(range(1, len(times)), key=lambda i: times[i] - times[i - 1])
        return times[resumed] - moment

    def run(self, work: Callable[[Probe], None]) -> threading.Thread:
        def target() -> None:
            try:
                work(self)
            except BaseException as exc:  # the test asserts on it
                self.error = exc
            finally:
                self.started.set()
                self.done.set()

        thread = threading.Thread(target=target, name=self.name, daemon=True)
        thread.start()
        return thread


def openai_sdk(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0, timeout=ROUND_TIMEOUT_S,
                         _strict_response_validation=True)  # fmt: skip


def chat_stream(client: openai.OpenAI, model: str = MODEL, **extra: Any) -> Callable[[Probe], None]:
    params = {"max_tokens": LENGTH, "stream_options": {"include_usage": True}} | extra

    def work(probe: Probe) -> None:
        stream = client.chat.completions.create(model=model, messages=ASK, temperature=0, stream=True, **params)
        for chunk in stream:
            if chunk.usage is not None:
                probe.usage = chunk.usage.completion_tokens
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            probe.finish = choice.finish_reason or probe.finish
            if choice.logprobs is not None and choice.logprobs.content:
                probe.logprobs += [(lp.token, lp.logprob) for lp in choice.logprobs.content]
            for call in choice.delta.tool_calls or []:
                arguments = call.function.arguments if call.function is not None else None
                probe.calls.setdefault(call.index, []).append(arguments or "")
                if arguments:
                    probe.saw(arguments)
            if choice.delta.content:
                probe.saw(choice.delta.content)

    return work


def chat_whole(client: openai.OpenAI) -> Callable[[Probe], None]:
    def work(probe: Probe) -> None:
        probe.started.set()  # nothing to read before the end: the worker's in-flight count says it runs
        probe.result = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=LENGTH)  # type: ignore[call-overload]

    return work


def anthropic_stream(claude: anthropic.Anthropic) -> Callable[[Probe], None]:
    def work(probe: Probe) -> None:
        greedy = {"temperature": 0}  # the SDK dropped the parameter; the gateway honours it
        with claude.messages.stream(model=MODEL, messages=ASK, max_tokens=LENGTH, extra_body=greedy) as stream:  # type: ignore[arg-type]
            for text in stream.text_stream:
                probe.saw(text)
            probe.result = stream.get_final_message()

    return work


@dataclass
class Round:
    """Every scenario of one kill, and what was true when it came."""

    probes: dict[str, Probe]
    killed_at: float
    references: dict[str, Any]
    stop: str
    failovers: float
    """The failover counter's increase on the main gateway."""
    cancelled_id: str
    strict: Probe
    resumes_logged: list[str]


@pytest.fixture(scope="module")
def failover_round(
    nats_server: EmbeddedNats,
    gateway: Gateway,
    logs_dir: Path,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Round]:
    catalogue = tmp_path_factory.mktemp("failover") / "models.toml"
    catalogue.write_text(f'[[models]]\nid = "{MODEL}"\npath = "{tiny_model_dir}"\ndtype = "float32"\nkeep_alive = -1\n')
    workers = Workers(nats_server.url, catalogue, logs_dir)
    main = start_gateway(nats_server.url, logs_dir)
    strict = start_gateway(nats_server.url, logs_dir, "--failover-attempts", "1")
    try:
        yield play_round(workers, main, strict)
    finally:
        for proc in workers.procs.values():
            proc.kill()
            proc.wait(timeout=30)
        stop_process(main.proc)
        stop_process(strict.proc)


def play_round(workers: Workers, main: Gateway, strict: Gateway) -> Round:
    client, claude = openai_sdk(main), anthropic.Anthropic(base_url=main.root_url, api_key="x", max_retries=0,
                                                            timeout=ROUND_TIMEOUT_S)  # fmt: skip
    # Uninterrupted answers to the same requests, from the session's worker: same weights, float32.
    same: dict[str, Any] = {"model": TINY_MODEL, "messages": ASK, "temperature": 0, "max_tokens": LENGTH}
    references = {
        "text": client.chat.completions.create(**same).choices[0].message.content,
        "logprobs": client.chat.completions.create(**same, logprobs=True).choices[0].logprobs.content,
        "call": client.chat.completions.create(**same | {"max_tokens": 2 * LENGTH}, tools=NOTE_TOOL,
                                               tool_choice=FORCE_NOTE).choices[0].message.tool_calls[0],
        "anthropic": claude.messages.create(model=TINY_MODEL, messages=ASK, max_tokens=LENGTH,
                                            extra_body={"temperature": 0}).content[0].text,
    }  # fmt: skip
    text = references["text"]
    stop = next(text[i : i + 4] for i in range(len(text) - 8, 0, -1) if text.index(text[i : i + 4]) == i)
    assert text.index(stop) > len(text) // 2, "a stop string late enough to come after the kill"

    workers.start("fo-a", SLOW_S)
    wait_for(lambda: serving(main, "fo-a") and serving(strict, "fo-a"), timeout=120, what="fo-a ready",
             proc=workers.procs["fo-a"])  # fmt: skip
    before = metric(main, "cortex_failovers_total", model=MODEL)
    probes = {
        "whole": Probe("whole"),
        "chat": Probe("chat"),
        "anthropic": Probe("anthropic"),
        "stop": Probe("stop"),
        "logprobs": Probe("logprobs"),
        "tool": Probe("tool"),
    }
    work = {
        "whole": chat_whole(client),
        "chat": chat_stream(client),
        "anthropic": anthropic_stream(claude),
        "stop": chat_stream(client, stop=[stop]),
        "logprobs": chat_stream(client, logprobs=True, top_logprobs=1),
        "tool": chat_stream(client, max_tokens=2 * LENGTH, tools=NOTE_TOOL, tool_choice=FORCE_NOTE),
    }
    threads = [probe.run(work[name]) for name, probe in probes.items()]
    strict_probe = Probe("strict")
    strict_thread = strict_probe.run(chat_stream(openai_sdk(strict), max_tokens=8 * LENGTH))
    body = {"model": MODEL, "messages": ASK, "max_tokens": LENGTH, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{main.base_url}/chat/completions", json=body, timeout=60) as leaving:
        lines = leaving.iter_lines()
        first = next(line for line in lines if '"content":"' in line)
        cancelled_id = re.search(r'"id":"chatcmpl-([0-9a-f]+)"', first).group(1)  # type: ignore[union-attr]
        for probe in [*probes.values(), strict_probe]:
            assert probe.started.wait(60), f"{probe.name} never started"
        running = len(probes) + 2
        wait_for(lambda: metric(main, "cortex_model_in_flight", model=MODEL, worker="fo-a") >= running,
                 timeout=30, what="every answer running on fo-a")  # fmt: skip
        workers.start("fo-b", SLOWER_S)  # it pulls nothing yet: every request is on fo-a
        wait_for(lambda: serving(main, "fo-b") and serving(strict, "fo-b"), timeout=120, what="fo-b ready",
                 proc=workers.procs["fo-b"])  # fmt: skip
        for probe in [*probes.values(), strict_probe]:
            assert not probe.done.is_set(), f"{probe.name} ended before the kill: {probe.error!r}"
        cut = "".join(probes["tool"].calls.get(0, []))
        assert '"text": "' in cut and not cut.endswith("}"), f"the call's arguments are under way: {cut!r}"
        killed_at = workers.kill("fo-a")
    # The client above hung up just after the kill, before the gateway could notice it.
    for thread in threads:
        thread.join(ROUND_TIMEOUT_S)
        assert not thread.is_alive(), f"{thread.name} hangs"
    failovers = metric(main, "cortex_failovers_total", model=MODEL) - before
    resumed = len(probes) + 1  # the strict gateway's answer is on fo-b too
    wait_for(lambda: len(resumes(workers.log("fo-b"))) >= resumed, timeout=30, what="every answer resumed on fo-b")
    workers.kill("fo-b")  # the strict gateway's answer, continued there once already, has nowhere left to go
    strict_thread.join(ROUND_TIMEOUT_S)
    assert not strict_thread.is_alive(), "the strict gateway's answer hangs"
    logged = resumes(workers.log("fo-b"))
    return Round(probes=probes, killed_at=killed_at, references=references, stop=stop, failovers=failovers,
                 cancelled_id=cancelled_id, strict=strict_probe, resumes_logged=logged)  # fmt: skip


def resumes(log: Path) -> list[str]:
    """The worker's log lines about requests it resumed (failovers it took)."""
    return [line for line in log.read_text().splitlines() if "resuming " in line]


def finished(round_: Round, name: str) -> Probe:
    probe = round_.probes[name]
    if probe.error is not None:
        raise probe.error
    return probe


def test_a_streamed_answer_goes_on_as_one_stream(failover_round: Round) -> None:
    chat = finished(failover_round, "chat")
    assert chat.text == failover_round.references["text"]
    assert chat.usage == LENGTH and chat.finish == "length"
    print(f"\nkill to next token at the client: {chat.pause_after(failover_round.killed_at):.2f} s")


def test_a_whole_answer_is_the_uninterrupted_one(failover_round: Round) -> None:
    reply = finished(failover_round, "whole").result
    assert reply.choices[0].message.content == failover_round.references["text"]
    assert reply.usage.completion_tokens == LENGTH and reply.choices[0].finish_reason == "length"


def test_an_anthropic_stream_goes_on(failover_round: Round) -> None:
    claude = finished(failover_round, "anthropic")
    assert claude.text == failover_round.references["anthropic"]
    assert claude.result.usage.output_tokens == LENGTH and claude.result.stop_reason == "max_tokens"


def test_a_stop_string_after_the_failover_ends_the_answer(failover_round: Round) -> None:
    stopped = finished(failover_round, "stop")
    text = failover_round.references["text"]
    assert stopped.text == text[: text.index(failover_round.stop)]
    assert stopped.finish == "stop"


def test_logprobs_one_entry_per_token_none_repeated(failover_round: Round) -> None:
    got = finished(failover_round, "logprobs").logprobs
    reference = [(lp.token, lp.logprob) for lp in failover_round.references["logprobs"]]
    assert len(got) == LENGTH
    assert [token for token, _ in got] == [token for token, _ in reference]
    assert [value for _, value in got] == pytest.approx([value for _, value in reference], abs=1e-3)


def test_a_tool_call_cut_mid_arguments_is_completed_and_valid(failover_round: Round) -> None:
    tool = finished(failover_round, "tool")
    arguments = "".join(tool.calls[0])
    assert arguments == failover_round.references["call"].function.arguments
    assert 150 <= len(json.loads(arguments)["text"]) <= 200
    assert tool.finish == "stop"  # OpenAI ends a call forced by name so


def test_failovers_are_counted_and_a_cancelled_request_is_never_resumed(failover_round: Round) -> None:
    assert failover_round.failovers == len(failover_round.probes)
    # Each answer that failed over was resumed once on fo-b (the strict gateway's too); the one whose client
    # left (just after the kill, before the gateway could notice it) was not.
    assert len(failover_round.resumes_logged) == len(failover_round.probes) + 1
    assert not [line for line in failover_round.resumes_logged if failover_round.cancelled_id in line]


def test_the_failover_limit_ends_the_stream_with_a_clear_error(failover_round: Round) -> None:
    strict = failover_round.strict
    assert isinstance(strict.error, openai.APIError), strict.error
    assert "fo-b stopped answering" in strict.error.message and "continued elsewhere 1 times" in strict.error.message
    assert strict.text and strict.finish is None  # it had been answering: the error came inside the stream


# -- a worker restarted under the same id --------------------------------------------

RESTART_MODEL = "tiny-restart"


class SameIdRestart:
    """Plays a worker process that came back under the killed one's id at once: its heartbeat and advert go on.

    A real broker client writing what the new process would (a heartbeat every beat interval naming another
    instance, the advert rewritten): the old process's answers must fail over now, not when JetStream
    redelivers their requests (`ACK_WAIT_S`).
    """

    def __init__(self, nats_url: str, worker_id: str) -> None:
        self.nats_url, self.worker_id = nats_url, worker_id
        self.beating = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="same-id", daemon=True)

    def __enter__(self) -> SameIdRestart:
        self._thread.start()
        assert self.beating.wait(30), "the stand-in never beat"
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)

    async def _run(self) -> None:
        bus = await Bus.open(self.nats_url, name="same-id restart")
        try:
            advert = (await bus.read_fleet())[names.worker_key(self.worker_id)]
            beat = codec.encode(Heartbeat(worker_id=self.worker_id, instance="restarted"))
            while not self._stop.is_set():
                await bus.put_heartbeat(names.alive_key(self.worker_id), beat)
                await bus.put_advert(names.worker_key(self.worker_id), advert)
                self.beating.set()
                await asyncio.sleep(names.HEARTBEAT_INTERVAL_S)
        finally:
            await bus.close()


def test_a_worker_restarted_under_the_same_id_fails_its_old_answers_over_at_once(
    nats_server: EmbeddedNats, gateway: Gateway, logs_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    catalogue = tmp_path / "models.toml"
    catalogue.write_text(f'[[models]]\nid = "{RESTART_MODEL}"\npath = "{tiny_model_dir}"\ndtype = "float32"\n')
    client = openai_sdk(gateway)
    reference = client.chat.completions.create(model=TINY_MODEL, messages=ASK, temperature=0, max_tokens=LENGTH)
    procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(worker_id: str, step_delay: float) -> None:
        procs[worker_id] = start_worker(
            nats_server.url, catalogue, logs_dir / f"{worker_id}.log", "--model", RESTART_MODEL, "--device", "cpu",
            "--worker-id", worker_id, "--step-delay", str(step_delay),
        )  # fmt: skip
        wait_for(lambda: serving(gateway, worker_id, RESTART_MODEL), timeout=120, what=f"{worker_id} ready",
                 proc=procs[worker_id])  # fmt: skip

    try:
        start("same-id", SLOW_S)
        before = metric(gateway, "cortex_failovers_total", model=RESTART_MODEL)
        probe = Probe("restart")
        thread = probe.run(chat_stream(client, RESTART_MODEL))
        assert probe.started.wait(60), probe.error
        start("other", 0.0)  # it pulls nothing: the one request is on same-id
        assert not probe.done.is_set(), f"the answer ended before the kill: {probe.error!r}"
        procs["same-id"].kill()
        procs["same-id"].wait(timeout=30)
        with SameIdRestart(nats_server.url, "same-id"):
            killed_at = time.monotonic()  # the heartbeat never lapsed: only its instance tells
            thread.join(ROUND_TIMEOUT_S)
        assert not thread.is_alive(), "the answer hangs"
        if probe.error is not None:
            raise probe.error
        assert probe.text == reference.choices[0].message.content and probe.usage == LENGTH
        pause = probe.pause_after(killed_at)
        print(f"\nsame-id restart to next token at the client: {pause:.2f} s")
        assert pause < ACK_WAIT_S / 2, "failed over by JetStream's redelivery, not by seeing the restart"
        assert metric(gateway, "cortex_failovers_total", model=RESTART_MODEL) - before == 1
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait(timeout=30)
