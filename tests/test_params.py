"""Every parameter the real APIs know either works, is a 400, or is ignored with a `Warning` header.

The official SDKs against the real gateway and worker (tiny random model, greedy).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from cortex.gateway.exchange import Answer
from cortex.gateway.openai_chat_format import ChatFormatter
from cortex.protocol import Chunk, ToolCallDelta
from cortex.protocol.messages import FINISH_TOOL_CALLS
from tests.conftest import TINY_MODEL, Gateway

pytestmark = pytest.mark.usefixtures("gateway")
PROMPT = [{"role": "user", "content": "Hello, how are you today?"}]
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo"]}},  # a random model's strings never end
        "required": ["city"],
        "additionalProperties": False,
    },
}


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=60,
                         _strict_response_validation=True)  # fmt: skip


@pytest.fixture(scope="module")
def claude(gateway: Gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.base_url.removesuffix("/v1"), api_key="unused", max_retries=0,
                               timeout=60, _strict_response_validation=True)  # fmt: skip


@pytest.fixture(scope="module")
def token_texts(tiny_model_dir: Path) -> list[str]:
    """Each token id's text, decoded the way the worker decodes it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return [str(tokenizer.decode([i])) for i in range(len(tokenizer))]


def chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    kwargs.setdefault("messages", PROMPT)
    kwargs.setdefault("max_tokens", 6)
    return client.chat.completions.create(model=TINY_MODEL, temperature=0, **kwargs)


def warning(response: httpx.Response) -> str | None:
    return response.headers.get("warning")


def ignored(*names: str) -> str:
    return f'299 cortex "Ignored fields: {", ".join(sorted(names))}"'


def post(gateway: Gateway, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{gateway.base_url}/{path}", json=body, timeout=60)


def assert_openai_400(response: httpx.Response, param: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def assert_anthropic_400(response: httpx.Response, field: str) -> None:
    """Anthropic's errors have no `param`: the field leads the message."""
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith(f"{field}: ")


# -- logit_bias ---------------------------------------------------------------


def test_logit_bias_minus_100_bans_the_greedy_pick(client: openai.OpenAI, token_texts: list[str]) -> None:
    plain = chat(client, logprobs=True)
    first = plain.choices[0].logprobs.content[0].token
    # Every id with that text: the answer cannot start with it again, whichever id it was.
    banned = {str(i): -100 for i, text in enumerate(token_texts) if text == first}
    assert 0 < len(banned) <= 300
    biased = chat(client, logprobs=True, logit_bias=banned)
    assert biased.choices[0].logprobs.content[0].token != first
    assert biased.choices[0].message.content != plain.choices[0].message.content
    assert chat(client, logit_bias={}).choices[0].message.content == plain.choices[0].message.content


def test_logit_bias_plus_100_forces_a_token(client: openai.OpenAI, token_texts: list[str], gateway: Gateway) -> None:
    token = next(i for i, text in enumerate(token_texts) if len(text) > 2 and text.isalpha())
    reply = chat(client, max_tokens=3, logit_bias={str(token): 100})
    assert reply.choices[0].message.content == token_texts[token] * 3
    streamed = chat(client, max_tokens=3, logit_bias={str(token): 100}, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == token_texts[token] * 3
    # Legacy completions too, and no warning: the field is honoured.
    raw = post(gateway, "completions", {"model": TINY_MODEL, "prompt": "The quick", "max_tokens": 4,
                                        "temperature": 0, "logit_bias": {str(token): 100}})  # fmt: skip
    assert raw.status_code == 200, raw.text
    assert raw.json()["choices"][0]["text"] == token_texts[token] * 4
    assert warning(raw) is None


@pytest.mark.parametrize(
    "bias",
    [
        {"fox": 1},
        {"-1": 1},
        {"1.5": 1},
        {" 12": 1},
        {"12": 101},
        {"12": -100.5},
        {"12": "high"},
        {"12": True},
        {str(i): 1 for i in range(301)},
        [12],
    ],
)
@pytest.mark.parametrize("path", ["chat/completions", "completions"])
def test_logit_bias_shape_is_checked(gateway: Gateway, path: str, bias: Any) -> None:
    body = {"model": TINY_MODEL, "max_tokens": 2, "logit_bias": bias}
    body |= {"messages": PROMPT} if path == "chat/completions" else {"prompt": "The quick"}
    assert_openai_400(post(gateway, path, body), "logit_bias")


def test_logit_bias_outside_the_vocabulary_is_a_400_from_the_worker(
    client: openai.OpenAI, token_texts: list[str]
) -> None:
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as caught:
            chat(client, logit_bias={str(len(token_texts)): -5}, stream=stream)
        assert caught.value.param == "logit_bias" and caught.value.type == "invalid_request_error"
    chat(client, logit_bias={str(len(token_texts) - 1): -5})  # the last token is fine


# -- chat: ignored, refused ---------------------------------------------------------


def test_chat_fields_without_effect_are_named_in_the_warning(gateway: Gateway) -> None:
    extra = {"user": "u1", "store": True, "metadata": {"team": "a"}, "service_tier": "auto",
             "prompt_cache_key": "k", "safety_identifier": "s1", "verbosity": "low",
             "prediction": {"type": "content", "content": "Hi"}}  # fmt: skip
    body = {"model": TINY_MODEL, "messages": PROMPT, "max_tokens": 2, "modalities": ["text"], **extra}
    response = post(gateway, "chat/completions", body)
    assert response.status_code == 200, response.text
    assert warning(response) == ignored(*extra)  # `modalities: ["text"]` is honoured, not ignored


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"moderation": {"model": "omni-moderation-latest"}}, "moderation"),
        ({"verbosity": "loud"}, "verbosity"),
        ({"metadata": {str(i): "x" for i in range(17)}}, "metadata"),
        ({"metadata": {"n": 1}}, "metadata"),
        ({"metadata": {"k": "x" * 513}}, "metadata"),
        ({"safety_identifier": "s" * 65}, "safety_identifier"),
        ({"prediction": {"type": "guess", "content": "Hi"}}, "prediction.type"),
        ({"store": "yes"}, "store"),
        ({"user": 7}, "user"),
    ],
)
def test_chat_fields_cortex_cannot_honour_are_400s(gateway: Gateway, extra: dict[str, Any], param: str) -> None:
    body = {"model": TINY_MODEL, "messages": PROMPT, "max_tokens": 2, **extra}
    assert_openai_400(post(gateway, "chat/completions", body), param)


