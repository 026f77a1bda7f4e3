"""One request's trip through the relay, the same for every dialect.

A dialect (OpenAI chat, completions and responses, Anthropic messages) parses
its body into a `Plan` (the wire's `GenerateRequest` as the client asked for it,
plus what only the gateway needs) and formats the chunks that come back through
a `Formatter`; everything between (model resolution, what the gateway decides
of the request, deadlines, client disconnects, metrics, error mapping) happens
here, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from abc import abstractmethod
from collections.abc import AsyncGenerator, Awaitable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from cortex.gateway.auth import caller, check_model
from cortex.gateway.errors import UNREADABLE_BODY_ERRORS, ApiError, PayloadTooLarge
from cortex.gateway.metrics import UNKNOWN_MODEL, RequestTimer
from cortex.gateway.placing import ensure_placed
from cortex.gateway.relay import Abandoned, ReplyStream, StillWaiting, raise_for_chunk
from cortex.gateway.services import Services
from cortex.gateway.sse import DisconnectWatch, EventStreamResponse, LastEvent
from cortex.protocol import Chunk, GenerateRequest, TokenLogprob, ToolCall, ToolCallDelta

log = logging.getLogger("cortex.gateway")
T = TypeVar("T")
CLIENT_CLOSED = 499
"""Status recorded (never sent: nobody is listening) when the client went away."""


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


UNASSIGNED = ""
"""The `request_id` of a dialect's `Plan.request` until `handle` assigns one."""


@dataclass(kw_only=True)
class Plan:
    """What a dialect asks of the workers, and what the gateway alone needs to answer it."""

    request: GenerateRequest
    """The wire request as the client asked for it (`model` as named, `request_id` `UNASSIGNED`); `handle` fills
    in what the gateway decides: the id, the model's canonical id, deadline, reply subject, time, clamp policy."""
    include_usage: bool = False
    """OpenAI's ``stream_options.include_usage``."""
    prompt_param: str = "messages"
    """The dialect's name for what becomes the prompt, named in errors about it."""
    ignored: list[str] = field(default_factory=list)
    """Fields this request sent without effect that `Dialect.ignored_fields` cannot name: nested ones
    (``output_config.effort``) or ones ignored only for some values (``truncation: "auto"``)."""


class Answer:
    """One answer put together from its chunks: the text, and each tool call whole."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._calls: dict[int, list[str]] = {}
        self._heads: dict[int, ToolCallDelta] = {}
        self.logprobs: list[TokenLogprob] = []
        self._thoughts: list[str] = []
        self.clamped_to = 0
        """The completion's token limit when the worker lowered max_tokens to fit the context (0: as asked)."""

    def add(self, chunk: Chunk) -> None:
        self.clamped_to = chunk.max_tokens or self.clamped_to
        self._parts.append(chunk.text)
        if chunk.reasoning:
            self._thoughts.append(chunk.reasoning)
        self.logprobs += chunk.logprobs
        for delta in chunk.tool_calls:
            if delta.index not in self._heads:
                self._heads[delta.index] = delta
                self._calls[delta.index] = []
            self._calls[delta.index].append(delta.arguments)

    @property
    def text(self) -> str:
        return "".join(self._parts)

    @property
    def reasoning(self) -> str:
        return "".join(self._thoughts)

    @property
    def tool_calls(self) -> list[ToolCall]:
        return [
            ToolCall(id=head.id, name=head.name, arguments="".join(self._calls[index]))
            for index, head in sorted(self._heads.items())
        ]


class Formatter(Protocol):
    """Turns the chunks of one answer into a dialect's JSON or SSE.

    Each formatter subclasses it: one that lacks a method cannot be made, and the hooks default to nothing.
    """

    @abstractmethod
    def complete(self, answer: Answer, last: Chunk) -> Response: ...

    @abstractmethod
    def stream_start(self, first: Chunk) -> bytes: ...

    @abstractmethod
    def stream_reasoning(self, text: str) -> bytes: ...

    @abstractmethod
    def stream_text(self, text: str, logprobs: list[TokenLogprob]) -> bytes: ...

    @abstractmethod
    def stream_tool_calls(self, deltas: list[ToolCallDelta]) -> bytes: ...

    @abstractmethod
    def stream_end(self, last: Chunk) -> bytes: ...

    @abstractmethod
    def stream_error(self, exc: ApiError) -> bytes: ...

    async def after_complete(self, answer: Answer, last: Chunk, svc: Services) -> None:
        """Hook: runs once the whole answer is in, before its end goes out (Responses stores the response here)."""
        return None


