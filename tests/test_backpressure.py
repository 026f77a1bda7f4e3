"""Backpressure that clients understand: full queues and missing capacity say when to come back.

A model's queue is filled for real: its only worker (``--slots 1``) is kept busy
by one endless request, so it takes nothing more, and messages are published
straight to the model's subject until JetStream refuses them (10,000 per model).
Then every request for it is a 429 on the OpenAI routes and a 529 on the
Anthropic routes, both with ``Retry-After``; the official SDKs, allowed to
retry, wait that long and succeed once the queue has room again.
"""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anthropic
import httpx
import nats
import openai
import pytest

from cortex.broker import errors as broker_errors
from cortex.broker.bus import Bus
from cortex.broker.server import EmbeddedNats
from cortex.gateway import anthropic_errors, openai_errors
from cortex.gateway.errors import ApiError, DeadlineExceeded, InvalidRequest, NoCapacity, QueueFull, UpstreamError
from cortex.protocol import Chunk, GenerateRequest, Message, Sampling, codec, names
from tests.conftest import (
    Gateway,
    metric,
    on_bus,
    ready_models,
    start_gateway,
    start_worker,
    stop_process,
    wait_for,
)

BACKLOG = "tiny-backlog"
"""Served by one synthetic worker with one slot: the model whose queue the tests fill."""
SLOW = "tiny-slow"
"""Served by one real worker with one slot and a pause after every step."""
HUGE = "tiny-huge"
"""In the slow worker's catalogue, larger than its memory budget: a 503 at once."""
STEP_DELAY_S = 0.05
PROMPT = [{"role": "user", "content": "go on"}]
TEST_GATEWAY = "gw-backpressure-test"
"""The reply subjects of requests these tests publish themselves."""
RETRY_LOG = re.compile(r"Retrying request.* in (\d+(?:\.\d+)?) seconds")


def openai_client(gateway: Gateway, retries: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=retries, timeout=60,
                         _strict_response_validation=True)  # fmt: skip


def anthropic_client(gateway: Gateway, retries: int) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.root_url, api_key="x", max_retries=retries, timeout=60,
                               _strict_response_validation=True)  # fmt: skip


def retry_waits(caplog: pytest.LogCaptureFixture) -> list[float]:
    """The waits the SDKs logged before each retry."""
    return [float(m.group(1)) for r in caplog.records if (m := RETRY_LOG.search(r.getMessage()))]


def write_catalogue(folder: Path, entries: list[str]) -> Path:
    path = folder / "models.toml"
    path.write_text("\n".join(f"[[models]]\n{entry}\n" for entry in entries))
    return path


@pytest.mark.parametrize(
    ("error", "openai_status", "anthropic_status", "anthropic_type", "retry_after"),
    [
        (QueueFull("full"), 429, 529, "overloaded_error", "1"),
        (NoCapacity("nobody"), 503, 503, "overloaded_error", "1"),
        (NoCapacity("away", code="broker_unavailable"), 503, 503, "overloaded_error", "1"),
        (DeadlineExceeded("late"), 504, 504, "timeout_error", None),
        (UpstreamError("broke"), 502, 502, "api_error", None),
        (InvalidRequest("bad"), 400, 400, "invalid_request_error", None),
    ],
)
def test_only_errors_that_pass_by_themselves_say_when_to_retry(
    error: ApiError, openai_status: int, anthropic_status: int, anthropic_type: str, retry_after: str | None
) -> None:
    response = openai_errors.error_response(error)
    assert response.status_code == openai_status
    assert response.headers.get("Retry-After") == retry_after
    response = anthropic_errors.error_response(error)
    assert response.status_code == anthropic_status
    assert response.headers.get("Retry-After") == retry_after
    # Inside a stream, where no status or header can go, the same type and code.
    assert anthropic_errors.error_body(error)["error"]["type"] == anthropic_type
    assert openai_errors.error_body(error)["error"] == {
        "message": error.message, "type": error.type, "param": None, "code": error.code,
    }  # fmt: skip


