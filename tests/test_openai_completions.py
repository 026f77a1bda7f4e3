"""OpenAI legacy `/v1/completions` through the official SDK: the raw prompt, no chat template."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.conftest import TINY_MODEL, Gateway

pytestmark = pytest.mark.usefixtures("gateway")
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=60,
                         _strict_response_validation=True)  # fmt: skip


def test_completion(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=TINY_MODEL, prompt=PROMPT, temperature=0, max_tokens=12)
    assert reply.object == "text_completion" and reply.model == TINY_MODEL
    assert reply.choices[0].finish_reason == "length" and reply.choices[0].text
    assert reply.usage is not None and reply.usage.completion_tokens == 12


def test_default_max_tokens_is_16_and_prompt_is_raw(client: openai.OpenAI) -> None:
    raw = client.completions.create(model=TINY_MODEL, prompt=PROMPT, temperature=0)
    chat = client.chat.completions.create(
        model=TINY_MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=1
    )
    assert raw.usage is not None and chat.usage is not None
    assert raw.usage.completion_tokens == 16
    # The chat template wraps the same text in role markers; the raw prompt has none.
    assert raw.usage.prompt_tokens < chat.usage.prompt_tokens


def test_stream_matches_and_reports_usage(client: openai.OpenAI, gateway: Gateway) -> None:
    expected = (
        client.completions.create(model=TINY_MODEL, prompt=[PROMPT], temperature=0, max_tokens=12).choices[0].text
    )
    # The SDK types a streamed chunk's `finish_reason` as never null, but the real API sends
    # null until the last chunk (as the gateway does): this one client validates loosely.
    loose = openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=60)
    chunks = list(
        loose.completions.create(
            model=TINY_MODEL,
            prompt=PROMPT,
            temperature=0,
            max_tokens=12,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    *body, last = chunks
    assert "".join(c.choices[0].text for c in body if c.choices) == expected
    assert body[-1].choices[0].finish_reason == "length"
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens == 12


def test_stop(client: openai.OpenAI) -> None:
    full = client.completions.create(model=TINY_MODEL, prompt=PROMPT, temperature=0, max_tokens=40).choices[0].text
    stop = full[8:11]
    reply = client.completions.create(model=TINY_MODEL, prompt=PROMPT, temperature=0, max_tokens=40, stop=[stop])
    assert reply.choices[0].text == full[: full.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"echo": True}, "echo"),
        ({"n": 2}, "n"),
        ({"best_of": 3}, "best_of"),
        ({"logprobs": 6}, "logprobs"),
        ({"suffix": "end"}, "suffix"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_unsupported_or_bad_parameters_are_400(gateway: Gateway, extra: dict[str, object], param: str) -> None:
    body = {"model": TINY_MODEL, "prompt": PROMPT, **extra}
    response = httpx.post(f"{gateway.base_url}/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_empty_prompt_is_400(gateway: Gateway) -> None:
    response = httpx.post(f"{gateway.base_url}/completions", json={"model": TINY_MODEL, "prompt": ""}, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "prompt"


def test_a_prompt_over_the_context_names_prompt(gateway: Gateway) -> None:
    body = {"model": TINY_MODEL, "prompt": "x " * 5000, "max_tokens": 4}
    response = httpx.post(f"{gateway.base_url}/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert response.json()["error"]["param"] == "prompt"
