"""OpenAI ``POST /v1/chat/completions``: HTTP body → canonical request, chunks → JSON or SSE."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec
from starlette.responses import Response

from cortex.gateway.errors import ApiError, InvalidRequest
from cortex.gateway.exchange import Answer, Plan
from cortex.gateway.formats import response_format
from cortex.gateway.openai_errors import decode_body, error_body, error_response
from cortex.gateway.openai_functions import (
    call_id,
    canonical_functions,
    function_call_delta,
    function_call_object,
    function_finish_reason,
    uses_functions,
)
from cortex.gateway.openai_params import (
    check_logprobs,
    check_sampling,
    check_verbosity,
    logprob_objects,
    metadata,
    reasoning,
    to_sampling,
)
from cortex.gateway.tools import check_choice, check_tools, make_tool, openai_tool_choice, unknown_tool_result
from cortex.protocol import (
    Chunk,
    Message,
    ResponseFormat,
    Sampling,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    Usage,
)
from cortex.protocol.messages import FINISH_LENGTH, FINISH_TOOL_CALLS, TOOL_CHOICE_FUNCTION

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool",
         "function": "tool"}  # fmt: skip
"""`function`: a result of the deprecated `function_call`, named by its function."""
MAX_STOP = 16


class ContentPart(msgspec.Struct, kw_only=True):
    type: str
    text: str | None = None


class FunctionCallIn(msgspec.Struct, kw_only=True):
    name: str
    arguments: str = "{}"


class ToolCallIn(msgspec.Struct, kw_only=True):
    id: str
    function: FunctionCallIn
    type: str = "function"


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    function_call: FunctionCallIn | None = None
    """The deprecated single call of an assistant turn."""


class FunctionDef(msgspec.Struct, kw_only=True):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(msgspec.Struct, kw_only=True):
    type: str
    function: FunctionDef | None = None


class FunctionName(msgspec.Struct, kw_only=True):
    name: str


class NamedToolChoice(msgspec.Struct, kw_only=True):
    type: str
    function: FunctionName | None = None


class JsonSchemaSpec(msgspec.Struct, kw_only=True):
    name: str | None = None
    schema: dict[str, Any] | bool | None = None
    strict: bool | None = None


class ResponseFormatIn(msgspec.Struct, kw_only=True):
    type: str
    json_schema: JsonSchemaSpec | None = None


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


class Prediction(msgspec.Struct, kw_only=True):
    """Predicted Output: a speed-up for answers known in advance, never a change to them."""

    type: str
    content: str | list[ContentPart]


class ChatRequest(msgspec.Struct, kw_only=True):
    """The fields Cortex reads; any other field is accepted and ignored."""

    model: str
    messages: list[ChatMessage]
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    response_format: ResponseFormatIn | None = None
    tools: list[ToolDef] | None = None
    tool_choice: str | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    reasoning_effort: str | None = None
    logit_bias: dict[str, Any] | None = None
    functions: list[FunctionDef] | None = None
    function_call: str | FunctionName | None = None
    # Read only to be checked: ignored (named in the `Warning` header) or refused.
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None
    prediction: Prediction | None = None
    verbosity: str | None = None
    modalities: list[str] | None = None
    audio: Any = None
    web_search_options: Any = None
    moderation: Any = None


_decoder = msgspec.json.Decoder(ChatRequest)
_encoder = msgspec.json.Encoder()


def parse(body: bytes) -> ChatRequest:
    req = decode_body(_decoder, body)
    _validate(req)
    return req


def _validate(req: ChatRequest) -> None:
    if not req.messages:
        raise InvalidRequest("`messages` must contain at least one message.", param="messages")
    for i, message in enumerate(req.messages):
        if message.role not in ROLES:
            raise InvalidRequest(
                f"Invalid role {message.role!r}; expected one of {', '.join(ROLES)}.", param=f"messages[{i}].role"
            )
        if message.role == "tool" and not message.tool_call_id:
            raise InvalidRequest("A `tool` message needs the `tool_call_id` it answers.", param=f"messages[{i}]")
        if message.tool_calls and message.role != "assistant":
            raise InvalidRequest("Only assistant messages carry `tool_calls`.", param=f"messages[{i}].tool_calls")
        if message.function_call and message.role != "assistant":
            raise InvalidRequest("Only assistant messages carry `function_call`.",
                                 param=f"messages[{i}].function_call")  # fmt: skip
        if message.role == "function" and not message.name:
            raise InvalidRequest("A `function` message needs the `name` of the function it answers.",
                                 param=f"messages[{i}].name")  # fmt: skip
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if part.type != "text" or part.text is None:
                    raise InvalidRequest(
                        f"Content part type {part.type!r} is not supported; only `text` parts are.",
                        param=f"messages[{i}].content[{j}]",
                    )
    check_sampling(req)
    check_logprobs(bool(req.logprobs), req.top_logprobs)
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(req, name)
        if value is not None and value < 1:
            raise InvalidRequest(f"`{name}` must be at least 1.", param=name)
    if req.n is not None and req.n != 1:
        raise InvalidRequest("Only `n=1` is supported.", param="n")
    stops = _stops(req)
    if len(stops) > MAX_STOP:
        raise InvalidRequest(f"At most {MAX_STOP} stop sequences are supported.", param="stop")
    _check_output_options(req)


def _check_output_options(req: ChatRequest) -> None:
    """Refuse what Cortex cannot give (audio, web search, moderation); check the shape of what it ignores."""
    if req.audio is not None:
        raise InvalidRequest("Audio output is not supported: the models served here answer in text.", param="audio")
    if req.modalities is not None and any(modality != "text" for modality in req.modalities):
        raise InvalidRequest('Only text output is supported: `modalities` may only be ["text"].', param="modalities")
    if req.web_search_options is not None:
        raise InvalidRequest("Web search is not supported: the models served here cannot search the web.",
                             param="web_search_options")  # fmt: skip
    if req.moderation is not None:
        # Answering unmoderated when moderation was asked for would be worse than refusing.
        raise InvalidRequest("Moderation is not supported by this server.", param="moderation")
    if req.prediction is not None and req.prediction.type != "content":
        raise InvalidRequest("A prediction's `type` must be `content`.", param="prediction.type")
    metadata(req.metadata)
    check_verbosity(req.verbosity, param="verbosity")


def _stops(req: ChatRequest) -> list[str]:
    if req.stop is None:
        return []
    return [req.stop] if isinstance(req.stop, str) else list(req.stop)


def _text(content: str | list[ContentPart] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text or "" for part in content)


def _message(msg: ChatMessage) -> Message:
    calls = [ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments) for c in msg.tool_calls or []]
    if msg.function_call is not None:
        fn = msg.function_call
        calls.append(ToolCall(id=call_id(fn.name), name=fn.name, arguments=fn.arguments))
    answers = call_id(msg.name or "") if msg.role == "function" else msg.tool_call_id
    return Message(role=ROLES[msg.role], content=_text(msg.content), name=msg.name, tool_calls=calls,
                   tool_call_id=answers)  # fmt: skip


def canonical_messages(req: ChatRequest) -> list[Message]:
    messages = [_message(msg) for msg in req.messages]
    unknown = unknown_tool_result(messages)
    if unknown is not None:
        answered = messages[unknown].tool_call_id
        raise InvalidRequest(f"The `tool` message answers {answered!r}, which no earlier assistant message's "
                             "`tool_calls` has.", param=f"messages[{unknown}].tool_call_id")  # fmt: skip
    return messages


def canonical_tools(req: ChatRequest) -> tuple[list[Tool], ToolChoice]:
    if uses_functions(req):
        return canonical_functions(req)
    tools = []
    for i, spec in enumerate(req.tools or []):
        if spec.type != "function":
            raise InvalidRequest(f"Tools of type {spec.type!r} are not supported; only `function` tools are.",
                                 param=f"tools[{i}]")  # fmt: skip
        if spec.function is None:
            raise InvalidRequest("A function tool needs a `function` object with its `name`.", param=f"tools[{i}]")
        fn = spec.function
        tools.append(make_tool(fn.name, fn.description, fn.parameters, param=f"tools[{i}].function"))
    check_tools(tools, param="tools")
    choice = req.tool_choice
    named = (
        choice.function.name
        if isinstance(choice, NamedToolChoice) and choice.type == "function" and choice.function
        else None
    )
    canonical = openai_tool_choice(choice, named, shape='{"type": "function", "function": {"name": ...}}')
    check_choice(tools, canonical, param="tool_choice")
    return tools, canonical


def sampling(req: ChatRequest) -> Sampling:
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    return to_sampling(req, max_tokens=max_tokens, stop=_stops(req), logprobs=bool(req.logprobs),
                       top_logprobs=req.top_logprobs or 0)  # fmt: skip


def usage_object(usage: Usage | None) -> dict[str, object] | None:
    if usage is None:
        return None
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }


def tool_call_object(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def choice_logprobs(entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
    return None if entries is None else {"content": logprob_objects(entries), "refusal": None}


def completion_body(
    *,
    completion_id: str,
    model: str,
    created: int,
    answer: Answer,
    finish_reason: str,
    usage: Usage | None,
    logprobs: bool = False,
    functions: bool = False,
) -> bytes:
    """`functions`: the request used the deprecated `functions`, so a call comes back as `function_call`."""
    calls = answer.tool_calls
    message: dict[str, Any] = {"role": "assistant", "content": answer.text or (None if calls else ""), "refusal": None}
    if calls and functions:
        message["function_call"] = function_call_object(calls)
    elif calls:
        message["tool_calls"] = [tool_call_object(call) for call in calls]
    if answer.reasoning:
        message["reasoning_content"] = answer.reasoning  # as DeepSeek's and vLLM's APIs name it
    body: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": choice_logprobs(answer.logprobs if logprobs else None),
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage_object(usage),
    }
    return _encoder.encode(body)


class ChunkFormatter:
    """Builds the ``chat.completion.chunk`` SSE events of one streamed answer."""

    def __init__(
        self,
        *,
        completion_id: str,
        model: str,
        created: int,
        include_usage: bool,
        logprobs: bool = False,
        functions: bool = False,
    ) -> None:
        self.completion_id = completion_id
        self.model = model
        self.created = created
        self.include_usage = include_usage
        self.logprobs = logprobs
        self.functions = functions
        """Calls go out as the deprecated `delta.function_call`."""
        self._role_sent = False

    def _event(self, choices: list[dict[str, Any]], usage: Usage | None = None, *, final_usage: bool = False) -> bytes:
        body: dict[str, Any] = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            body["usage"] = usage_object(usage) if final_usage else None
        return b"data: " + _encoder.encode(body) + b"\n\n"

    def delta(self, text: str, finish_reason: str | None = None, logprobs: list[TokenLogprob] | None = None) -> bytes:
        delta: dict[str, Any] = {}
        if not self._role_sent:
            delta["role"] = "assistant"
            self._role_sent = True
        if text or finish_reason is None:
            delta["content"] = text
        entries = choice_logprobs(logprobs) if self.logprobs and logprobs else None
        return self._event([{"index": 0, "delta": delta, "logprobs": entries, "finish_reason": finish_reason}])

    def reasoning(self, text: str) -> bytes:
        delta: dict[str, Any] = {"reasoning_content": text}
        if not self._role_sent:
            delta["role"] = "assistant"
            self._role_sent = True
        return self._event([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])

    def _opening(self) -> dict[str, Any]:
        """The role, with the first piece of an answer that opens with a call (OpenAI's ``content: null``)."""
        if self._role_sent:
            return {}
        self._role_sent = True
        return {"role": "assistant", "content": None}

    def tool_calls(self, deltas: list[ToolCallDelta]) -> bytes:
        """Each call's id, type and name in its first piece only: the SDK concatenates what repeats."""
        if self.functions:
            piece = function_call_delta(deltas)
            if piece is None:
                return b""
            return self._event([{"index": 0, "delta": self._opening() | {"function_call": piece}, "logprobs": None,
                                 "finish_reason": None}])  # fmt: skip
        pieces: list[dict[str, Any]] = []
        for d in deltas:
            if pieces and pieces[-1]["index"] == d.index and not d.id:
                pieces[-1]["function"]["arguments"] += d.arguments  # one entry per call and chunk, as OpenAI's
            elif d.id:
                function = {"name": d.name, "arguments": d.arguments}
                pieces.append({"index": d.index, "id": d.id, "type": "function", "function": function})
            else:
                pieces.append({"index": d.index, "function": {"arguments": d.arguments}})
        delta: dict[str, Any] = self._opening() | {"tool_calls": pieces}
        return self._event([{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])

    def usage(self, usage: Usage | None) -> bytes:
        return self._event([], usage, final_usage=True)


DONE = b"data: [DONE]\n\n"


def finish_reason(chunk: Chunk, *, named_tool: bool = False) -> str:
    """OpenAI's finish reason; calls forced by naming the function end with ``stop``, as OpenAI's own do."""
    if chunk.finish_reason == FINISH_TOOL_CALLS and named_tool:
        return "stop"
    if chunk.finish_reason in (FINISH_LENGTH, FINISH_TOOL_CALLS):
        return chunk.finish_reason
    return "stop"


def error_event(exc: ApiError) -> bytes:
    """An error after the SSE headers: the OpenAI SDK raises it from the stream."""
    return b"data: " + _encoder.encode(error_body(exc)) + b"\n\n"


class ChatFormatter:
    def __init__(
        self, *, request_id: str, model: str, created: int, include_usage: bool, logprobs: bool,
        functions: bool = False, named_tool: bool = False,
    ) -> None:  # fmt: skip
        self.request_id = request_id
        self.named_tool = named_tool
        self.model = model
        self.created = created
        self.logprobs = logprobs
        self.functions = functions
        self.chunks = ChunkFormatter(completion_id=f"chatcmpl-{request_id}", model=model, created=created,
                                     include_usage=include_usage, logprobs=logprobs, functions=functions)  # fmt: skip

    def _finish_reason(self, last: Chunk) -> str:
        reason = finish_reason(last, named_tool=self.named_tool)
        return function_finish_reason(reason) if self.functions else reason

    def complete(self, answer: Answer, last: Chunk) -> Response:
        body = completion_body(
            completion_id=f"chatcmpl-{self.request_id}", model=self.model, created=self.created, answer=answer,
            finish_reason=self._finish_reason(last), usage=last.usage, logprobs=self.logprobs,
            functions=self.functions,
        )  # fmt: skip
        return Response(body, media_type="application/json")

    def stream_start(self, first: Chunk) -> bytes:
        return b""  # the role goes with the first piece: its `content` is "" for text, null for a call

    def stream_text(self, text: str, logprobs: list[TokenLogprob]) -> bytes:
        return self.chunks.delta(text, logprobs=logprobs)

    def stream_tool_calls(self, deltas: list[ToolCallDelta]) -> bytes:
        return self.chunks.tool_calls(deltas)

    def stream_reasoning(self, text: str) -> bytes:
        return self.chunks.reasoning(text)

    def stream_end(self, last: Chunk) -> bytes:
        out = self.chunks.delta("", finish_reason=self._finish_reason(last))
        if self.chunks.include_usage:
            out += self.chunks.usage(last.usage)
        return out + DONE

    def stream_error(self, exc: ApiError) -> bytes:
        return error_event(exc)


def _format(req: ChatRequest) -> ResponseFormat | None:
    spec = req.response_format
    if spec is None:
        return None
    schema = spec.json_schema.schema if spec.json_schema else None
    return response_format(spec.type, schema, param="response_format")


@dataclass
class ChatPlan(Plan):
    functions: bool = False
    """The request used the deprecated `functions`: the answer uses `function_call`."""


class OpenAIChat:
    """The exchange dialect of ``POST /v1/chat/completions``."""

    name = "openai"
    ignored_fields = frozenset({"user", "store", "metadata", "service_tier", "prediction", "verbosity",
                                "prompt_cache_key", "prompt_cache_retention", "prompt_cache_options",
                                "safety_identifier"})  # fmt: skip
    """Accepted by OpenAI and without effect here (they bill, store, route or speed up; never change the answer)."""

    def parse(self, body: bytes) -> Plan:
        req = parse(body)
        tools, choice = canonical_tools(req)
        functions = uses_functions(req)
        return ChatPlan(
            model=req.model,
            sampling=sampling(req),
            messages=canonical_messages(req),
            stream=bool(req.stream),
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
            response_format=_format(req),
            tools=tools,
            tool_choice=choice,
            parallel_tool_calls=req.parallel_tool_calls is not False and not functions,  # one function call, as then
            reasoning=reasoning(req.reasoning_effort, param="reasoning_effort"),
            functions=functions,
        )

    def formatter(self, plan: Plan, request_id: str, model: str, created: int) -> ChatFormatter:
        return ChatFormatter(request_id=request_id, model=model, created=created, include_usage=plan.include_usage,
                             logprobs=plan.sampling.logprobs,
                             functions=isinstance(plan, ChatPlan) and plan.functions,
                             named_tool=plan.tool_choice.mode == TOOL_CHOICE_FUNCTION)  # fmt: skip

    def error_response(self, exc: ApiError) -> Response:
        return error_response(exc)

    def internal_error(self, request_id: str) -> ApiError:
        return ApiError(f"Internal error (request {request_id}); it has been logged.")