class Dialect(Protocol):
    """An HTTP API's request and answer shapes; each dialect subclasses it, as formatters do `Formatter`."""

    name: str
    ignored_fields: frozenset[str]
    """Fields the dialect knows and has no use for: named in a `Warning` header when a request sends them."""
    metered: bool = True
    """Whether a request counts against its key's rate limits (counting tokens does not)."""

    @abstractmethod
    def parse(self, body: bytes) -> Plan: ...

    @abstractmethod
    def formatter(self, plan: Plan, request_id: str, model: str, created: int) -> Formatter: ...

    @abstractmethod
    def error_response(self, exc: ApiError) -> Response: ...

    async def prepare(self, plan: Plan, svc: Services) -> Plan:
        """Hook: I/O the plan needs before it goes out (Responses loads a stored conversation here)."""
        return plan

    def internal_error(self, request_id: str) -> ApiError:
        """What the client is told of a bug (the details are in the log, under the request id)."""
        return ApiError(f"Internal error (request {request_id}); it has been logged.")


def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"The request body is {declared} bytes; at most {limit} are accepted.")
    body = await request.body()
    if len(body) > limit:
        raise PayloadTooLarge(f"The request body is {len(body)} bytes; at most {limit} are accepted.")
    return body


_fields = msgspec.json.Decoder(dict[str, msgspec.Raw])


def ignored_warning(body: bytes, ignored: frozenset[str], also: list[str] | None = None) -> dict[str, str]:
    """A ``Warning: 299`` header naming the known fields this request sent that have no effect, and `also`."""
    try:
        sent = _fields.decode(body)
    except (msgspec.DecodeError, *UNREADABLE_BODY_ERRORS):
        return {}
    names = sorted(ignored.intersection(sent).union(also or ()))
    return {"Warning": f'299 cortex "Ignored fields: {", ".join(names)}"'} if names else {}


def with_clamp_warning(warning: dict[str, str], plan: Plan, clamped_to: int) -> dict[str, str]:
    """`warning`, plus a note that the worker lowered max_tokens to fit the context (the clamp policy)."""
    if not clamped_to:
        return warning
    note = (f'299 cortex "max_tokens lowered from {plan.request.sampling.max_tokens} to {clamped_to}: that is what the '
            "model's context leaves after the prompt\"")  # fmt: skip
    return {"Warning": f"{warning['Warning']}, {note}" if warning else note}


