"""The official `openai` SDK against a real gateway, broker and worker (tiny random model)."""

from __future__ import annotations

import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from cortex.broker import fleet_ops
from cortex.broker.server import EmbeddedNats
from tests.conftest import COLD_MODEL, SPARE_MODEL, TINY_ALIAS, TINY_MODEL, Gateway, on_bus, wait_for

pytestmark = pytest.mark.usefixtures("gateway")

PROMPT = [{"role": "user", "content": "Hello, how are you today?"}]


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=60,
                         _strict_response_validation=True)  # fmt: skip


def greedy(client: openai.OpenAI, max_tokens: int = 24, **kwargs: object) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model=TINY_MODEL,
        messages=PROMPT,
        temperature=0,
        max_tokens=max_tokens,
        **kwargs,  # type: ignore[arg-type]
    )


def test_non_streaming_completion(client: openai.OpenAI) -> None:
    reply = greedy(client)
    choice = reply.choices[0]
    assert reply.object == "chat.completion"
    assert reply.model == TINY_MODEL
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"  # the tiny model never picks its end token
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 24
    assert reply.usage.prompt_tokens > 0
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 24


def test_alias_resolves_to_the_model(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=TINY_ALIAS, messages=PROMPT, max_tokens=2)
    assert reply.model == TINY_MODEL


def test_greedy_is_deterministic_and_stream_matches(client: openai.OpenAI) -> None:
    first = greedy(client).choices[0].message.content
    second = greedy(client).choices[0].message.content
    assert first == second
    chunks = list(
        client.chat.completions.create(model=TINY_MODEL, messages=PROMPT, temperature=0, max_tokens=24, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == first
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)


def test_stream_include_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=TINY_MODEL,
            messages=PROMPT,
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
            temperature=0,
        )
    )
    *body, last = chunks
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens == 5
    assert all(c.usage is None for c in body)


def test_stream_without_usage_has_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=TINY_MODEL, messages=PROMPT, max_tokens=3, stream=True))
    assert all(c.choices for c in chunks)


def test_seeded_sampling_is_reproducible(client: openai.OpenAI) -> None:
    def run() -> str | None:
        return (
            client.chat.completions.create(
                model=TINY_MODEL, messages=PROMPT, temperature=0.9, top_p=0.9, seed=7, max_tokens=16
            )
            .choices[0]
            .message.content
        )

    assert run() == run()


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_is_never_emitted(client: openai.OpenAI, stream: bool) -> None:
    full = greedy(client, max_tokens=40).choices[0].message.content
    assert full is not None and len(full) > 12
    stop = full[8:11]
    expected = full[: full.index(stop)]
    if stream:
        chunks = list(
            client.chat.completions.create(
                model=TINY_MODEL, messages=PROMPT, temperature=0, max_tokens=40, stop=[stop, "\u0000never"], stream=True
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        reply = greedy(client, max_tokens=40, stop=stop)
        text, finish = reply.choices[0].message.content or "", reply.choices[0].finish_reason
    assert text == expected
    assert stop not in text
    assert finish == "stop"


def test_penalties_discourage_repetition(client: openai.OpenAI) -> None:
    plain = greedy(client, max_tokens=40).choices[0].message.content or ""
    penalised = greedy(client, max_tokens=40, presence_penalty=2.0, frequency_penalty=2.0).choices[0].message.content
    assert penalised and penalised != plain
    # The tiny model's greedy answer loops on a few tokens; the penalties break the loop.
    assert len(set(penalised.split())) > len(set(plain.split()))


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=PROMPT)
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"


def test_model_in_a_catalogue_loads_on_demand(client: openai.OpenAI, nats_server: EmbeddedNats) -> None:
    # The session worker lists tiny-cold in its catalogue but did not load it at start.
    reply = client.chat.completions.create(model=COLD_MODEL, messages=PROMPT, max_tokens=3, temperature=0)
    assert reply.model == COLD_MODEL and reply.usage and reply.usage.completion_tokens == 3
    entry = client.models.retrieve(COLD_MODEL)
    assert entry.model_extra["loaded_on"] == ["test-worker"]  # type: ignore[index]
    # Leave the session's worker as it was: tests of other files in this process (the fleet page's) expect it cold.
    on_bus(nats_server.url, lambda bus: fleet_ops.unload(bus, COLD_MODEL))
    wait_for(lambda: not (client.models.retrieve(COLD_MODEL).model_extra or {}).get("loaded_on"), timeout=60,
             what="tiny-cold unloaded again")  # fmt: skip


def test_prompt_longer_than_context_is_400(client: openai.OpenAI) -> None:
    long_prompt = [{"role": "user", "content": "fox " * 5000}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TINY_MODEL, messages=long_prompt)  # type: ignore[arg-type]
    assert info.value.code == "context_length_exceeded"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[]", None),
        (b'{"model": "tiny-llama"}', "messages"),
        (b'{"model": "tiny-llama", "messages": []}', "messages"),
        (b'{"model": "tiny-llama", "messages": [{"role": "wizard", "content": "x"}]}', "messages[0].role"),
        (b'{"model": "tiny-llama", "messages": [{"role": "user", "content": 5}]}', "messages[0].content"),
        (
            b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}',
            "max_tokens",
        ),
        (b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', "max_tokens"),
        (b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], "temperature": 7}', "temperature"),
        (b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], "top_p": 0}', "top_p"),
        (b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], "n": 3}', "n"),
        (
            b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], "presence_penalty": 3}',
            "presence_penalty",
        ),
        (
            b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "x"}], "seed": 9223372036854775808}',
            "seed",
        ),
        (
            b'{"model": "tiny-llama", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
            "messages[0].content[0]",
        ),
    ],
)
def test_bad_bodies_are_400_in_openai_shape(gateway: Gateway, body: bytes, param: str | None) -> None:
    response = httpx.post(f"{gateway.base_url}/chat/completions", content=body,
                          headers={"Content-Type": "application/json"}, timeout=30)  # fmt: skip
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    if param is not None:
        assert error["param"] == param


