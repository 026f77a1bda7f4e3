"""Requests out, chunks back: the gateway's half of the broker hop.

One wildcard subscription per gateway process receives every chunk for every
request it has in flight; chunks are routed by the request id in the reply
subject to that request's queue, and checked for order so a lost chunk becomes
an error, never a silently shorter answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from cortex.broker import errors as broker_errors
from cortex.broker.bus import Bus
from cortex.gateway import errors
from cortex.protocol import Chunk, GenerateRequest, codec, names
from cortex.protocol.messages import (
    ERROR_CONTEXT_LENGTH,
    ERROR_DEADLINE,
    ERROR_INVALID_REQUEST,
    ERROR_MODEL_NOT_LOADED,
)

log = logging.getLogger("cortex.gateway")

LIVENESS_CHECK_S = 2.0
"""How often a waiting request checks that its worker is still in the fleet."""


class Relay:
    check_waiting: Callable[[str], Awaitable[None]] | None = None
    """Called every few seconds for a request no worker has started (load on demand): raises if it never will."""

    def __init__(self, bus: Bus, is_live: Callable[[str], bool], gateway_id: str | None = None) -> None:
        self.bus = bus
        self.is_live = is_live
        """Whether a worker id still has a live advert (a worker that vanished won't answer)."""
        self.gateway_id = gateway_id or f"gw-{uuid.uuid4().hex[:12]}"
        self._queues: dict[str, asyncio.Queue[bytes]] = {}
        self._background: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self.bus.subscribe(names.reply_wildcard(self.gateway_id), self._on_reply)

    def _on_reply(self, subject: str, data: bytes) -> None:
        queue = self._queues.get(names.request_id_from_reply(subject))
        if queue is not None:
            queue.put_nowait(data)

    def reply_subject(self, request_id: str) -> str:
        return names.reply_subject(self.gateway_id, request_id)

    async def submit(self, request: GenerateRequest) -> ReplyStream:
        """Queue `request` durably and return the stream of its chunks."""
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._queues[request.request_id] = queue
        published = False
        try:
            await self.bus.publish_request(request.model, codec.encode(request), msg_id=request.request_id)
            published = True
        except broker_errors.PayloadTooLarge as exc:
            raise errors.PayloadTooLarge(f"The request is too large: {exc}") from exc
        except broker_errors.QueueFull as exc:
            raise errors.QueueFull(f"Too many requests are waiting for `{request.model}`; retry later.") from exc
        except broker_errors.BrokerError as exc:
            raise errors.NoCapacity(f"The request broker is unavailable: {exc}") from exc
        finally:
            if not published:
                self._queues.pop(request.request_id, None)
        return ReplyStream(self, request, queue)

    def _close(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    def _cancel_soon(self, request_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._cancel(request_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _cancel(self, request_id: str) -> None:
        try:
            await self.bus.publish(names.cancel_subject(), request_id.encode())
        except broker_errors.BrokerError as exc:
            log.warning("cancel of %s not sent: %s", request_id, exc)


class StillWaiting(Exception):
    """`ReplyStream.next` ran out of the patience it was given; nothing is lost, ask again."""


class Abandoned(Exception):
    """The client went away while its request waited (see `ReplyStream.abandon`)."""


_ABANDONED = b""
"""Queued by `abandon`; no chunk is ever empty."""


class ReplyStream:
    """The chunks of one request, in order, until the final one or the deadline."""

    def __init__(self, relay: Relay, request: GenerateRequest, queue: asyncio.Queue[bytes]) -> None:
        self._relay = relay
        self.request = request
        self._queue = queue
        self._next_seq = 0
        self.finished = False
        self.worker_id = ""

    async def next(self, patience: float | None = None) -> Chunk:
        """The next chunk; raises DeadlineExceeded, UpstreamError, Abandoned, or StillWaiting after `patience` s."""
        data = await self._receive(patience)
        if data is _ABANDONED or not data:
            raise Abandoned
        try:
            chunk = codec.decode_chunk(data)
        except codec.DecodeError as exc:
            raise errors.UpstreamError(f"A worker sent a malformed chunk: {exc}") from exc
        if chunk.seq != self._next_seq:
            raise errors.UpstreamError(
                f"The answer was interrupted: expected chunk {self._next_seq}, got {chunk.seq} "
                f"(worker {chunk.worker_id or self.worker_id or 'unknown'} restarted or lost messages)."
            )
        self._next_seq += 1
        if chunk.worker_id:
            self.worker_id = chunk.worker_id
        if chunk.final:
            self.finished = True
        return chunk

    def abandon(self) -> None:
        """Make a pending or later `next()` raise Abandoned (the client disconnected)."""
        self._queue.put_nowait(_ABANDONED)

    async def _receive(self, patience: float | None) -> bytes:
        """The next message, checking every few seconds that the worker on it is still alive."""
        if not self._queue.empty():
            return self._queue.get_nowait()
        give_up = time.monotonic() + patience if patience is not None else None
        while True:
            remaining = self.request.deadline - time.time() if self.request.deadline else LIVENESS_CHECK_S
            if remaining <= 0:
                raise errors.DeadlineExceeded("The request did not complete before its deadline.")
            wait = min(remaining, LIVENESS_CHECK_S)
            if give_up is not None:
                if give_up <= time.monotonic():
                    raise StillWaiting
                wait = min(wait, give_up - time.monotonic())
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for spawns a task per call, and
                # this runs for nearly every chunk of every stream.
                async with asyncio.timeout(wait):
                    return await self._queue.get()
            except TimeoutError:
                pass
            if self.worker_id and not self._relay.is_live(self.worker_id):
                raise errors.UpstreamError(
                    f"Worker {self.worker_id} stopped answering in the middle of the request (it left the fleet)."
                )
            if not self.worker_id and self._relay.check_waiting is not None:
                await self._relay.check_waiting(self.request.model)

    def close(self) -> None:
        """Forget the request; tell the workers to stop if it had not finished."""
        self._relay._close(self.request.request_id)
        if not self.finished:
            self.finished = True
            self._relay._cancel_soon(self.request.request_id)


def raise_for_chunk(chunk: Chunk, prompt_param: str = "messages") -> None:
    """Turn a worker's error chunk into the gateway's exception for it.

    A 400 names the field the worker named (``logit_bias``), else the prompt, as `prompt_param`.
    """
    if chunk.error is None:
        return
    code, message = chunk.error.code, chunk.error.message
    if code == ERROR_CONTEXT_LENGTH:
        raise errors.InvalidRequest(message, param=prompt_param, code=code)
    if code == ERROR_INVALID_REQUEST:
        raise errors.InvalidRequest(message, param=chunk.error.param or prompt_param)
    if code == ERROR_DEADLINE:
        raise errors.DeadlineExceeded(message)
    if code == ERROR_MODEL_NOT_LOADED:
        raise errors.NoCapacity(message)
    raise errors.UpstreamError(f"The worker failed: {message}")  # ERROR_INTERNAL, or a code newer than this gateway