async def handle(request: Request, dialect: Dialect) -> Response:
    """Serve one generation request end to end in `dialect`."""
    svc = services(request)
    request_id = uuid.uuid4().hex
    timer: RequestTimer | None = None
    stream: ReplyStream | None = None
    streaming_started = False
    try:
        body = await read_body(request, svc.bus.max_payload)
        plan = dialect.parse(body)
        warning = ignored_warning(body, dialect.ignored_fields, plan.ignored)
        plan = await dialect.prepare(plan, svc)
        svc.require_broker()
        entry = svc.fleet.resolve(plan.request.model)
        key = caller(request.state)
        check_model(key, entry.id, entry.card.aliases)
        timer = RequestTimer(svc.metrics, entry.id, dialect.name)
        deadline = time.time() + svc.settings.request_timeout
        limit_headers: dict[str, str] = {}
        if dialect.metered:
            lease = await svc.limiter.admit(key, request_id, deadline)
            timer.on_done = functools.partial(svc.accounting.finish, key, lease)
            limit_headers = lease.headers if lease is not None else {}
        if not entry.ready_on:
            await ensure_placed(svc, entry.id)  # the request waits in the queue while a worker loads it
        now = time.time()
        canonical = msgspec.structs.replace(
            plan.request,
            request_id=request_id,
            model=entry.id,
            deadline=deadline,
            reply_subject=svc.relay.reply_subject(request_id),
            created=now,
            clamp_max_tokens=svc.settings.max_tokens_policy == "clamp",
        )
        failovers = svc.metrics.failovers.labels(entry.id)
        stream = await svc.relay.submit(canonical, failovers=svc.settings.failover_attempts, on_failover=failovers.inc)
        fmt = dialect.formatter(plan, request_id, entry.id, int(now))
        if not plan.request.stream:
            response, answer = await until_disconnected(
                request, _complete(stream, timer, fmt, plan.prompt_param, svc), stream
            )
            response.headers.update(with_clamp_warning(warning, plan, answer.clamped_to) | limit_headers)
            return response
        # One watch for the wait for the first chunk and then the response (`EventStreamResponse` takes it over).
        watch = DisconnectWatch(request.receive, stream.abandon)
        try:
            try:
                first: Chunk | None = await stream.next(patience=svc.settings.stream_headers_within)
            except StillWaiting:
                first = None  # a long prefill or a cold load: start the stream and keep it alive
            except Abandoned:
                raise ClientGone from None
            if first is not None:
                raise_for_chunk(first, plan.prompt_param)
                account(timer, first)
                warning = with_clamp_warning(warning, plan, first.max_tokens)
            streaming_started = True
            return EventStreamResponse(  # type: ignore[return-value]
                _events(first, stream, timer, fmt, dialect, plan.prompt_param, svc),
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **warning, **limit_headers},
                watch=watch,
            )
        finally:
            if not streaming_started:
                watch.stop()
    except (ClientGone, ClientDisconnect):
        record(svc, timer, dialect.name, CLIENT_CLOSED, "client_closed")
        return Response(status_code=CLIENT_CLOSED)
    except ApiError as exc:
        response = dialect.error_response(exc)
        record(svc, timer, dialect.name, response.status_code, exc.code or exc.type)  # as sent: Anthropic's 529
        return response
    except Exception:
        log.exception("request %s failed", request_id)
        record(svc, timer, dialect.name, 500, "internal")
        return dialect.error_response(dialect.internal_error(request_id))
    finally:
        if stream is not None and not streaming_started:
            stream.close()
        if timer is not None and not streaming_started:
            timer.done(CLIENT_CLOSED, "client_closed")  # cancelled (shutdown) past every handler: once, if not yet


QUEUE_LOOKUP_LIMIT = 50
"""Queue positions are counted up to this (one broker lookup each); a longer queue shows as ``position>50``."""


async def queue_feedback(stream: ReplyStream, svc: Services) -> bytes:
    """The keep-alive comment of a streamed request no chunk has come for yet: ``: cortex queued position=3
    load=0.42`` (its place in the model's queue, 1 = next; the model's load progress while it loads)."""
    parts = [b": cortex queued"]
    ahead = await stream.ahead_in_queue(QUEUE_LOOKUP_LIMIT)
    if ahead is not None:
        parts.append(f"position={ahead + 1}".encode() if ahead < QUEUE_LOOKUP_LIMIT else
                     f"position>{QUEUE_LOOKUP_LIMIT}".encode())  # fmt: skip
    entry = svc.fleet.models().get(stream.request.model)
    if entry is not None and entry.progress:
        parts.append(f"load={max(entry.progress.values()):.2f}".encode())
    return b" ".join(parts) + b"\n\n"


SETTLE_WAIT_S = 2.0
"""How long an answer's last byte waits for its rate-limit place to be given back (normally a millisecond)."""


async def settled(timer: RequestTimer) -> None:
    """Wait (a little) for what the request's end set going: its key's place back, so the client's next request,
    at any gateway, finds it free."""
    if timer.settling is not None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(timer.settling), SETTLE_WAIT_S)


def record(svc: Services, timer: RequestTimer | None, dialect: str, status: int, code: str) -> None:
    if timer is None:
        timer = RequestTimer(svc.metrics, UNKNOWN_MODEL, dialect)
    timer.done(status, code)


