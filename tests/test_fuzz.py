"""Hostile input: schemathesis against the gateway's own ``/openapi.json``; hypothesis bodies on every POST
route, paths and methods nobody serves, and key and version headers of any shape.

Every request goes to the real session gateway (real nats-server, real tiny-model worker). Whatever
comes in, the answer is never a 5xx, an error is in the route's envelope (an SSE stream's error events
too), and it comes back within `REQUEST_TIMEOUT_S` (the hang detector). Generation is derandomized, so a
run is repeatable; ``CORTEX_FUZZ_EXAMPLES=N`` asks for N examples per operation instead, with fresh
randomness (a longer local hunt). ``pytest -s`` prints how many requests each route was sent
(docs/security.md, Hostile input).
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from cortex.gateway.openapi import DOCUMENT
from tests.conftest import TINY_ALIAS, TINY_MODEL, Gateway

EXPLORE = int(os.environ.get("CORTEX_FUZZ_EXAMPLES", "0"))
SCHEMATHESIS_EXAMPLES = EXPLORE or 25
"""Per operation and generation mode (valid bodies, then invalid ones)."""
BODY_EXAMPLES = EXPLORE or 100
"""Hypothesis bodies per POST route."""
REQUEST_TIMEOUT_S = 30.0
"""Longer than any answer of at most `TOKEN_CAP` tokens from the tiny model: past it, the gateway hangs."""
TOKEN_CAP = 8
"""Valid bodies ask for at most this many tokens, so generation on the CPU stays quick."""
TOKEN_FIELDS = {"max_tokens", "max_completion_tokens", "max_output_tokens", "budget_tokens"}
ANTHROPIC_PREFIX = "/v1/messages"
OPERATIONS = [(method.upper(), path) for path, item in DOCUMENT["paths"].items() for method in item
              if method in ("get", "post", "delete")]  # fmt: skip
POST_ROUTES = [path for method, path in OPERATIONS if method == "POST"]
FUZZ_SETTINGS = settings(
    max_examples=SCHEMATHESIS_EXAMPLES,
    deadline=timedelta(seconds=2 * REQUEST_TIMEOUT_S),  # a backstop: `REQUEST_TIMEOUT_S` catches a hang first
    derandomize=not EXPLORE,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
tried: Counter[str] = Counter()
"""Requests sent, per kind and route: printed when the module ends."""


@pytest.fixture(scope="module", autouse=True)
def report_counts() -> Iterator[None]:
    yield
    lines = [f"  {count:5d}  {what}" for what, count in sorted(tried.items())]
    print(f"\nfuzz requests sent: {sum(tried.values())}\n" + "\n".join(lines))


def check_answer(path: str, status: int, content_type: str, body: bytes, what: object) -> None:
    """No 5xx; a 4xx in the route's envelope; a stream whose events are JSON and none an internal error."""
    assert status < 500, f"{status} for {what!r}: {body[:500]!r}"
    if status >= 400:
        check_envelope(path, json.loads(body), what)
    elif content_type.startswith("text/event-stream"):
        for line in body.decode().splitlines():
            if line.startswith("data:") and line != "data: [DONE]":
                event = json.loads(line[len("data:") :])
                if "error" in event:
                    check_envelope(path, event, what)
                    assert event["error"]["type"] not in ("server_error", "api_error"), f"{event} for {what!r}"


def check_envelope(path: str, body: Any, what: object) -> None:
    error = body.get("error") if isinstance(body, dict) else None
    assert isinstance(error, dict), f"no error object in {body!r} for {what!r}"
    assert isinstance(error.get("message"), str) and isinstance(error.get("type"), str), f"{body!r} for {what!r}"
    if path.startswith(ANTHROPIC_PREFIX):
        assert body.get("type") == "error", f"not Anthropic's envelope: {body!r} for {what!r}"