def test_unknown_fields_are_ignored(gateway: Gateway) -> None:
    body = {"model": TINY_MODEL, "messages": PROMPT, "max_tokens": 2, "user": "u1", "store": False, "x-new": 1}
    response = httpx.post(f"{gateway.base_url}/chat/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text
    # Known fields without effect are named; unknown ones are not (they may be anything).
    assert response.headers["warning"] == '299 cortex "Ignored fields: store, user"'
    with httpx.stream(
        "POST", f"{gateway.base_url}/chat/completions", json=body | {"stream": True}, timeout=30
    ) as streamed:
        assert streamed.headers["warning"] == '299 cortex "Ignored fields: store, user"'


def test_a_trailing_slash_is_served_not_redirected(gateway: Gateway) -> None:
    body = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    response = httpx.post(f"{gateway.base_url}/chat/completions/", json=body, timeout=30)  # redirects not followed
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion"


def test_unknown_route_is_404_json(gateway: Gateway) -> None:
    response = httpx.get(f"{gateway.base_url}/nothing-here", timeout=10)
    assert response.status_code == 404
    assert "error" in response.json()


def test_body_over_broker_limit_is_413(gateway: Gateway) -> None:
    huge = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "x" * (9 * 1024 * 1024)}]}
    response = httpx.post(f"{gateway.base_url}/chat/completions", json=huge, timeout=60)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_sixteen_concurrent_streams(client: openai.OpenAI) -> None:
    expected = greedy(client, max_tokens=12).choices[0].message.content

    def one(_: int) -> tuple[str, str | None]:
        stream = client.chat.completions.create(
            model=TINY_MODEL, messages=PROMPT, temperature=0, max_tokens=12, stream=True
        )
        chunks = [c for c in stream if c.choices]
        return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason

    with ThreadPoolExecutor(max_workers=16) as pool:
        results = list(pool.map(one, range(16)))
    assert results == [(expected, "length")] * 16


def test_models_list(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert TINY_MODEL in models
    assert SPARE_MODEL in models  # from the catalogue, not loaded
    tiny = models[TINY_MODEL]
    assert tiny.object == "model" and tiny.owned_by == "cortex"
    extra = tiny.model_extra or {}
    assert extra["ready"] is True and extra["loaded_on"] == ["test-worker"]
    assert TINY_ALIAS in extra["aliases"]
    assert extra["context_length"] == extra["max_model_len"] == 4096  # learned from the loaded model
    assert extra["supports"] == {"json": True, "tools": True, "reasoning": False}
    assert (models[SPARE_MODEL].model_extra or {})["ready"] is False


def test_retrieve_model_by_id_and_alias(client: openai.OpenAI) -> None:
    assert client.models.retrieve(TINY_MODEL).id == TINY_MODEL
    assert client.models.retrieve(TINY_ALIAS).id == TINY_MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_health(gateway: Gateway) -> None:
    body = httpx.get(f"{gateway.root_url}/health", timeout=10).json()
    assert body["status"] == "ok"
    assert TINY_MODEL in body["models_ready"]


def test_metrics_are_exported(client: openai.OpenAI, gateway: Gateway) -> None:
    greedy(client, max_tokens=4)
    with urllib.request.urlopen(gateway.metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    for name in (
        "cortex_requests_total",
        "cortex_request_errors_total",
        "cortex_prompt_tokens_total",
        "cortex_completion_tokens_total",
        "cortex_time_to_first_token_seconds_bucket",
        "cortex_request_duration_seconds_bucket",
        "cortex_tokens_per_second_bucket",
    ):
        assert f"{name}{{" in text, name
    assert f'model="{TINY_MODEL}"' in text


def test_stream_rejected_by_the_worker_keeps_its_status_code(gateway: Gateway) -> None:
    # Invalid only at the worker (it alone can count tokens): the gateway waits for
    # the first chunk before sending headers, so this is a 400, not a broken stream.
    body = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "fox " * 5000}], "stream": True}
    response = httpx.post(f"{gateway.base_url}/chat/completions", json=body, timeout=30)
    assert response.status_code == 400
    assert json.loads(response.text)["error"]["code"] == "context_length_exceeded"