@pytest.fixture(scope="module")
def backlog_worker(
    nats_server: EmbeddedNats,
    gateway: Gateway,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    logs_dir: Path,
) -> Iterator[None]:
    catalogue = write_catalogue(tmp_path_factory.mktemp("backlog"),
                                [f'id = "{BACKLOG}"\npath = "{tiny_model_dir}"\nkeep_alive = -1'])  # fmt: skip
    proc = start_worker(nats_server.url, catalogue, logs_dir / "backlog-worker.log", "--model", BACKLOG,
                        "--synthetic-engine", "0.01", "--slots", "1", "--worker-id", "backlog")  # fmt: skip
    wait_for(lambda: BACKLOG in ready_models(gateway.base_url), timeout=60, what=BACKLOG, proc=proc)
    yield
    stop_process(proc)


@pytest.fixture(scope="module")
def slow_worker(
    nats_server: EmbeddedNats,
    gateway: Gateway,
    tiny_model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    logs_dir: Path,
) -> Iterator[subprocess.Popen[bytes]]:
    catalogue = write_catalogue(tmp_path_factory.mktemp("slow"), [
        f'id = "{SLOW}"\npath = "{tiny_model_dir}"\nmemory = "10MiB"\nkeep_alive = -1',
        f'id = "{HUGE}"\npath = "{tiny_model_dir}"\nmemory = "10GiB"',
    ])  # fmt: skip
    proc = start_worker(nats_server.url, catalogue, logs_dir / "slow-worker.log", "--model", SLOW, "--device", "cpu",
                        "--slots", "1", "--step-delay", str(STEP_DELAY_S), "--memory-budget", "250MiB",
                        "--worker-id", "slow")  # fmt: skip
    wait_for(lambda: SLOW in ready_models(gateway.base_url), timeout=120, what=SLOW, proc=proc)
    yield proc
    stop_process(proc)


def request(model: str, *, max_tokens: int, deadline: float = 0.0) -> GenerateRequest:
    """A request published by the test itself, answered on a reply subject of `TEST_GATEWAY`."""
    request_id = uuid.uuid4().hex
    return GenerateRequest(
        request_id=request_id, model=model, messages=[Message(role="user", content="go on")],
        sampling=Sampling(temperature=0, max_tokens=max_tokens, ignore_eos=True), deadline=deadline,
        reply_subject=names.reply_subject(TEST_GATEWAY, request_id), created=time.time(),
    )  # fmt: skip


class Replies:
    """The chunks the workers send to `TEST_GATEWAY`, by request id."""

    def __init__(self) -> None:
        self.chunks: dict[str, list[Chunk]] = {}
        self._arrived = asyncio.Event()

    def on_reply(self, _subject: str, data: bytes) -> None:
        chunk = codec.decode_chunk(data)
        self.chunks.setdefault(chunk.request_id, []).append(chunk)
        self._arrived.set()

    async def until(self, request_id: str, *, final: bool, timeout: float = 60) -> list[Chunk]:
        """The chunks of `request_id` once it has sent any (`final`: its last one)."""
        async with asyncio.timeout(timeout):
            while not (got := self.chunks.get(request_id)) or (final and not (got[-1].final or got[-1].error)):
                self._arrived.clear()
                await self._arrived.wait()
        return got


async def keep_busy_and_fill(bus: Bus, model: str) -> str:
    """Occupy the model's one slot with an endless request, then fill its queue; returns that request's id."""
    replies = Replies()
    await bus.subscribe(names.reply_wildcard(TEST_GATEWAY), replies.on_reply)
    endless = request(model, max_tokens=10_000_000)
    await bus.publish_request(model, codec.encode(endless), msg_id=endless.request_id)
    await replies.until(endless.request_id, final=False)  # running: the worker takes nothing more
    full = False
    while not full:
        batch = [bus.publish_request(model, b"filler", msg_id=uuid.uuid4().hex) for _ in range(500)]
        outcomes = await asyncio.gather(*batch, return_exceptions=True)
        refused = [o for o in outcomes if isinstance(o, BaseException)]
        assert all(isinstance(o, broker_errors.QueueFull) for o in refused), refused[:3]
        full = bool(refused)
    return endless.request_id


def empty_queue(url: str, model: str, running: str) -> None:
    """Drop what waits in the model's queue and stop the request that keeps its worker busy."""

    async def run() -> None:
        nc = await nats.connect(url)
        try:
            await nc.jetstream().purge_stream(names.REQUEST_STREAM, subject=names.request_subject(model))
            await nc.publish(names.cancel_subject(), running.encode())
            await nc.flush()
        finally:
            await nc.close()

    asyncio.run(run())


