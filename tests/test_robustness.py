"""Deadlines become 504s, clients that leave free their slot, workers stay usable."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from cortex.broker.server import EmbeddedNats
from tests.conftest import (
    TINY_MODEL,
    Gateway,
    get_json,
    metric,
    on_bus,
    ready_models,
    start_gateway,
    start_worker,
    stop_process,
    wait_for,
)

SLOW_PREFILL_S = 0.6
"""The synthetic worker's stand-in for a long prefill."""
LONG = 4000  # tokens: several seconds of work for the tiny model on a CPU
IMPATIENT_S = 1.5
PROMPT = [{"role": "user", "content": "go on"}]


def sdk(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0, timeout=60,
                         _strict_response_validation=True)  # fmt: skip


@pytest.fixture(scope="module")
def impatient_gateway(nats_server: EmbeddedNats, gateway: Gateway, logs_dir: Path) -> Iterator[Gateway]:
    gw = start_gateway(nats_server.url, logs_dir, "--request-timeout", str(IMPATIENT_S))
    wait_for(lambda: TINY_MODEL in ready_models(gw.base_url), timeout=30, what="fleet view")
    yield gw
    stop_process(gw.proc)


def test_deadline_passed_is_504(impatient_gateway: Gateway) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        sdk(impatient_gateway).chat.completions.create(
            model=TINY_MODEL, messages=PROMPT, temperature=0, max_tokens=LONG
        )  # type: ignore[call-overload]
    assert info.value.status_code == 504
    assert info.value.code == "deadline_exceeded"


def test_deadline_during_a_stream_is_an_error_event(impatient_gateway: Gateway) -> None:
    stream = sdk(impatient_gateway).chat.completions.create(
        model=TINY_MODEL, messages=PROMPT, temperature=0, max_tokens=LONG, stream=True
    )  # type: ignore[call-overload]
    received: list[str] = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert received  # the stream had started: the error came inside it, not as a status
    assert "deadline" in info.value.message


def test_stream_disconnect_cancels_generation(
    gateway: Gateway, logs_dir: Path, worker: subprocess.Popen[bytes]
) -> None:
    body = {"model": TINY_MODEL, "messages": PROMPT, "max_tokens": LONG, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{gateway.base_url}/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        first = next(response.iter_lines())  # generation is running; now hang up
    request_id = re.search(r'"id":"chatcmpl-([0-9a-f]+)"', first).group(1)  # type: ignore[union-attr]
    worker_log = logs_dir / "worker.log"
    wait_for(lambda: f"cancelled {request_id}" in worker_log.read_text(), timeout=30, what="the cancel", proc=worker)
    line = next(ln for ln in worker_log.read_text().splitlines() if f"cancelled {request_id}" in ln)
    assert int(line.split(" after ")[1].split()[0]) < LONG
    wait_for(lambda: metric(gateway, "cortex_requests_in_flight", model=TINY_MODEL) == 0, timeout=10, what="gauge")


def test_non_stream_disconnect_is_counted_and_cancelled(gateway: Gateway) -> None:
    before = metric(gateway, "cortex_requests_total", model=TINY_MODEL, status="499")
    body = {"model": TINY_MODEL, "messages": PROMPT, "max_tokens": LONG, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway.base_url}/chat/completions", json=body, timeout=httpx.Timeout(60, read=0.5))
    wait_for(
        lambda: metric(gateway, "cortex_requests_total", model=TINY_MODEL, status="499") == before + 1,
        timeout=15, what="the 499 to be counted",
    )  # fmt: skip
    assert metric(gateway, "cortex_requests_in_flight", model=TINY_MODEL) == 0


@pytest.fixture(scope="module")
def two_model_worker(
    nats_server: EmbeddedNats, catalogue_file: Path, logs_dir: Path, gateway: Gateway
) -> Iterator[subprocess.Popen[bytes]]:
    proc = start_worker(nats_server.url, catalogue_file, logs_dir / "two-model-worker.log", "--model", "tiny-a",
                        "--model", "tiny-b", "--device", "cpu", "--slots", "2",
                        "--worker-id", "two-models")  # fmt: skip
    wait_for(lambda: {"tiny-a", "tiny-b"} <= ready_models(gateway.base_url), timeout=120, what="two models", proc=proc)
    yield proc
    stop_process(proc)


def test_each_model_of_a_multi_model_worker_is_served(
    gateway: Gateway, two_model_worker: subprocess.Popen[bytes]
) -> None:
    client = openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0, timeout=30)
    # One model alone while the other idles: its pull must not be starved.
    first = client.chat.completions.create(model="tiny-b", messages=PROMPT, max_tokens=3, temperature=0)  # type: ignore[call-overload]
    assert first.usage.completion_tokens == 3  # type: ignore[union-attr]  # greedy: the end token is never likeliest

    def ask(model: str) -> int:
        reply = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=5, temperature=0)  # type: ignore[call-overload]
        return reply.usage.completion_tokens  # type: ignore[no-any-return]

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(ask, ["tiny-a", "tiny-b", "tiny-a", "tiny-b"])) == [5, 5, 5, 5]


