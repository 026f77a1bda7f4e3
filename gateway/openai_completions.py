"""OpenAI ``POST /v1/completions`` (legacy text completion): the prompt is continued as is, no chat template."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.responses import Response

from cortex.gateway.errors import ApiError, InvalidRequest
from cortex.gateway.exchange import UNASSIGNED, Answer, Dialect, Formatter, Plan
from cortex.gateway.openai_chat import MAX_STOP, StreamOptions
from cortex.gateway.openai_chat_format import DONE, error_event, finish_reason, usage_object
from cortex.gateway.openai_errors import decode_body, error_response
from cortex.gateway.openai_params import check_sampling, to_sampling
from cortex.protocol import Chunk, GenerateRequest, TokenLogprob, ToolCallDelta

DEFAULT_MAX_TOKENS = 16
"""OpenAI's default for this endpoint."""
MAX_LOGPROBS = 5


class CompletionRequest(msgspec.Struct, kw_only=True):
    """The fields Cortex reads; any other field is accepted and ignored."""

    model: str
    prompt: str | list[str | int] | None = None
    max_tokens: int | None = DEFAULT_MAX_TOKENS
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    best_of: int | None = None
    echo: bool | None = False
    logprobs: int | None = None
    suffix: str | None = None
    user: str | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None


_decoder = msgspec.json.Decoder(CompletionRequest)
_encoder = msgspec.json.Encoder()


def parse(body: bytes) -> CompletionRequest:
    req = decode_body(_decoder, body)
    if req.prompt is None or (isinstance(req.prompt, list) and len(req.prompt) != 1):
        raise InvalidRequest("`prompt` must be a string (or a list of exactly one string).", param="prompt")
    if isinstance(req.prompt, list) and not isinstance(req.prompt[0], str):
        raise InvalidRequest("Token-id prompts are not supported; send text.", param="prompt")
    for name, ok in (("n", req.n in (None, 1)), ("best_of", req.best_of in (None, 1)), ("echo", not req.echo),
                     ("suffix", req.suffix is None)):  # fmt: skip
        if not ok:
            raise InvalidRequest(f"`{name}` is not supported by this server.", param=name)
    if req.max_tokens is not None and req.max_tokens < 1:
        raise InvalidRequest("`max_tokens` must be at least 1.", param="max_tokens")
    check_sampling(req)
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_LOGPROBS:
        raise InvalidRequest(f"`logprobs` must be between 0 and {MAX_LOGPROBS}.", param="logprobs")
    if len(_stops(req)) > MAX_STOP:
        raise InvalidRequest(f"At most {MAX_STOP} stop sequences are supported.", param="stop")
    return req


def _stops(req: CompletionRequest) -> list[str]:
    if req.stop is None:
        return []
    return [req.stop] if isinstance(req.stop, str) else list(req.stop)


class CompletionFormatter(Formatter):
    def __init__(self, *, request_id: str, model: str, created: int, include_usage: bool, logprobs: bool) -> None:
        self.base = {"id": f"cmpl-{request_id}", "object": "text_completion", "created": created, "model": model}
        self.include_usage = include_usage
        self.logprobs = logprobs
        self._offset = 0

    def _choice(self, text: str, finish: str | None, logprobs: list[TokenLogprob] | None = None) -> dict[str, Any]:
        return {"text": text, "index": 0, "logprobs": self._logprobs(logprobs or []) if self.logprobs else None,
                "finish_reason": finish}  # fmt: skip

    def _logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any]:
        """The legacy shape: parallel lists, with each token's offset in the whole answer's text."""
        offsets = []
        for e in entries:
            offsets.append(self._offset)
            self._offset += len(e.token)
        return {
            "tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{t.token: t.logprob for t in e.top} for e in entries],
            "text_offset": offsets,
        }

    def complete(self, answer: Answer, last: Chunk) -> Response:
        choice = self._choice(answer.text, finish_reason(last), answer.logprobs)
        body = {**self.base, "choices": [choice], "usage": usage_object(last.usage)}
        return Response(_encoder.encode(body), media_type="application/json")

    def _event(self, body: dict[str, Any]) -> bytes:
        return b"data: " + _encoder.encode(body) + b"\n\n"

    def stream_start(self, first: Chunk) -> bytes:
        return b""

    def stream_text(self, text: str, logprobs: list[TokenLogprob]) -> bytes:
        return self._event({**self.base, "choices": [self._choice(text, None, logprobs)]})

    def stream_tool_calls(self, deltas: list[ToolCallDelta]) -> bytes:
        return b""  # a raw completion offers no tools

    def stream_reasoning(self, text: str) -> bytes:
        return b""  # nor separates thinking: the text is continued as is

    def stream_end(self, last: Chunk) -> bytes:
        out = self._event({**self.base, "choices": [self._choice("", finish_reason(last))]})
        if self.include_usage:
            out += self._event({**self.base, "choices": [], "usage": usage_object(last.usage)})
        return out + DONE

    def stream_error(self, exc: ApiError) -> bytes:
        return error_event(exc)


class OpenAICompletions(Dialect):
    name = "openai-completions"
    ignored_fields = frozenset({"user"})
    """Accepted by OpenAI and without effect here."""

    def parse(self, body: bytes) -> Plan:
        req = parse(body)
        prompt = req.prompt if isinstance(req.prompt, str) else str(req.prompt[0])  # type: ignore[index]
        sampling = to_sampling(req, max_tokens=DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens,
                               stop=_stops(req), logprobs=req.logprobs is not None,
                               top_logprobs=req.logprobs or 0)  # fmt: skip
        request = GenerateRequest(request_id=UNASSIGNED, model=req.model, messages=[], sampling=sampling,
                                  stream=bool(req.stream), prompt=prompt)  # fmt: skip
        return Plan(request=request, prompt_param="prompt",
                    include_usage=bool(req.stream_options and req.stream_options.include_usage))  # fmt: skip

    def formatter(self, plan: Plan, request_id: str, model: str, created: int) -> CompletionFormatter:
        return CompletionFormatter(
            request_id=request_id,
            model=model,
            created=created,
            include_usage=plan.include_usage,
            logprobs=plan.request.sampling.logprobs,
        )

    def error_response(self, exc: ApiError) -> Response:
        return error_response(exc)