@pytest.fixture
def full_queue(nats_server: EmbeddedNats, backlog_worker: None) -> Iterator[str]:
    """`BACKLOG`'s queue, full; emptied afterwards. Yields the id of the request keeping the worker busy."""
    running = on_bus(nats_server.url, lambda bus: keep_busy_and_fill(bus, BACKLOG))
    try:
        yield running
    finally:
        empty_queue(nats_server.url, BACKLOG, running)


def test_a_full_queue_is_a_429_in_openai_words_and_a_529_in_anthropic_words(gateway: Gateway, full_queue: str) -> None:
    body = {"model": BACKLOG, "max_tokens": 3, "messages": PROMPT}
    for extra in ({}, {"stream": True}):
        refused = httpx.post(f"{gateway.base_url}/chat/completions", json=body | extra, timeout=30)
        assert refused.status_code == 429, refused.text
        assert refused.headers["Retry-After"] == "1"
        error = refused.json()["error"]
        assert error == {"message": error["message"], "type": "requests", "param": None, "code": "rate_limit_exceeded"}
        assert BACKLOG in error["message"]

        refused = httpx.post(f"{gateway.base_url}/messages", json=body | extra, timeout=30)
        assert refused.status_code == 529, refused.text
        assert refused.headers["Retry-After"] == "1"
        assert refused.json() == {"type": "error", "error": {"type": "overloaded_error", "message": error["message"]}}

    refused = httpx.post(f"{gateway.base_url}/responses", json={"model": BACKLOG, "input": "go on"}, timeout=30)
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1", refused.text
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"

    with pytest.raises(openai.RateLimitError) as openai_info:
        openai_client(gateway, 0).chat.completions.create(model=BACKLOG, messages=PROMPT, max_tokens=3)  # type: ignore[arg-type]
    assert openai_info.value.code == "rate_limit_exceeded"
    before = metric(gateway, "cortex_requests_total", model=BACKLOG, dialect="anthropic", status="529")
    with pytest.raises(anthropic.OverloadedError):
        anthropic_client(gateway, 0).messages.create(model=BACKLOG, max_tokens=3, messages=PROMPT)  # type: ignore[arg-type]
    # Counted with the status the client got.
    assert metric(gateway, "cortex_requests_total", model=BACKLOG, dialect="anthropic", status="529") == before + 1


