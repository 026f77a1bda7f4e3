"""JSON output enforced by constrained decoding in the worker, from every dialect."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import anthropic
import httpx
import openai
import pytest

from tests.conftest import TINY_MODEL, Gateway

pytestmark = pytest.mark.usefixtures("gateway")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "admin": {"type": "boolean"},
    },
    "required": ["name", "age", "admin"],
    "additionalProperties": False,
}


def valid_person(text: str) -> bool:
    value = json.loads(text)
    return (
        set(value) == {"name", "age", "admin"}
        and isinstance(value["name"], str) and len(value["name"]) <= 8
        and isinstance(value["age"], int) and 0 <= value["age"] <= 120
        and isinstance(value["admin"], bool)
    )  # fmt: skip


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=60,
                         _strict_response_validation=True)  # fmt: skip


def test_json_schema_always_validates_even_from_a_random_model(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    def one(seed: int) -> str:
        reply = client.chat.completions.create(
            model=TINY_MODEL, messages=[{"role": "user", "content": "Who are you?"}], temperature=1.0, seed=seed,
            max_tokens=200, response_format=fmt,  # type: ignore[arg-type]
        )  # fmt: skip
        assert reply.choices[0].finish_reason == "stop"
        return reply.choices[0].message.content or ""

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(one, range(12)))
    assert all(valid_person(a) for a in answers), answers
    assert len(set(answers)) > 1  # sampled, not one canned answer


def test_json_schema_in_a_stream(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    stream = client.chat.completions.create(
        model=TINY_MODEL, messages=[{"role": "user", "content": "JSON please"}], max_tokens=200, stream=True,
        response_format=fmt, temperature=0.7, seed=3,  # type: ignore[arg-type]
    )  # fmt: skip
    chunks = [c for c in stream if c.choices]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert valid_person("".join(c.choices[0].delta.content or "" for c in chunks))


def test_json_object_is_an_object_prefix(client: openai.OpenAI) -> None:
    # Any object: a random model may write one long string until max_tokens, so only
    # a finished answer must parse; a cut one is still the start of an object.
    reply = client.chat.completions.create(
        model=TINY_MODEL, messages=[{"role": "user", "content": "JSON please"}], max_tokens=60, temperature=0.7,
        seed=5, response_format={"type": "json_object"},
    )  # fmt: skip
    text = reply.choices[0].message.content or ""
    assert text.lstrip().startswith("{")
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_responses_text_format(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=TINY_MODEL, input="Who are you?", max_output_tokens=200, temperature=1.0,
        text={"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}},
    )  # fmt: skip
    assert response.status == "completed" and valid_person(response.output_text)
    assert response.text is not None and response.text.format.type == "json_schema"  # type: ignore[union-attr]


def test_anthropic_output_config_format(gateway: Gateway) -> None:
    claude = anthropic.Anthropic(base_url=gateway.root_url, api_key="k", max_retries=0, timeout=60,
                                 _strict_response_validation=True)  # fmt: skip
    message = claude.messages.create(
        model=TINY_MODEL, max_tokens=200, messages=[{"role": "user", "content": "Who are you?"}],
        extra_body={"output_config": {"format": {"type": "json_schema", "schema": PERSON}, "effort": "low"}},
    )  # fmt: skip
    assert message.stop_reason == "end_turn"
    assert valid_person(message.content[0].text)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("fmt", "param"),
    [
        ({"type": "xml"}, "response_format"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.schema"),
        (
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}},
            "response_format.schema",
        ),
        (  # compiles, but no finite value matches it: the worker's grammar would fail mid-answer
            {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#"}}},
            "response_format.schema",
        ),
    ],
)
def test_bad_formats_are_400(gateway: Gateway, fmt: dict[str, object], param: str) -> None:
    body = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "x"}], "response_format": fmt}
    response = httpx.post(f"{gateway.base_url}/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_recursive_schema_with_an_end_is_accepted(client: openai.OpenAI) -> None:
    tree = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
            "children": {"type": "array", "items": {"$ref": "#"}, "maxItems": 2}}, "required": ["name"]}  # fmt: skip
    reply = client.chat.completions.create(
        model=TINY_MODEL, messages=[{"role": "user", "content": "A tree"}], max_tokens=200, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "tree", "schema": tree}},
    )  # fmt: skip
    assert reply.choices[0].finish_reason in ("stop", "length")
    if reply.choices[0].finish_reason == "stop":
        assert "name" in json.loads(reply.choices[0].message.content or "")