def test_stopped_worker_withdraws_its_models(gateway: Gateway, two_model_worker: subprocess.Popen[bytes]) -> None:
    assert stop_process(two_model_worker) == 0
    wait_for(lambda: not {"tiny-a", "tiny-b"} & ready_models(gateway.base_url), timeout=15, what="withdrawal")


def test_malformed_requests_on_the_stream_do_not_stop_the_worker(nats_server: EmbeddedNats, gateway: Gateway) -> None:
    from cortex.broker.bus import Bus
    from cortex.protocol import GenerateRequest, Message, codec

    async def publish_garbage(bus: Bus) -> None:
        await bus.publish_request(TINY_MODEL, b"\xff not json", msg_id="garbage-1")
        no_reply = GenerateRequest(
            request_id="no-reply-1", model=TINY_MODEL, messages=[Message(role="user", content="x")]
        )
        await bus.publish_request(TINY_MODEL, codec.encode(no_reply), msg_id="no-reply-1")

    on_bus(nats_server.url, publish_garbage)
    reply = sdk(gateway).chat.completions.create(model=TINY_MODEL, messages=PROMPT, max_tokens=3, temperature=0)  # type: ignore[call-overload]
    assert reply.usage.completion_tokens == 3  # greedy: the tiny model's end token is never the likeliest


@pytest.fixture(scope="module")
def synthetic_worker(
    nats_server: EmbeddedNats, catalogue_file: Path, logs_dir: Path, gateway: Gateway
) -> Iterator[None]:
    proc = start_worker(nats_server.url, catalogue_file, logs_dir / "synthetic-worker.log", "--model", "tiny-b",
                        "--synthetic-engine", "0", "--synthetic-prefill", str(SLOW_PREFILL_S), "--worker-id",
                        "synthetic")  # fmt: skip
    wait_for(lambda: "tiny-b" in ready_models(gateway.base_url), timeout=60, what="synthetic worker", proc=proc)
    yield
    stop_process(proc)