def account(timer: RequestTimer, chunk: Chunk) -> None:
    if chunk.prompt_tokens:
        timer.prompt_tokens = chunk.prompt_tokens
    if chunk.usage is not None:
        timer.prompt_tokens = chunk.usage.prompt_tokens or timer.prompt_tokens
        timer.cached_tokens, timer.slot_seconds = chunk.usage.cached_tokens, chunk.usage.slot_seconds
    timer.completion_tokens = max(timer.completion_tokens, chunk.completion_tokens)
    timer.saw_tokens(chunk.tokens)


async def until_disconnected(request: Request, work: Awaitable[T], stream: ReplyStream) -> T:
    """Await `work` (which reads `stream`); raise ClientGone instead if the client disconnects first."""
    watch = DisconnectWatch(request.receive, stream.abandon)
    try:
        return await work
    except Abandoned:
        raise ClientGone from None
    finally:
        watch.stop()


async def _complete(
    stream: ReplyStream, timer: RequestTimer, fmt: Formatter, prompt_param: str, svc: Services
) -> tuple[Response, Answer]:
    answer = Answer()
    while True:
        chunk = await stream.next()
        raise_for_chunk(chunk, prompt_param)
        account(timer, chunk)
        answer.add(chunk)
        if chunk.final:
            break
    await fmt.after_complete(answer, chunk, svc)
    response = fmt.complete(answer, chunk)
    timer.done(200)
    await settled(timer)
    return response, answer


def _piece(fmt: Formatter, chunk: Chunk, logprobs: list[TokenLogprob]) -> bytes:
    """A chunk's thinking, text (with the log probabilities of the tokens so far) and tool-call pieces."""
    out = fmt.stream_reasoning(chunk.reasoning) if chunk.reasoning else b""
    held = chunk.final and logprobs and not chunk.tool_calls  # tokens whose text a stop string or the end swallowed
    out += fmt.stream_text(chunk.text, logprobs) if chunk.text or held else b""
    return out + fmt.stream_tool_calls(chunk.tool_calls) if chunk.tool_calls else out


async def _events(
    first: Chunk | None,
    stream: ReplyStream,
    timer: RequestTimer,
    fmt: Formatter,
    dialect: Dialect,
    prompt_param: str,
    svc: Services,
) -> AsyncGenerator[bytes, None]:
    # Whatever ends this generator early (cancellation, GeneratorExit) means the
    # client left; only a completed or failed stream overwrites this.
    status = CLIENT_CLOSED
    code: str | None = "client_closed"
    try:
        while first is None:
            try:
                first = await stream.next(patience=svc.settings.keepalive_interval)
            except StillWaiting:
                # An SSE comment: every client ignores it, proxies see traffic, and a person can read where the
                # request stands while the model loads or the queue drains.
                yield await queue_feedback(stream, svc)
                continue
            raise_for_chunk(first, prompt_param)
            account(timer, first)
        chunk = first
        answer = Answer()
        pending = fmt.stream_start(first)  # sent with the first text, in one write
        logprobs: list[TokenLogprob] = []  # tokens whose text is still held back go out with the next text
        while not chunk.final:
            answer.add(chunk)
            logprobs += chunk.logprobs
            if chunk.text or chunk.tool_calls or chunk.reasoning or pending:
                yield pending + _piece(fmt, chunk, logprobs)
                pending = b""
                if chunk.text or chunk.tool_calls:  # a call's tokens have no text to go with
                    logprobs = []
            chunk = await stream.next()
            raise_for_chunk(chunk, prompt_param)
            account(timer, chunk)
        answer.add(chunk)
        logprobs += chunk.logprobs
        end = pending + _piece(fmt, chunk, logprobs) + fmt.stream_end(chunk)
        await fmt.after_complete(answer, chunk, svc)  # what it stores is what `end` tells the client
        status, code = 200, None
        timer.done(status, code)
        await settled(timer)
        yield LastEvent(end)
    except Abandoned:
        return  # the client left before the response began (its watch saw it): nobody to tell
    except ApiError as exc:
        status, code = exc.status, exc.code or exc.type
        yield LastEvent(fmt.stream_error(exc))
    except Exception:
        log.exception("stream %s failed", stream.request.request_id)
        status, code = 500, "internal"
        yield LastEvent(fmt.stream_error(dialect.internal_error(stream.request.request_id)))
    finally:
        stream.close()
        timer.done(status, code)