def test_the_sdks_retry_a_full_queue_after_retry_after_and_succeed(
    nats_server: EmbeddedNats, gateway: Gateway, full_queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    refusals = metric(gateway, "cortex_request_errors_total", model=BACKLOG, code="rate_limit_exceeded")

    def ask_openai() -> str:
        reply = openai_client(gateway, 3).chat.completions.create(model=BACKLOG, messages=PROMPT, max_tokens=3)  # type: ignore[arg-type]
        return reply.choices[0].message.content or ""

    def ask_anthropic() -> str:
        reply = anthropic_client(gateway, 3).messages.create(model=BACKLOG, max_tokens=3, messages=PROMPT)  # type: ignore[arg-type]
        return "".join(block.text for block in reply.content if block.type == "text")

    with ThreadPoolExecutor(2) as pool:
        answers = [pool.submit(ask_openai), pool.submit(ask_anthropic)]
        wait_for(lambda: metric(gateway, "cortex_request_errors_total", model=BACKLOG,
                                code="rate_limit_exceeded") >= refusals + 2,
                 timeout=10, what="both clients refused once")  # fmt: skip
        empty_queue(nats_server.url, BACKLOG, full_queue)  # room again, before their first retry
        assert [a.result(timeout=60) for a in answers] == ["tok tok tok ", "tok tok tok "]
    waits = retry_waits(caplog)
    assert waits and all(wait == 1.0 for wait in waits), waits  # each SDK waited as Retry-After said


def test_a_503_carries_retry_after_and_the_sdks_retry_it(
    gateway: Gateway, slow_worker: subprocess.Popen[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    body = {"model": HUGE, "max_tokens": 3, "messages": PROMPT}
    refused = httpx.post(f"{gateway.base_url}/chat/completions", json=body, timeout=30)
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1", refused.text
    assert refused.json()["error"]["code"] == "no_capacity"
    assert refused.json()["error"]["type"] == "service_unavailable"
    refused = httpx.post(f"{gateway.base_url}/messages", json=body, timeout=30)
    assert refused.status_code == 503 and refused.headers["Retry-After"] == "1", refused.text
    assert refused.json()["error"]["type"] == "overloaded_error"

    caplog.set_level(logging.INFO)
    before = metric(gateway, "cortex_request_errors_total", model=HUGE, code="no_capacity")
    with pytest.raises(openai.InternalServerError) as info:
        openai_client(gateway, 2).chat.completions.create(model=HUGE, messages=PROMPT, max_tokens=3)  # type: ignore[arg-type]
    assert info.value.status_code == 503
    with pytest.raises(anthropic.ServiceUnavailableError):
        anthropic_client(gateway, 1).messages.create(model=HUGE, max_tokens=3, messages=PROMPT)  # type: ignore[arg-type]
    assert metric(gateway, "cortex_request_errors_total", model=HUGE, code="no_capacity") == before + 5
    assert retry_waits(caplog) == [1.0, 1.0, 1.0]


def test_a_request_whose_deadline_passed_in_the_queue_is_refused_unrun(
    nats_server: EmbeddedNats, slow_worker: subprocess.Popen[bytes]
) -> None:
    # Published without a gateway, so no cancel ever comes: the worker itself must notice.
    async def run(bus: Bus) -> tuple[list[Chunk], list[Chunk]]:
        replies = Replies()
        await bus.subscribe(names.reply_wildcard(TEST_GATEWAY), replies.on_reply)
        first = request(SLOW, max_tokens=60)  # three seconds and more, at STEP_DELAY_S a step
        await bus.publish_request(SLOW, codec.encode(first), msg_id=first.request_id)
        await replies.until(first.request_id, final=False)
        late = request(SLOW, max_tokens=60, deadline=time.time() + 0.5)  # waits for the one slot past this
        await bus.publish_request(SLOW, codec.encode(late), msg_id=late.request_id)
        return await replies.until(first.request_id, final=True), await replies.until(late.request_id, final=True)

    first, late = on_bus(nats_server.url, run)
    assert first[-1].error is None and first[-1].completion_tokens == 60
    assert len(late) == 1 and late[0].error is not None, late
    assert late[0].error.code == "deadline_exceeded"
    assert "before it was started" in late[0].error.message
    assert late[0].completion_tokens == 0 and not late[0].text


def test_a_deadline_passed_in_the_queue_is_a_504_and_the_worker_never_runs_it(
    nats_server: EmbeddedNats, gateway: Gateway, slow_worker: subprocess.Popen[bytes], logs_dir: Path
) -> None:
    impatient = start_gateway(nats_server.url, logs_dir, "--request-timeout", "1")
    worker_log = logs_dir / "slow-worker.log"
    try:
        wait_for(lambda: SLOW in ready_models(impatient.base_url), timeout=30, what="fleet view")
        seen = len(worker_log.read_text())
        body = {"model": SLOW, "messages": PROMPT, "max_tokens": 60, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{gateway.base_url}/chat/completions", json=body, timeout=60) as busy:
            lines = busy.iter_lines()
            assert '"content"' in next(line for line in lines if '"content"' in line)  # the one slot is taken
            started = time.monotonic()
            with pytest.raises(openai.APIStatusError) as info:
                openai_client(impatient, 0).chat.completions.create(model=SLOW, messages=PROMPT, max_tokens=60)  # type: ignore[arg-type]
            assert time.monotonic() - started < 2.5  # the deadline, not the slot, ended it
            rest = [line for line in lines if line.startswith("data: ")]
        # The gateway cancelled the request at its deadline; the worker, reaching it once its slot came
        # free, dropped it unrun: the next request does not wait the three seconds it would have taken,
        # and nothing the worker ran was cancelled (that logs "cancelled <id> after <n> tokens").
        started = time.monotonic()
        client = openai_client(gateway, 0)
        reply = client.chat.completions.create(model=SLOW, messages=PROMPT, max_tokens=3, temperature=0)  # type: ignore[arg-type]
        assert time.monotonic() - started < 2.0, time.monotonic() - started
    finally:
        stop_process(impatient.proc)
    assert info.value.status_code == 504 and info.value.code == "deadline_exceeded"
    assert rest[-1] == "data: [DONE]"  # the busy request was not disturbed
    assert reply.usage is not None and reply.usage.completion_tokens == 3
    assert "cancelled" not in worker_log.read_text()[seen:]