def test_completions_user_is_ignored_with_a_warning(gateway: Gateway) -> None:
    body = {"model": TINY_MODEL, "prompt": "The quick", "max_tokens": 2, "user": "u1"}
    response = post(gateway, "completions", body)
    assert response.status_code == 200, response.text
    assert warning(response) == ignored("user")


# -- chat: the deprecated functions -------------------------------------------------


def test_functions_answer_with_function_call(client: openai.OpenAI) -> None:
    reply = chat(client, max_tokens=120, functions=[WEATHER], function_call={"name": "get_weather"})
    choice = reply.choices[0]
    assert choice.finish_reason == "stop"  # as OpenAI ends a call forced by name; see the next test for the others
    assert choice.message.tool_calls is None
    call = choice.message.function_call
    assert call is not None and call.name == "get_weather"
    assert json.loads(call.arguments)["city"] in ("Paris", "Tokyo")

    chunks = list(chat(client, max_tokens=120, functions=[WEATHER], function_call={"name": "get_weather"},
                       stream=True))  # fmt: skip
    pieces = [c.choices[0].delta.function_call for c in chunks if c.choices and c.choices[0].delta.function_call]
    assert pieces[0].name == "get_weather" and all(p.name is None for p in pieces[1:])
    assert "".join(p.arguments or "" for p in pieces) == call.arguments
    assert not any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_a_call_the_model_chose_finishes_with_function_call() -> None:
    """The worker's `tool_calls` finish (a call under `auto`) is the older `function_call`; the tiny model never
    chooses to call, so the formatter is driven directly."""
    answer = Answer()
    call = ToolCallDelta(index=0, id="call_get_weather", name="get_weather", arguments='{"city": "Paris"}')
    last = Chunk(request_id="r", seq=0, tool_calls=[call], finish_reason=FINISH_TOOL_CALLS)
    answer.add(last)
    formatter = ChatFormatter(request_id="r", model=TINY_MODEL, created=0, include_usage=False, logprobs=False,
                              functions=True)  # fmt: skip
    choice = json.loads(formatter.complete(answer, last).body)["choices"][0]
    assert choice["finish_reason"] == "function_call"
    assert choice["message"]["function_call"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert "tool_calls" not in choice["message"]
    events = formatter.stream_tool_calls([call]) + formatter.stream_end(last)
    deltas = [json.loads(line[6:]) for line in events.decode().split("\n\n") if line.startswith("data: {")]
    assert deltas[0]["choices"][0]["delta"] == {  # the role opens a call's answer with `content: null`
        "role": "assistant",
        "content": None,
        "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    assert deltas[-1]["choices"][0]["finish_reason"] == "function_call"


def test_functions_history_and_none(client: openai.OpenAI) -> None:
    history = [
        *PROMPT,
        {
            "role": "assistant",
            "content": None,
            "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        },
        {"role": "function", "name": "get_weather", "content": "Sunny, 24 C"},
    ]
    reply = chat(client, messages=history, functions=[WEATHER], function_call="none")
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.function_call is None and reply.choices[0].message.content


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"functions": [WEATHER], "tools": [{"type": "function", "function": WEATHER}]}, "functions"),
        ({"functions": [WEATHER], "tool_choice": "auto"}, "function_call"),
        ({"function_call": "auto"}, "function_call"),
        ({"functions": [WEATHER], "function_call": "required"}, "function_call"),
        ({"functions": [WEATHER], "function_call": {"name": "get_time"}}, "function_call"),
        ({"functions": [{"name": "bad name"}]}, "functions[0].name"),
        ({"functions": [WEATHER], "messages": [{"role": "function", "content": "Sunny"}]}, "messages[0].name"),
    ],
)
def test_functions_mistakes_are_400s(gateway: Gateway, extra: dict[str, Any], param: str) -> None:
    body = {"model": TINY_MODEL, "messages": PROMPT, "max_tokens": 2, **extra}
    assert_openai_400(post(gateway, "chat/completions", body), param)


