"""OpenAI `/v1/responses` through the official SDK, stored conversations across gateway replicas."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from cortex.broker.server import EmbeddedNats
from tests.conftest import TINY_MODEL, Gateway, ready_models, start_gateway, stop_process, wait_for

pytestmark = pytest.mark.usefixtures("gateway")


def sdk(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=60,
                         _strict_response_validation=True)  # fmt: skip


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return sdk(gateway)


@pytest.fixture(scope="module")
def second_gateway(nats_server: EmbeddedNats, gateway: Gateway, logs_dir: Path) -> Iterator[Gateway]:
    gw = start_gateway(nats_server.url, logs_dir)
    wait_for(lambda: TINY_MODEL in ready_models(gw.base_url), timeout=30, what="second gateway's fleet view")
    yield gw
    stop_process(gw.proc)


def test_create_incomplete_at_max_output_tokens(client: openai.OpenAI) -> None:
    response = client.responses.create(model=TINY_MODEL, input="Hello there", max_output_tokens=12, temperature=0)
    assert response.object == "response" and response.model == TINY_MODEL
    assert response.status == "incomplete"  # the tiny model never ends by itself
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text
    assert response.usage is not None and response.usage.output_tokens == 12


def test_instructions_and_message_items(client: openai.OpenAI) -> None:
    items = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Hello!"}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "And then?"}]},
    ]
    plain = client.responses.create(model=TINY_MODEL, input=items, max_output_tokens=4)  # type: ignore[arg-type]
    told = client.responses.create(model=TINY_MODEL, input=items, instructions="Be terse.", max_output_tokens=4)  # type: ignore[arg-type]
    assert told.usage is not None and plain.usage is not None
    assert told.usage.input_tokens > plain.usage.input_tokens
    assert told.instructions == "Be terse."


def test_stream_helper_matches_non_streaming(client: openai.OpenAI) -> None:
    expected = client.responses.create(model=TINY_MODEL, input="Hello there", max_output_tokens=12, temperature=0)
    with client.responses.stream(model=TINY_MODEL, input="Hello there", max_output_tokens=12, temperature=0) as stream:
        events = list(stream)
    # An answer cut at max_output_tokens ends with `response.incomplete`, as OpenAI's does; the
    # helper's get_final_response() only knows `response.completed` (the default-model test uses it).
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == expected.output_text
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == expected.output_text
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]  # fmt: skip
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]  # fmt: skip


def test_previous_response_continues_through_another_gateway(client: openai.OpenAI, second_gateway: Gateway) -> None:
    first = client.responses.create(model=TINY_MODEL, input="My name is Ada.", max_output_tokens=6, temperature=0)
    follow = sdk(second_gateway).responses.create(
        model=TINY_MODEL, input="What is my name?", previous_response_id=first.id, max_output_tokens=6, temperature=0
    )
    alone = client.responses.create(model=TINY_MODEL, input="What is my name?", max_output_tokens=6, temperature=0)
    assert follow.previous_response_id == first.id
    assert follow.usage is not None and alone.usage is not None and first.usage is not None
    # The follow-up saw the first turn (its prompt and answer) before its own.
    assert follow.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens


def test_unstored_or_unknown_previous_response_is_404(client: openai.OpenAI) -> None:
    unstored = client.responses.create(model=TINY_MODEL, input="Hi", max_output_tokens=2, store=False)
    for previous in (unstored.id, "resp_" + "0" * 32):
        with pytest.raises(openai.NotFoundError) as info:
            client.responses.create(model=TINY_MODEL, input="Again", previous_response_id=previous, max_output_tokens=2)
        assert info.value.code == "previous_response_not_found"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0]"),
        ({"input": [{"type": "web_search_call", "id": "x"}]}, "input[0]"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
        ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input[0].content[0].text"),
        ({"input": [{"type": "message", "role": "tool", "content": "x"}]}, "input[0].role"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools[0].name"),  # chat's shape
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"previous_response_id": "nope"}, "previous_response_id"),
    ],
)
def test_bad_bodies_are_400(gateway: Gateway, extra: dict[str, object], param: str) -> None:
    body = {"model": TINY_MODEL, "input": "Hi", **extra}
    response = httpx.post(f"{gateway.base_url}/responses", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_follow_up_keeps_developer_messages_but_not_old_instructions(client: openai.OpenAI) -> None:
    items = [{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "Hi"}]
    first = client.responses.create(model=TINY_MODEL, input=items, instructions="Old rules, long " * 10,  # type: ignore[arg-type]
                                    max_output_tokens=3, temperature=0)  # fmt: skip
    follow = client.responses.create(model=TINY_MODEL, input="Again", previous_response_id=first.id,
                                     max_output_tokens=3, temperature=0)  # fmt: skip
    replay = client.responses.create(
        model=TINY_MODEL, max_output_tokens=3, temperature=0,
        input=[*items, {"role": "assistant", "content": first.output_text}, {"role": "user", "content": "Again"}],  # type: ignore[list-item]
    )  # fmt: skip
    assert follow.usage is not None and replay.usage is not None
    # Same conversation with the developer message kept and the old instructions dropped.
    assert follow.usage.input_tokens == replay.usage.input_tokens


def test_retrieve_and_delete_a_stored_response(client: openai.OpenAI) -> None:
    created = client.responses.create(model=TINY_MODEL, input="Hello", temperature=0, max_output_tokens=4)
    fetched = client.responses.retrieve(created.id)
    assert fetched.id == created.id and fetched.output_text == created.output_text
    assert fetched.usage == created.usage
    deleted = client.responses.with_raw_response.delete(created.id)  # the plain call returns None
    assert deleted.parse() is None and deleted.http_response.json() == {"id": created.id, "object": "response",
                                                                        "deleted": True}  # fmt: skip
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=TINY_MODEL, input="More", previous_response_id=created.id, max_output_tokens=2)


def test_unstored_response_cannot_be_retrieved(client: openai.OpenAI) -> None:
    created = client.responses.create(model=TINY_MODEL, input="Hello", store=False, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_not-an-id")