def fuzzing_document(served: dict[str, Any]) -> dict[str, Any]:
    """The served document, narrowed so that valid bodies reach the worker: the tiny model, few tokens."""
    document = copy.deepcopy(served)
    for schema in document["components"]["schemas"].values():
        properties = schema.get("properties", {})
        if "model" in properties and {"messages", "prompt", "input"} & properties.keys():
            properties["model"] = {"type": "string", "enum": [TINY_MODEL, TINY_ALIAS, "no-such-model"]}
        limit = next((name for name in ("max_tokens", "max_output_tokens") if name in properties), None)
        if limit is not None and limit not in schema.get("required", []):
            schema.setdefault("required", []).append(limit)  # the default is the rest of the context: too long
    for item in _walk(document):
        for name, field in item.get("properties", {}).items():
            if name in TOKEN_FIELDS and isinstance(field, dict):
                field["maximum"] = TOKEN_CAP
    return document


def _walk(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        yield value
        for child in value.values():
            yield from _walk(child)
    elif isinstance(value, list):
        for child in value:
            yield from _walk(child)


@pytest.fixture(scope="module")
def api_schema(gateway: Gateway) -> schemathesis.BaseSchema:
    served = httpx.get(f"{gateway.root_url}/openapi.json", timeout=REQUEST_TIMEOUT_S)
    assert served.status_code == 200
    return schemathesis.openapi.from_dict(fuzzing_document(served.json()))


POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE


# Only a body can be invalid: a path parameter is any string, and the GET routes take nothing else.
@pytest.mark.parametrize(
    ("method", "path", "mode"),
    [(method, path, POSITIVE) for method, path in OPERATIONS] + [("POST", path, NEGATIVE) for path in POST_ROUTES],
)
def test_schemathesis(
    gateway: Gateway, api_schema: schemathesis.BaseSchema, method: str, path: str, mode: schemathesis.GenerationMode
) -> None:
    operation = api_schema[path][method]
    session = requests.Session()

    @FUZZ_SETTINGS
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        tried[f"schemathesis {mode.value:8s} {method} {path}"] += 1
        response = case.call(base_url=gateway.root_url, session=session, timeout=REQUEST_TIMEOUT_S)
        what = f"{case.method} {case.formatted_path} {case.body!r}"
        content_type = response.headers.get("content-type", [""])[0]
        check_answer(path, response.status_code, content_type, response.content, what)
        case.validate_response(
            response,
            checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance],
        )

    try:
        run()
    finally:
        session.close()


SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
VALID_BODIES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {
        "model": TINY_MODEL, "max_tokens": TOKEN_CAP, "temperature": 0.5, "top_p": 0.9, "seed": 1, "stop": ["\n\n"],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
        ],
        "tools": [{"type": "function", "function": {"name": "weather", "description": "d", "parameters": SCHEMA}}],
        "tool_choice": "auto", "logit_bias": {"1": 0}, "logprobs": True, "top_logprobs": 2, "user": "u",
        "stream": False, "stream_options": {"include_usage": True}, "metadata": {"k": "v"}, "reasoning_effort": "low",
        "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}},
    },
    "/v1/completions": {
        "model": TINY_MODEL, "prompt": "Once upon a time", "max_tokens": TOKEN_CAP, "temperature": 0.5, "stop": "\n",
        "logprobs": 2, "logit_bias": {"1": 0}, "seed": 1, "stream": False, "n": 1, "echo": False,
    },
    "/v1/responses": {
        "model": TINY_MODEL, "instructions": "Be brief.", "max_output_tokens": TOKEN_CAP, "store": False,
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
            {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": '{"city": "Paris"}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"},
        ],
        "tools": [{"type": "function", "name": "weather", "parameters": SCHEMA}], "tool_choice": "auto",
        "text": {"format": {"type": "json_object"}}, "reasoning": {"effort": "low"}, "metadata": {"k": "v"},
        "include": ["message.output_text.logprobs"], "top_logprobs": 2, "truncation": "disabled", "stream": False,
    },
    "/v1/messages": {
        "model": TINY_MODEL, "max_tokens": TOKEN_CAP, "system": [{"type": "text", "text": "Be brief."}],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "weather",
                                               "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"}]},
        ],
        "tools": [{"name": "weather", "description": "d", "input_schema": SCHEMA}], "tool_choice": {"type": "auto"},
        "temperature": 0.5, "top_k": 5, "stop_sequences": ["\n\n"], "thinking": {"type": "disabled"},
        "output_config": {"effort": "low"}, "metadata": {"user_id": "u"}, "stream": False,
    },
}  # fmt: skip
VALID_BODIES["/v1/messages/count_tokens"] = {k: v for k, v in VALID_BODIES["/v1/messages"].items() if k != "max_tokens"}