# -- Responses ---------------------------------------------------------------------


def test_responses_metadata_is_echoed_and_stored(client: openai.OpenAI) -> None:
    metadata = {"ticket": "T-1", "team": "search"}
    response = client.responses.create(model=TINY_MODEL, input="Hi", max_output_tokens=4, metadata=metadata,
                                       max_tool_calls=2)  # fmt: skip
    assert response.metadata == metadata and response.max_tool_calls == 2
    assert client.responses.retrieve(response.id).metadata == metadata
    with client.responses.stream(model=TINY_MODEL, input="Hi", max_output_tokens=4, metadata=metadata) as stream:
        events = list(stream)
    assert events[0].response.metadata == metadata  # type: ignore[union-attr]
    assert events[-1].response.metadata == metadata  # type: ignore[union-attr]


def test_responses_fields_without_effect_are_named_in_the_warning(gateway: Gateway) -> None:
    extra = {"service_tier": "auto", "prompt_cache_key": "k", "safety_identifier": "s", "user": "u"}
    body = {"model": TINY_MODEL, "input": "Hi", "max_output_tokens": 2, "truncation": "disabled",
            "background": False, **extra}  # fmt: skip
    response = post(gateway, "responses", body)
    assert response.status_code == 200, response.text
    assert warning(response) == ignored(*extra)
    body = {"model": TINY_MODEL, "input": "Hi", "max_output_tokens": 2, "truncation": "auto",
            "text": {"verbosity": "high"}}  # fmt: skip
    response = post(gateway, "responses", body)
    assert response.status_code == 200, response.text
    assert warning(response) == ignored("text.verbosity", "truncation")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"background": True}, "background"),
        ({"prompt": {"id": "pmpt_123"}}, "prompt"),
        ({"conversation": "conv_123"}, "conversation"),
        ({"moderation": {"model": "omni-moderation-latest"}}, "moderation"),
        ({"truncation": "sometimes"}, "truncation"),
        ({"max_tool_calls": 0}, "max_tool_calls"),
        ({"metadata": {"n": 1}}, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, "metadata"),
        ({"text": {"verbosity": "loud"}}, "text.verbosity"),
    ],
)
def test_responses_fields_cortex_cannot_honour_are_400s(gateway: Gateway, extra: dict[str, Any], param: str) -> None:
    body = {"model": TINY_MODEL, "input": "Hi", "max_output_tokens": 2, **extra}
    assert_openai_400(post(gateway, "responses", body), param)


# -- Anthropic ---------------------------------------------------------------------


def anthropic_body(**extra: Any) -> dict[str, Any]:
    return {"model": TINY_MODEL, "max_tokens": 2, "messages": PROMPT, **extra}


def test_anthropic_effort_is_checked_then_ignored(claude: anthropic.Anthropic, gateway: Gateway) -> None:
    raw = claude.messages.with_raw_response.create(
        model=TINY_MODEL, max_tokens=2, messages=PROMPT,  # type: ignore[arg-type]
        extra_body={"output_config": {"effort": "low"}, "context_management": {"edits": []}},
    )  # fmt: skip
    assert raw.parse().stop_reason == "max_tokens"
    assert raw.headers["warning"] == ignored("context_management", "output_config.effort")
    bad = post(gateway, "messages", anthropic_body(output_config={"effort": "extreme"}))
    assert_anthropic_400(bad, "output_config.effort")


def test_anthropic_cache_control_is_honoured_without_a_warning(gateway: Gateway) -> None:
    block = {"type": "text", "text": "Hello, how are you today?", "cache_control": {"type": "ephemeral"}}
    tool = {**WEATHER, "input_schema": WEATHER["parameters"], "cache_control": {"type": "ephemeral"}}
    del tool["parameters"]
    body = anthropic_body(messages=[{"role": "user", "content": [block]}], tools=[tool])
    first, second = post(gateway, "messages", body), post(gateway, "messages", body)
    assert first.status_code == second.status_code == 200, first.text
    assert warning(first) is None
    assert second.json()["usage"]["cache_read_input_tokens"] > 0  # the prefix cache, with or without hints


def test_anthropic_mcp_servers_are_a_400(gateway: Gateway) -> None:
    servers = [{"type": "url", "url": "https://mcp.example.com/sse", "name": "example"}]
    assert_anthropic_400(post(gateway, "messages", anthropic_body(mcp_servers=servers)), "mcp_servers")
