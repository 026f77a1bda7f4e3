"""OpenAI routes: ``GET /v1/models`` and ``POST /v1/chat/completions``.

A streamed request waits for its first chunk before sending headers, so an error
the worker finds at once (prompt too long, model gone) is a proper HTTP status;
after the headers, errors travel inside the stream as ``data: {"error": ...}``.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from cortex.gateway import openai_chat
from cortex.gateway.errors import ApiError, PayloadTooLarge
from cortex.gateway.fleet import ModelEntry
from cortex.gateway.metrics import UNKNOWN_MODEL, RequestTimer
from cortex.gateway.openai_errors import error_body, error_response, internal_error_body, internal_error_response
from cortex.gateway.relay import Abandoned, ReplyStream, raise_for_chunk
from cortex.gateway.services import Services
from cortex.gateway.sse import EventStreamResponse, watch_disconnect
from cortex.protocol import Chunk, GenerateRequest

log = logging.getLogger("cortex.gateway")
_encoder = msgspec.json.Encoder()
DIALECT = "openai"
CLIENT_CLOSED = 499
"""Status recorded (never sent: nobody is listening) when the client went away."""
T = TypeVar("T")


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


def _model_object(entry: ModelEntry) -> dict[str, object]:
    return {
        "id": entry.id,
        "object": "model",
        "created": entry.card.created,
        "owned_by": "cortex",
        "aliases": entry.card.aliases,
        "context_length": entry.card.context_length,
        "ready": bool(entry.ready_on),
        "loaded_on": entry.ready_on,
        "loading_on": entry.loading_on,
    }


async def list_models(request: Request) -> Response:
    data = [_model_object(entry) for entry in services(request).fleet.models().values()]
    return Response(_encoder.encode({"object": "list", "data": data}), media_type="application/json")


async def retrieve_model(request: Request) -> Response:
    name = request.path_params["model"]
    try:
        entry = services(request).fleet.find(name)
    except ApiError as exc:
        return error_response(exc)
    return Response(_encoder.encode(_model_object(entry)), media_type="application/json")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body is {declared} bytes; at most {limit} are accepted.")
    body = await request.body()
    if len(body) > limit:
        raise PayloadTooLarge(f"The request body is {len(body)} bytes; at most {limit} are accepted.")
    return body


async def chat_completions(request: Request) -> Response:
    svc = services(request)
    request_id = uuid.uuid4().hex
    timer: RequestTimer | None = None
    stream: ReplyStream | None = None
    streaming_started = False
    try:
        body = await _read_body(request, svc.bus.max_payload)
        req = openai_chat.parse(body)
        entry = svc.fleet.resolve(req.model)
        timer = RequestTimer(svc.metrics, entry.id, DIALECT)
        now = time.time()
        canonical = GenerateRequest(
            request_id=request_id,
            model=entry.id,
            messages=openai_chat.canonical_messages(req),
            sampling=openai_chat.sampling(req),
            stream=bool(req.stream),
            deadline=now + svc.settings.request_timeout,
            reply_subject=svc.relay.reply_subject(request_id),
            created=now,
        )
        stream = await svc.relay.submit(canonical)
        if not req.stream:
            return await _until_disconnected(request, _complete(stream, timer), stream)
        first = await _until_disconnected(request, stream.next(), stream)
        raise_for_chunk(first)
        _account(timer, first)
        fmt = openai_chat.ChunkFormatter(
            completion_id=f"chatcmpl-{request_id}",
            model=entry.id,
            include_usage=bool(req.stream_options and req.stream_options.include_usage),
        )
        streaming_started = True
        return EventStreamResponse(  # type: ignore[return-value]
            _events(first, stream, timer, fmt), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
    except (ClientGone, ClientDisconnect):
        _record(svc, timer, CLIENT_CLOSED, "client_closed")
        return Response(status_code=CLIENT_CLOSED)
    except ApiError as exc:
        _record(svc, timer, exc.status, exc.code or exc.type)
        return error_response(exc)
    except Exception:
        log.exception("request %s failed", request_id)
        _record(svc, timer, 500, "internal")
        return internal_error_response(request_id)
    finally:
        if stream is not None and not streaming_started:
            stream.close()


def _record(svc: Services, timer: RequestTimer | None, status: int, code: str) -> None:
    if timer is None:
        timer = RequestTimer(svc.metrics, UNKNOWN_MODEL, DIALECT)
    timer.done(status, code)


def _account(timer: RequestTimer, chunk: Chunk) -> None:
    if chunk.prompt_tokens:
        timer.prompt_tokens = chunk.prompt_tokens
    timer.completion_tokens = max(timer.completion_tokens, chunk.completion_tokens)
    timer.saw_tokens(chunk.tokens)


async def _complete(stream: ReplyStream, timer: RequestTimer) -> Response:
    parts: list[str] = []
    while True:
        chunk = await stream.next()
        raise_for_chunk(chunk)
        _account(timer, chunk)
        parts.append(chunk.text)
        if chunk.final:
            break
    body = openai_chat.completion_body(
        completion_id=f"chatcmpl-{stream.request.request_id}",
        model=stream.request.model,
        created=int(stream.request.created),
        text="".join(parts),
        finish_reason=_finish(chunk.finish_reason),
        usage=chunk.usage,
    )
    timer.done(200)
    return Response(body, media_type="application/json")


async def _until_disconnected(request: Request, work: Awaitable[T], stream: ReplyStream) -> T:
    """Await `work` (which reads `stream`); raise ClientGone instead if the client disconnects first."""
    watcher = watch_disconnect(request.receive, stream.abandon)
    try:
        return await work
    except Abandoned:
        raise ClientGone from None
    finally:
        watcher.cancel()


async def _events(
    first: Chunk, stream: ReplyStream, timer: RequestTimer, fmt: openai_chat.ChunkFormatter
) -> AsyncIterator[bytes]:
    # Whatever ends this generator early (cancellation, GeneratorExit) means the
    # client left; only a completed or failed stream overwrites this.
    status, code = CLIENT_CLOSED, "client_closed"
    chunk = first
    try:
        pending = fmt.delta("")  # the role, sent with the first text in one write
        while not chunk.final:
            if chunk.text or pending:
                yield pending + (fmt.delta(chunk.text) if chunk.text else b"")
                pending = b""
            chunk = await stream.next()
            raise_for_chunk(chunk)
            _account(timer, chunk)
        status, code = 200, None
        tail = [pending] if pending else []
        if chunk.text:
            tail.append(fmt.delta(chunk.text))
        tail.append(fmt.delta("", finish_reason=_finish(chunk.finish_reason)))
        if fmt.include_usage:
            tail.append(fmt.usage(chunk.usage))
        tail.append(openai_chat.DONE)
        yield b"".join(tail)
    except ApiError as exc:
        status, code = exc.status, exc.code or exc.type
        yield b"data: " + _encoder.encode(error_body(exc)) + b"\n\n"
    except Exception:
        log.exception("stream %s failed", stream.request.request_id)
        status, code = 500, "internal"
        yield b"data: " + _encoder.encode(internal_error_body(stream.request.request_id)) + b"\n\n"
    finally:
        stream.close()
        timer.done(status, code)


def _finish(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"