ODD_TEXT = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=20),  # lone surrogates, controls, RTL marks
    st.sampled_from(
        ["", "\x00", "<|im_end|>", "<tool_call>", "{{ raise_exception('x') }}", "%s%n", "\u202e", "\U0001d54f"]
    ),
    st.integers(1, 200_000).map(lambda n: "é" * n),  # past the context (and past 64 KiB)
)
HUGE = st.sampled_from([2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, 2**64 + 1, -(2**63) - 1, 10**40, -(10**400),
                        1e308, -1e308, 5e-324, -0.0, float("inf"), float("nan")])  # fmt: skip


class Deep:
    """A value nested `levels` deep, past what `json.dumps` can write: `_encode` puts it in as text."""

    def __init__(self, levels: int, opener: str) -> None:
        self.levels, self.opener = levels, opener

    def text(self) -> str:
        closer = "]" * self.levels if self.opener == "[" else "}" * self.levels
        return (self.opener * self.levels if self.opener == "[" else '{"a":' * self.levels) + "1" + closer


DEEP = st.builds(Deep, st.integers(50, 3000), st.sampled_from(["[", "{"]))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), HUGE, ODD_TEXT, DEEP)
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ODD_TEXT, inner, max_size=4), max_leaves=12
)


def _paths(value: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in `value` a field or an item sits."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield (*at, key)
        yield from _paths(child, (*at, key))


@st.composite
def mutated(draw: st.DrawFn, path: str) -> bytes:
    """The route's valid body with one to three fields (at any depth) replaced by hostile values, dropped, or added."""
    body = copy.deepcopy(VALID_BODIES[path])
    for _ in range(draw(st.integers(1, 3))):
        place = draw(st.sampled_from(list(_paths(body)) or [("model",)]))
        parent = body
        for key in place[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "replace", "drop", "add"]))
        if action == "drop":
            del parent[place[-1]]
        elif action == "add" and isinstance(parent, dict):
            parent[draw(ODD_TEXT)] = draw(JSON_VALUES)
        else:
            parent[place[-1]] = draw(JSON_VALUES)
        if not isinstance(body, dict) or not body:
            break
    return _encode(body, draw(st.booleans()))


_DEEP_PLACEHOLDER = re.compile(r'"\\u0000deep(\d+)\\u0000"')


def _encode(value: Any, ascii_only: bool) -> bytes:
    deep: list[Deep] = []

    def placeholder(item: object) -> str:
        assert isinstance(item, Deep)
        deep.append(item)
        return f"\0deep{len(deep) - 1}\0"

    text = json.dumps(value, ensure_ascii=ascii_only, default=placeholder)
    text = _DEEP_PLACEHOLDER.sub(lambda match: deep[int(match.group(1))].text(), text)
    # surrogatepass: a lone surrogate becomes bytes that are not UTF-8, as a hostile client may send.
    return text.encode("utf-8", "surrogatepass")


def hostile_bodies(path: str) -> st.SearchStrategy[bytes]:
    return st.one_of(
        mutated(path),
        mutated(path),
        mutated(path),
        st.builds(_encode, JSON_VALUES, st.booleans()),  # any JSON at all, not only an object
        st.binary(max_size=64),  # not JSON
        st.builds(lambda body, cut: body[:cut], mutated(path), st.integers(0, 400)),  # cut short
    )


PANICKING_SCHEMA = {"type": "object", "required": {"": False, "é" * 45: None}}
"""Found by this fuzzer: llguidance panicked quoting it (a 500 from every route that takes a JSON schema)."""
SCHEMA_PLACES = {
    "/v1/chat/completions": ("tools", 0, "function", "parameters"),
    "/v1/responses": ("tools", 0, "parameters"),
    "/v1/messages": ("tools", 0, "input_schema"),
    "/v1/messages/count_tokens": ("tools", 0, "input_schema"),
}


OVERSIZED = b'{"model": "%s", "prompt": "%s"}' % (TINY_MODEL.encode(), b"x" * 9_000_000)
"""Past the broker's 8 MB message limit: a 413, never a broker error."""