def test_synthetic_engine_streams_through_the_real_hop(gateway: Gateway, synthetic_worker: None) -> None:
    # The benchmark's stand-in engine: exactly max_tokens chunks, in order, nothing lost.
    chunks = list(
        sdk(gateway).chat.completions.create(model="tiny-b", messages=PROMPT, max_tokens=500, stream=True)  # type: ignore[call-overload]
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok " * 500


def test_keepalive_comments_while_the_first_token_is_slow(
    nats_server: EmbeddedNats, logs_dir: Path, gateway: Gateway, synthetic_worker: None
) -> None:
    eager = start_gateway(nats_server.url, logs_dir, "--stream-headers-within", "0.1", "--keepalive-interval", "0.1")
    try:
        wait_for(lambda: "tiny-b" in ready_models(eager.base_url), timeout=30, what="fleet view")
        body = {"model": "tiny-b", "messages": PROMPT, "max_tokens": 3, "stream": True}
        with httpx.stream("POST", f"{eager.base_url}/chat/completions", json=body, timeout=30) as response:
            assert response.status_code == 200
            lines = [line for line in response.iter_lines() if line]
        # Headers after 0.1 s, then a comment every 0.1 s until the token at 0.6 s.
        keepalives = [line for line in lines if line.startswith(":")]
        assert len(keepalives) >= 2 and all(line.startswith(": cortex queued") for line in keepalives)
        assert lines.index(keepalives[-1]) < next(i for i, line in enumerate(lines) if '"content":"tok' in line)
        assert lines[-1] == "data: [DONE]"
        # The official SDK skips the comments.
        chunks = list(sdk(eager).chat.completions.create(model="tiny-b", messages=PROMPT, max_tokens=3, stream=True))  # type: ignore[call-overload]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok " * 3
    finally:
        stop_process(eager.proc)


def test_streams_waiting_for_a_cold_model_hear_their_place_and_the_load(
    nats_server: EmbeddedNats, logs_dir: Path, tmp_path: Path, gateway: Gateway
) -> None:
    catalogue = tmp_path / "models.toml"
    catalogue.write_text('[[models]]\nid = "slow-load"\npath = "unused"\n')
    # The load is held for seconds (the synthetic engine's own load is instant), so the streams wait on it.
    worker = start_worker(nats_server.url, catalogue, logs_dir / "slow-loader.log", "--synthetic-engine", "0",
                          "--load-delay", "4", "--worker-id", "slow-loader")  # fmt: skip
    eager = start_gateway(nats_server.url, logs_dir, "--stream-headers-within", "0.1", "--keepalive-interval", "0.2")
    try:
        wait_for(lambda: any(m["id"] == "slow-load" for m in get_json(f"{eager.base_url}/models")["data"]),
                 timeout=60, what="the cold model listed", proc=worker)  # fmt: skip
        body = {"model": "slow-load", "messages": PROMPT, "max_tokens": 3, "stream": True}

        def stream(_: int) -> list[str]:
            with httpx.stream("POST", f"{eager.base_url}/chat/completions", json=body, timeout=60) as response:
                assert response.status_code == 200
                return [line for line in response.iter_lines() if line]

        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(stream, range(3)))
        entry = next(m for m in get_json(f"{eager.base_url}/models")["data"] if m["id"] == "slow-load")
    finally:
        stop_process(eager.proc)
        stop_process(worker)
    comments = [[line for line in lines if line.startswith(":")] for lines in answers]
    positions = sorted(int(re.search(r"position=(\d+)", found[0]).group(1)) for found in comments)  # type: ignore[union-attr]
    assert positions == [1, 2, 3]  # each its own place: nobody serves the queue while the model loads
    loads = [float(m) for found in comments for line in found for m in re.findall(r"load=([0-9.]+)", line)]
    assert loads and all(0.0 <= load <= 1.0 for load in loads)
    print(f"\nwhile the cold model loaded: {comments[0][:2]} ... ({len(comments[0])} comments)")
    for lines in answers:
        assert lines[-1] == "data: [DONE]" and sum('"content":"tok' in line for line in lines) == 3
    assert isinstance(entry["queue_depth"], int) and isinstance(entry["in_flight"], int)


