"""The official `anthropic` SDK against the real gateway and worker (tiny random model)."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from tests.conftest import TINY_ALIAS, TINY_MODEL, Gateway

pytestmark = pytest.mark.usefixtures("gateway")
HELLO = [{"role": "user", "content": "Hello, how are you today?"}]


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> anthropic.Anthropic:
    root = gateway.base_url.removesuffix("/v1")
    return anthropic.Anthropic(base_url=root, api_key="unused", max_retries=0, timeout=60,
                               _strict_response_validation=True)  # fmt: skip


GREEDY = {"temperature": 0.0}
"""The current SDK has no `temperature` parameter any more, but clients still send it: the gateway honours it."""


def create(client: anthropic.Anthropic, **kwargs: object) -> anthropic.types.Message:
    kwargs.setdefault("model", TINY_MODEL)
    kwargs.setdefault("messages", HELLO)
    kwargs.setdefault("max_tokens", 24)
    extra = dict(GREEDY)
    extra.update(kwargs.pop("extra_body", {}))  # type: ignore[call-overload]
    return client.messages.create(**kwargs, extra_body=extra)  # type: ignore[call-overload, no-any-return]


def test_create_message(client: anthropic.Anthropic) -> None:
    message = create(client)
    assert message.type == "message" and message.role == "assistant"
    assert message.model == TINY_MODEL
    assert message.stop_reason == "max_tokens"  # the tiny model never picks its end token
    assert message.usage.output_tokens == 24
    assert message.usage.input_tokens > 0
    (block,) = message.content
    assert block.type == "text" and block.text


def test_alias_system_blocks_and_unknown_fields(client: anthropic.Anthropic) -> None:
    system = [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]
    raw = client.messages.with_raw_response.create(
        model=TINY_ALIAS, max_tokens=4, messages=HELLO, system=system, metadata={"user_id": "u1"},  # type: ignore[arg-type]
        extra_body={"service_tier": "auto", "speed": "fast", "container": None, "brand_new": 1},
    )  # fmt: skip
    assert raw.parse().model == TINY_MODEL
    assert raw.headers["warning"] == '299 cortex "Ignored fields: container, metadata, service_tier, speed"'


def test_stream_helper_matches_non_streaming(client: anthropic.Anthropic) -> None:
    expected = create(client).content[0].text  # type: ignore[union-attr]
    with client.messages.stream(model=TINY_MODEL, messages=HELLO, max_tokens=24, extra_body=GREEDY) as stream:  # type: ignore[arg-type]
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == expected
    assert final.content[0].text == expected  # type: ignore[union-attr]
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 24


def test_raw_stream_event_order(gateway: Gateway) -> None:
    body = {"model": TINY_MODEL, "messages": HELLO, "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{gateway.base_url}/messages", json=body, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("event: ") for line in response.iter_lines() if line.startswith("event: ")]
    assert events[:3] == ["message_start", "content_block_start", "ping"]
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(events[3:-3]) == {"content_block_delta"}


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequences(client: anthropic.Anthropic, stream: bool) -> None:
    full = create(client, max_tokens=40).content[0].text  # type: ignore[union-attr]
    stop = full[8:11]
    expected = full[: full.index(stop)]
    if stream:
        with client.messages.stream(model=TINY_MODEL, messages=HELLO, max_tokens=40, extra_body=GREEDY,  # type: ignore[arg-type]
                                    stop_sequences=[stop]) as s:  # fmt: skip
            message = s.get_final_message()
    else:
        message = create(client, max_tokens=40, stop_sequences=[stop])
    assert message.content[0].text == expected  # type: ignore[union-attr]
    assert message.stop_reason == "stop_sequence"
    assert message.stop_sequence == stop


def test_count_tokens_uses_the_models_template(client: anthropic.Anthropic) -> None:
    short = client.messages.count_tokens(model=TINY_MODEL, messages=[{"role": "user", "content": "hi"}])
    longer = client.messages.count_tokens(
        model=TINY_MODEL, system="You are terse.", messages=[{"role": "user", "content": "hi there, how are you?"}]
    )
    assert 0 < short.input_tokens < longer.input_tokens
    assert (
        create(client, messages=[{"role": "user", "content": "hi"}], max_tokens=1).usage.input_tokens
        == short.input_tokens
    )


def test_unknown_model_is_not_found_error(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        create(client, model="no-such-model")
    assert info.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"model": TINY_MODEL, "messages": HELLO}, "max_tokens"),
        ({"model": TINY_MODEL, "max_tokens": 5}, "messages"),
        ({"model": TINY_MODEL, "max_tokens": 5, "messages": [{"role": "robot", "content": "x"}]}, "role"),
        ({"model": TINY_MODEL, "max_tokens": "many", "messages": HELLO}, "max_tokens"),
        ({"model": TINY_MODEL, "max_tokens": 5, "messages": HELLO, "temperature": 3}, "temperature"),
        (
            {"model": TINY_MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image"}]}]},
            "image",
        ),
        (
            {"model": TINY_MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages.0.content.0.text: Field required",
        ),
    ],
)
def test_bad_bodies_are_400_in_anthropic_shape(gateway: Gateway, body: dict[str, object], fragment: str) -> None:
    headers = {"x-api-key": "k", "anthropic-version": "2023-06-01", "anthropic-beta": "anything-2099-01-01"}
    response = httpx.post(f"{gateway.base_url}/messages", json=body, headers=headers, timeout=30)
    assert response.status_code == 400, response.text
    payload = response.json()
    assert payload["type"] == "error"
    assert payload["error"]["type"] == "invalid_request_error"
    assert fragment in payload["error"]["message"]


def test_bearer_key_and_wrong_method_in_anthropic_shape(gateway: Gateway) -> None:
    ok = httpx.post(f"{gateway.base_url}/messages", headers={"Authorization": "Bearer k"}, timeout=30,
                    json={"model": TINY_MODEL, "max_tokens": 2, "messages": HELLO})  # fmt: skip
    assert ok.status_code == 200
    wrong = httpx.get(f"{gateway.base_url}/messages", timeout=30)
    assert wrong.status_code == 405
    assert wrong.json()["type"] == "error" and wrong.json()["error"]["type"] == "invalid_request_error"


def test_models_list_and_retrieve(client: anthropic.Anthropic) -> None:
    models = {m.id: m for m in client.models.list()}
    assert TINY_MODEL in models
    assert models[TINY_MODEL].type == "model" and models[TINY_MODEL].display_name
    assert client.models.retrieve(TINY_ALIAS).id == TINY_MODEL


def test_assistant_prefill_is_continued(client: anthropic.Anthropic) -> None:
    question = {"role": "user", "content": "Hello, how are you today?"}
    plain = create(client, messages=[question], max_tokens=6)
    prefilled = create(client, messages=[question, {"role": "assistant", "content": "Well,"}], max_tokens=6)

    # The prefill is part of the prompt (not closed and followed by a new assistant turn),
    # and the answer holds only the continuation.
    def prompt_tokens(message: anthropic.types.Message) -> int:
        return message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)

    assert prompt_tokens(plain) < prompt_tokens(prefilled) < prompt_tokens(plain) + 6
    assert not prefilled.content[0].text.startswith("Well,")  # type: ignore[union-attr]