def found_before(path: str) -> list[bytes]:
    """Bodies that once broke the route, and one too large for the broker: tried first on every run."""
    if path not in SCHEMA_PLACES:
        return [OVERSIZED]
    body = copy.deepcopy(VALID_BODIES[path])
    *to, last = SCHEMA_PLACES[path]
    parent = body
    for key in to:
        parent = parent[key]
    parent[last] = PANICKING_SCHEMA
    return [OVERSIZED, *(_encode(body, ascii_only) for ascii_only in (True, False))]


@pytest.mark.parametrize("path", POST_ROUTES)
def test_hypothesis_bodies(gateway: Gateway, path: str) -> None:
    assert path in VALID_BODIES, "a POST route the body fuzzer does not know"
    with httpx.Client(base_url=gateway.root_url, timeout=REQUEST_TIMEOUT_S) as client:
        valid = client.post(path, json=VALID_BODIES[path])
        assert valid.status_code == 200, valid.text  # the mutations start from a body that works
        for body in found_before(path):
            tried[f"hypothesis bodies    POST {path}"] += 1
            response = client.post(path, content=body, headers={"Content-Type": "application/json"})
            check_answer(path, response.status_code, response.headers.get("content-type", ""), response.content, body)

        @settings(FUZZ_SETTINGS, max_examples=BODY_EXAMPLES)
        @given(body=hostile_bodies(path))
        def run(body: bytes) -> None:
            tried[f"hypothesis bodies    POST {path}"] += 1
            response = client.post(path, content=body, headers={"Content-Type": "application/json"})
            check_answer(path, response.status_code, response.headers.get("content-type", ""), response.content, body)

        run()


SEGMENT = st.text(st.characters(codec="utf-8", exclude_characters="/?#"), min_size=1, max_size=12)


@settings(FUZZ_SETTINGS, max_examples=BODY_EXAMPLES)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
    prefix=st.sampled_from(["/v1", "/v1/messages", "/v1/models", "/v1/responses", "", "/v1/chat"]),
    segments=st.lists(SEGMENT, max_size=3),
)
def test_unknown_routes_and_methods(gateway: Gateway, method: str, prefix: str, segments: list[str]) -> None:
    """What no route serves, or serves with another method, is a 404 or 405 in the envelope of the API it is under."""
    path = "/".join([prefix, *segments]) or "/"
    tried["hypothesis routes    unknown paths, other methods"] += 1
    response = httpx.request(method, f"{gateway.root_url}{quote(path)}", content=b"{}", timeout=REQUEST_TIMEOUT_S)
    check_answer(path, response.status_code, response.headers.get("content-type", ""), response.content, path)


HEADER_VALUE = st.one_of(
    # What HTTP lets through: visible ASCII, spaces and tabs inside, and any byte from 0x80 on (not text).
    st.binary(max_size=300).map(lambda raw: bytes(b for b in raw if b == 9 or 32 <= b != 127).strip()),
    st.sampled_from([b"Bearer", b"Bearer  sk-", b"bearer sk-x", b"Basic eDp5", b"sk-" + b"x" * 8000, b"\xff\xfe"]),
)
HEADER_NAME = st.sampled_from(["Authorization", "x-api-key", "anthropic-version", "anthropic-beta", "Content-Type"])


@settings(FUZZ_SETTINGS, max_examples=BODY_EXAMPLES)
@given(
    headers=st.dictionaries(HEADER_NAME, HEADER_VALUE, min_size=1), route=st.sampled_from([*POST_ROUTES, "/v1/models"])
)
def test_hostile_headers(gateway: Gateway, headers: dict[str, bytes], route: str) -> None:
    """Keys and versions of any shape (bytes that are not text, 8,000 characters) on the routes that read them."""
    tried["hypothesis headers   keys, versions, content types"] += 1
    method, body = ("GET", None) if route == "/v1/models" else ("POST", VALID_BODIES[route])
    response = httpx.request(
        method, f"{gateway.root_url}{route}", json=body, headers=headers, timeout=REQUEST_TIMEOUT_S
    )
    check_answer(route, response.status_code, response.headers.get("content-type", ""), response.content, headers)