def test_responses_stream_that_breaks_ends_with_response_failed(impatient_gateway: Gateway) -> None:
    body = {"model": TINY_MODEL, "input": "go on", "max_output_tokens": LONG, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{impatient_gateway.base_url}/responses", json=body, timeout=60) as response:
        assert response.status_code == 200
        events = [line.removeprefix("event: ") for line in response.iter_lines() if line.startswith("event: ")]
    assert "response.output_text.delta" in events  # it had started
    assert events[-2:] == ["error", "response.failed"]


def test_responses_stream_refused_before_its_first_token_opens_then_fails(
    nats_server: EmbeddedNats, logs_dir: Path, gateway: Gateway
) -> None:
    eager = start_gateway(nats_server.url, logs_dir, "--stream-headers-within", "0")  # headers before any answer
    try:
        wait_for(lambda: TINY_MODEL in ready_models(eager.base_url), timeout=30, what="fleet view")
        body = {"model": TINY_MODEL, "input": "x " * 5000, "max_output_tokens": 4, "stream": True}
        with httpx.stream("POST", f"{eager.base_url}/responses", json=body, timeout=60) as response:
            assert response.status_code == 200
            lines = [line for line in response.iter_lines() if line]
    finally:
        stop_process(eager.proc)
    events = [line.removeprefix("event: ") for line in lines if line.startswith("event: ")]
    assert events == ["response.created", "response.in_progress", "error", "response.failed"]
    failed = json.loads(lines[-1].removeprefix("data: "))["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "invalid_prompt"
    error = json.loads(next(line for line in lines if '"context_length_exceeded"' in line).removeprefix("data: "))
    assert error["param"] == "input"


UNREADABLE = {
    "nested too deeply": b'{"model": "tiny-llama", "x_deep": ' + b"[" * 1500 + b"]" * 1500 + b"}",
    "not valid UTF-8": b'{"model": "tiny-\xff", "max_tokens": 4}',
}


@pytest.mark.parametrize("path", ["chat/completions", "completions", "responses", "messages", "messages/count_tokens"])
@pytest.mark.parametrize("what", list(UNREADABLE))
def test_unreadable_bodies_are_400_in_the_dialect(gateway: Gateway, path: str, what: str) -> None:
    response = httpx.post(f"{gateway.base_url}/{path}", content=UNREADABLE[what],
                          headers={"Content-Type": "application/json"}, timeout=30)  # fmt: skip
    assert response.status_code == 400, response.text
    body = response.json()
    error = body["error"]
    if path.startswith("messages"):
        assert body["type"] == "error"
    assert error["type"] == "invalid_request_error"
    # The gateway's own words (what msgspec says after them changes between its releases).
    assert "The request body is not valid JSON" in error["message"]


def test_a_worker_killed_mid_answer_is_a_clear_error_for_each_request(
    nats_server: EmbeddedNats, gateway: Gateway, logs_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    catalogue = tmp_path / "models.toml"
    catalogue.write_text(f'[[models]]\nid = "tiny-doomed"\npath = "{tiny_model_dir}"\n')
    proc = start_worker(nats_server.url, catalogue, logs_dir / "doomed-worker.log", "--model", "tiny-doomed",
                        "--device", "cpu", "--slots", "2", "--worker-id", "doomed")  # fmt: skip
    try:
        wait_for(lambda: "tiny-doomed" in ready_models(gateway.base_url), timeout=120, what="tiny-doomed", proc=proc)
        body = {"model": "tiny-doomed", "messages": PROMPT, "max_tokens": LONG, "temperature": 0}
        with ThreadPoolExecutor(1) as pool:
            whole = pool.submit(httpx.post, f"{gateway.base_url}/chat/completions", json=body, timeout=90)
            with httpx.stream("POST", f"{gateway.base_url}/chat/completions", json=body | {"stream": True},
                              timeout=90) as streamed:  # fmt: skip
                lines = streamed.iter_lines()
                assert '"content"' in next(line for line in lines if '"content"' in line)  # it is answering
                wait_for(lambda: metric(gateway, "cortex_model_in_flight", model="tiny-doomed", worker="doomed") >= 2,
                         timeout=30, what="both requests running on the doomed worker")  # fmt: skip
                proc.kill()  # no goodbye: its advert stays until it expires
                rest = [line for line in lines if line]
            answer = whole.result(timeout=90)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert rest and rest[-1] != "data: [DONE]"
    error = json.loads(rest[-1].removeprefix("data: "))["error"]
    assert "doomed" in error["message"] and error["type"] == "server_error", error
    assert answer.status_code == 502 and "doomed" in answer.json()["error"]["message"], answer.text


def test_a_broker_outage_is_a_clear_503_and_service_resumes_after_it(
    catalogue_file: Path, logs_dir: Path, tmp_path: Path
) -> None:
    broker = EmbeddedNats(store_dir=tmp_path / "store", port=0, log_file=logs_dir / "outage-nats.log")
    broker.start()
    gw: Gateway | None = None
    worker = start_worker(broker.url, catalogue_file, logs_dir / "outage-worker.log", "--model", "tiny-b",
                          "--synthetic-engine", "0", "--worker-id", "outage-worker")  # fmt: skip
    body = {"model": "tiny-b", "messages": PROMPT, "max_tokens": 3}
    try:
        gw = start_gateway(broker.url, logs_dir)
        url = f"{gw.base_url}/chat/completions"
        wait_for(lambda: "tiny-b" in ready_models(gw.base_url), timeout=60, what="tiny-b", proc=worker)
        assert httpx.post(url, json=body, timeout=30).status_code == 200
        broker.stop()
        down = httpx.post(url, json=body, timeout=60)  # never a hang, never a 500
        assert down.status_code == 503, down.text
        assert down.json()["error"]["type"] == "service_unavailable"
        # Once the gateway knows it is cut off, its stale fleet view is not taken for "no such model".
        wait_for(lambda: httpx.get(f"{gw.base_url}/models", timeout=10).status_code == 503, timeout=15,
                 what="the gateway to notice the outage")  # fmt: skip
        down = httpx.post(url, json=body, timeout=60)
        assert down.status_code == 503 and down.json()["error"]["code"] == "broker_unavailable", down.text
        broker.start()  # same port and store: gateway and worker reconnect by themselves
        wait_for(lambda: httpx.post(url, json=body, timeout=30).status_code == 200, timeout=60, what="service back")
    finally:
        stop_process(worker)
        if gw is not None:
            stop_process(gw.proc)
        broker.stop()
