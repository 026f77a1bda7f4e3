"""The worker's tool-call parser and tool rendering, without a model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cortex.protocol import Message, Tool, ToolCall, ToolCallDelta
from cortex.worker.tool_parser import ToolCallParser
from cortex.worker.tool_prompt import HERMES, LLAMA3, ToolSyntax, chat_turns, detect_syntax

TOOLS = [Tool(name="get_weather", description="Weather", parameters='{"type": "object"}')]
ANSWER = (
    "Let me check.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Pa\\"ris <x>", "days": [1, {"a": "}"}]}}\n'
    "</tool_call>\n<tool_call>\n"
    '{"arguments": {}, "name": "get_time"}\n</tool_call>\n'
)
# Qwen2.5's way of rendering tools, reduced to what matters here.
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>"
    "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOOL_ROLE_TEMPLATE = TOOLS_TEMPLATE.replace("{{ m.role }}", "{{ 'tool' if m.role == 'tool' else m.role }}")


def parse(syntax: ToolSyntax, pieces: list[str]) -> tuple[str, dict[int, ToolCallDelta], dict[int, str]]:
    parser = ToolCallParser(syntax)
    text, deltas = [], []
    for piece in pieces:
        out, more = parser.push(piece)
        text.append(out)
        deltas += more
    out, more, tail = parser.finish()
    text.append(out + tail)
    deltas += more
    heads = {d.index: d for d in deltas if d.id}
    arguments: dict[int, str] = {}
    for d in deltas:
        arguments[d.index] = arguments.get(d.index, "") + d.arguments
    return "".join(text), heads, arguments


def split(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]


@given(st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
def test_hermes_calls_come_out_whole_however_the_text_is_cut(cuts: list[int]) -> None:
    text, heads, arguments = parse(HERMES, split(ANSWER, cuts))
    assert text == "Let me check.\n"
    assert [heads[i].name for i in sorted(heads)] == ["get_weather", "get_time"]
    assert json.loads(arguments[0]) == {"city": 'Pa"ris <x>', "days": [1, {"a": "}"}]}
    assert json.loads(arguments[1]) == {}
    assert len({h.id for h in heads.values()}) == 2


def test_arguments_stream_before_the_call_closes() -> None:
    parser = ToolCallParser(HERMES)
    _, deltas = parser.push('<tool_call>\n{"name": "f", "arguments": {"a": 1')
    assert [d.name for d in deltas if d.id] == ["f"]
    assert "".join(d.arguments for d in deltas) == '{"a": 1'
    assert parser.completed == 0
    _, deltas = parser.push("}}")
    assert "".join(d.arguments for d in deltas) == "}"
    assert parser.completed == 1


@pytest.mark.parametrize(
    ("answer", "text"),
    [
        ("a < b and <tool_c", "a < b and <tool_c"),  # a tag's beginning that never completes is text
        ("x <tool_call>not json</tool_call> y", "x <tool_call>not json</tool_call> y"),
        ("plain answer", "plain answer"),
    ],
)
def test_what_is_not_a_call_stays_text(answer: str, text: str) -> None:
    out, heads, _ = parse(HERMES, list(answer))
    assert out == text
    assert not heads


def test_a_list_of_calls_in_one_tag() -> None:
    answer = '<tool_call>[{"name": "a", "arguments": {}}, {"name": "b", "arguments": {"q": 1}}]</tool_call>'
    text, heads, arguments = parse(HERMES, [answer])
    assert text == ""
    assert [heads[0].name, heads[1].name] == ["a", "b"]
    assert json.loads(arguments[1]) == {"q": 1}


def test_llama3_bare_json_call_and_plain_text() -> None:
    text, heads, arguments = parse(LLAMA3, list(' {"name": "f", "parameters": {"x": [1, 2]}}'))
    assert text == "" and heads[0].name == "f" and json.loads(arguments[0]) == {"x": [1, 2]}
    text, heads, _ = parse(LLAMA3, ["The answer is ", '{"name": 1}'])
    assert text == 'The answer is {"name": 1}' and not heads
    text, heads, _ = parse(LLAMA3, ['{"a": 1}'])
    assert text == '{"a": 1}' and not heads


def test_syntax_detection() -> None:
    assert detect_syntax(TOOLS_TEMPLATE) is HERMES
    assert detect_syntax("{{ '<|python_tag|>' }}") is LLAMA3
    assert detect_syntax("plain chatml") is HERMES
    assert detect_syntax("<tool_call>", "llama3") is LLAMA3


CONVERSATION = [
    Message(role="user", content="Weather?"),
    Message(role="assistant", tool_calls=[ToolCall(id="c1", name="get_weather", arguments='{"city": "Paris"}')]),
    Message(role="tool", content="Sunny", tool_call_id="c1"),
    Message(role="tool", content="no such city", tool_call_id="c2", is_error=True),
]


def test_template_without_tools_gets_them_described_in_hermes_form() -> None:
    turns, template_tools = chat_turns(CONVERSATION, TOOLS, "chatml without them", HERMES)
    assert template_tools is None
    assert turns[0]["role"] == "system" and "<tools>" in turns[0]["content"] and "get_weather" in turns[0]["content"]
    assert turns[2] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    }
    assert turns[3]["role"] == "user"  # both results in one turn
    assert turns[3]["content"] == (
        "<tool_response>\nSunny\n</tool_response>\n<tool_response>\nError: no such city\n</tool_response>"
    )
    assert len(turns) == 4


def test_template_with_tools_renders_them_itself() -> None:
    turns, template_tools = chat_turns(CONVERSATION, TOOLS, TOOL_ROLE_TEMPLATE, HERMES)
    assert template_tools == [{"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                                                "parameters": {"type": "object"}}}]  # fmt: skip
    assert turns[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert turns[2] == {"role": "tool", "content": "Sunny", "tool_call_id": "c1", "name": "get_weather"}


def test_render_prompt_through_a_real_tokenizer(tiny_model_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    from cortex.worker.catalogue import ModelSpec
    from cortex.worker.loader import LoadedModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = TOOLS_TEMPLATE
    loaded = LoadedModel(spec=ModelSpec(id="t", path=str(tiny_model_dir)), model=None, tokenizer=tokenizer,
                         device=torch.device("cpu"), context_length=4096, eos_ids=frozenset())  # fmt: skip
    text = tokenizer.decode(loaded.render_prompt(CONVERSATION, TOOLS))
    assert text.startswith("<|im_start|>system\n# Tools\n<tools>")
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>' in text
    assert text.endswith("<|im_start|>assistant\n")


def test_a_repeated_call_ends_the_answer_and_is_dropped() -> None:
    call = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n'
    other = '<tool_call>\n{"name": "f", "arguments": {"a": 2}}\n</tool_call>\n'
    parser = ToolCallParser(HERMES)
    _, first = parser.push(call + other)
    _, second = parser.push("")  # what follows a closed call waits for the next push
    assert [d.index for d in first + second if d.id] == [0, 1]
    _, again = parser.push(call.replace('"a": 1', '"a":1'))  # the same call, written differently
    assert again == [] and parser.repeated
    assert parser.push("more text") == ("", [])
    assert parser.calls == 2 and parser.completed == 2


def test_calls_cut_off_by_the_token_limit() -> None:
    parser = ToolCallParser(HERMES)
    parser.push('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>\n{"name": "g", "argu')
    assert parser.finish(truncated=True) == ("", [], "")  # nothing of the second call went out, nothing will
    assert parser.calls == 1
    parser = ToolCallParser(HERMES)
    _, deltas = parser.push('<tool_call>\n{"name": "f", "arguments": {"a": ')
    assert parser.finish(truncated=True) == ("", [], "")
    assert deltas[0].name == "f" and parser.calls == 1 and parser.completed == 0  # the finish reason says: cut
    parser = ToolCallParser(HERMES)
    parser.push('<tool_call>\n{"na')
    assert parser.finish(truncated=True) == ("", [], "") and parser.calls == 0
    parser = ToolCallParser(HERMES)
    parser.push('<tool_call>\n{"na')
    assert parser.finish() == ('<tool_call>\n{"na', [], "")  # the model stopped there: it was text


def test_a_closing_tag_inside_an_argument_string_is_text() -> None:
    answer = '<tool_call>\n{"name": "f", "arguments": {"html": "</tool_call>"}}\n</tool_call>'
    text, heads, arguments = parse(HERMES, list(answer))
    assert text == "" and heads[0].name == "f"
    assert json.loads(arguments[0]) == {"html": "</tool_call>"}


def test_text_after_a_call_comes_after_it() -> None:
    parser = ToolCallParser(HERMES)
    text, deltas = parser.push('<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\nDone.')
    assert text == "" and deltas  # "Done." waits: it must not overtake the call
    assert parser.finish() == ("\nDone.", [], "")  # after the calls already sent


def test_llama3_json_that_is_not_a_call_of_an_offered_tool_is_text() -> None:
    names = frozenset({"get_weather"})
    for answer in ('{"name": "Bob", "age": 3}', '{"name": "Bob", "parameters": {}}'):
        parser = ToolCallParser(LLAMA3, names=names)
        text, deltas = parser.push(answer)
        tail, more, after = parser.finish()
        assert text + tail + after == answer and not deltas + more
    parser = ToolCallParser(LLAMA3, names=names)
    _, deltas = parser.push('{"name": "get_weather", "parameters": {"city": "Paris"}}')
    assert deltas[0].name == "get_weather"


def test_tool_schemas_with_local_refs_compile() -> None:
    from llguidance import LLMatcher

    from cortex.protocol import ToolChoice
    from cortex.worker.tool_grammar import tool_grammar

    params = {"type": "object", "properties": {"loc": {"$ref": "#/$defs/Loc"}, "kids": {"type": "array",
              "items": {"$ref": "#"}}}, "$defs": {"Loc": {"type": "object"}}}  # fmt: skip
    tools = [Tool(name="f", parameters=json.dumps(params)), Tool(name="g")]
    for mode in ("auto", "required"):
        for syntax in (HERMES, LLAMA3):
            lark = tool_grammar(tools, ToolChoice(mode=mode), True, syntax)
            if lark is not None:
                assert LLMatcher.validate_grammar(LLMatcher.grammar_from_lark(lark)) == ""
