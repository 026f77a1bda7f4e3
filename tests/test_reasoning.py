"""Reasoning models: thinking separated from the answer in every dialect, budgets, and constraints after thinking.

The tiny model gets a DeepSeek-R1-style chat template that opens ``<think>`` at
the end of the prompt (and, like Qwen3's, closes it at once when thinking is
switched off), so its random output starts inside the thinking: what the worker
does with it is then deterministic.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import anthropic
import openai
import pytest

from cortex.broker.server import EmbeddedNats
from tests.conftest import Gateway, ready_models, start_worker, stop_process, wait_for

THINKER = "tiny-thinker"
TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\n\n</think>\n\n' }}"
    "{% else %}{{ '<think>\n' }}{% endif %}{% endif %}"
)
ASK = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def thinker(
    nats_server: EmbeddedNats, gateway: Gateway, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory,
    logs_dir: Path,
) -> Iterator[None]:  # fmt: skip
    folder = tmp_path_factory.mktemp("thinker")
    for item in tiny_model_dir.iterdir():
        shutil.copy(item, folder / item.name)
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    catalogue = folder / "models.toml"
    catalogue.write_text(f'[[models]]\nid = "{THINKER}"\npath = "{folder}"\ndtype = "float32"\n')
    proc = start_worker(nats_server.url, catalogue, logs_dir / "thinker-worker.log", "--model", THINKER, "--device",
                        "cpu", "--slots", "2", "--worker-id", "thinker")  # fmt: skip
    wait_for(lambda: THINKER in ready_models(gateway.base_url), timeout=120, what="thinker ready", proc=proc)
    yield
    stop_process(proc)


@pytest.fixture(scope="module")
def client(gateway: Gateway, thinker: None) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=60,
                         _strict_response_validation=True)  # fmt: skip


@pytest.fixture(scope="module")
def claude(gateway: Gateway, thinker: None) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.root_url, api_key="unused", max_retries=0, timeout=60,
                               _strict_response_validation=True)  # fmt: skip


def test_models_list_says_the_model_reasons(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert models[THINKER].model_extra["supports"]["reasoning"] is True  # type: ignore[index]
    assert models["tiny-llama"].model_extra["supports"]["reasoning"] is False  # type: ignore[index]


def test_chat_reasoning_content_is_apart_from_the_answer(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=THINKER, messages=ASK, temperature=0, max_tokens=16)  # type: ignore[arg-type]
    message = reply.choices[0].message
    thought = message.model_extra["reasoning_content"]  # type: ignore[index]
    assert thought and "<think>" not in thought and "</think>" not in thought
    assert message.content == ""  # still thinking when the tokens ran out
    assert reply.usage and reply.usage.completion_tokens_details
    assert reply.usage.completion_tokens_details.reasoning_tokens == reply.usage.completion_tokens == 16
    stream = client.chat.completions.create(model=THINKER, messages=ASK, temperature=0, max_tokens=16, stream=True)  # type: ignore[arg-type]
    pieces = [c.delta for chunk in stream for c in chunk.choices]
    assert "".join((d.model_extra or {}).get("reasoning_content", "") for d in pieces) == thought
    assert [d.role for d in pieces if d.role] == ["assistant"]
    assert not "".join(d.content or "" for d in pieces)


def test_reasoning_effort_none_switches_thinking_off(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(model=THINKER, messages=ASK, temperature=0, max_tokens=8,  # type: ignore[arg-type]
                                           reasoning_effort="none")  # fmt: skip
    assert "reasoning_content" not in (reply.choices[0].message.model_extra or {})
    assert reply.choices[0].message.content
    assert reply.usage and reply.usage.completion_tokens_details
    assert reply.usage.completion_tokens_details.reasoning_tokens == 0


def test_anthropic_thinking_block_with_budget(claude: anthropic.Anthropic) -> None:
    params = {"model": THINKER, "max_tokens": 40, "messages": ASK, "thinking": {"type": "enabled", "budget_tokens": 6},
              "extra_body": {"temperature": 0}}  # fmt: skip
    reply = claude.messages.create(**params)  # type: ignore[call-overload]
    assert [b.type for b in reply.content] == ["thinking", "text"]
    assert reply.content[0].thinking and reply.content[1].text
    assert "</think>" not in reply.content[0].thinking + reply.content[1].text
    assert reply.stop_reason == "max_tokens"
    with claude.messages.stream(**params) as stream:  # type: ignore[arg-type]
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert "thinking" in events and "text" in events
    assert [(b.type, getattr(b, "thinking", None), getattr(b, "text", None)) for b in final.content] == [
        (b.type, getattr(b, "thinking", None), getattr(b, "text", None)) for b in reply.content
    ]


def test_anthropic_without_thinking_shows_no_thinking_block(claude: anthropic.Anthropic) -> None:
    reply = claude.messages.create(model=THINKER, max_tokens=12, messages=ASK,  # type: ignore[arg-type]
                                   extra_body={"temperature": 0})  # fmt: skip
    assert [b.type for b in reply.content] == ["text"]
    assert reply.content[0].text == ""  # the model thought all along; Anthropic hides thinking it was not asked for


def test_structured_output_starts_after_the_thinking(claude: anthropic.Anthropic) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Lyon"]}},
              "required": ["city"], "additionalProperties": False}  # fmt: skip
    reply = claude.messages.create(
        model=THINKER, max_tokens=60, messages=ASK, thinking={"type": "enabled", "budget_tokens": 5},  # type: ignore[arg-type]
        output_config={"format": {"type": "json_schema", "schema": schema}}, extra_body={"temperature": 0},  # type: ignore[call-arg]
    )  # fmt: skip
    assert reply.stop_reason == "end_turn"
    assert [b.type for b in reply.content] == ["thinking", "text"]
    assert json.loads(reply.content[1].text)["city"] in ("Paris", "Lyon")  # type: ignore[union-attr]


def test_responses_reasoning_item(client: openai.OpenAI) -> None:
    response = client.responses.create(model=THINKER, input="Capital of France?", temperature=0, max_output_tokens=10)
    assert [item.type for item in response.output] == ["reasoning", "message"]
    reasoning = response.output[0]
    assert reasoning.type == "reasoning" and reasoning.content and reasoning.content[0].text
    assert response.usage and response.usage.output_tokens_details.reasoning_tokens == 10
    with client.responses.stream(model=THINKER, input="Capital of France?", temperature=0,
                                 max_output_tokens=10) as stream:  # fmt: skip
        events = list(stream)
    kinds = [e.type for e in events]
    assert "response.reasoning_text.delta" in kinds and "response.reasoning_text.done" in kinds
    streamed = events[-1].response  # type: ignore[union-attr]  # response.incomplete: cut by max_output_tokens
    stored = client.responses.retrieve(streamed.id)
    assert stored.model_dump()["output"] == streamed.model_dump()["output"]  # what was stored is what was seen


@pytest.mark.parametrize(
    "thinking",
    [{"type": "enabled"}, {"type": "enabled", "budget_tokens": 100}, {"type": "sometimes"}],
)
def test_bad_thinking_is_400(claude: anthropic.Anthropic, thinking: dict[str, object]) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        claude.messages.create(model=THINKER, max_tokens=50, messages=ASK, thinking=thinking)  # type: ignore[arg-type]
    assert "thinking." in caught.value.message
