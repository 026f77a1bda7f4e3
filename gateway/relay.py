"""Requests out, chunks back: the gateway's half of the broker hop.

One wildcard subscription per gateway process receives every chunk for every
request it has in flight; chunks are routed by the request id in the reply
subject to that request's queue, and checked for order so a lost chunk becomes
an error, never a silently shorter answer.

Failover: a `ReplyStream` keeps the token ids of every chunk it has passed on.
When the worker answering vanishes from the fleet, or its chunk sequence breaks,
the stream cancels that attempt and republishes the request as a new attempt
(its own id ``<request-id>-<n>``, reply subject and ``Nats-Msg-Id``) with a
`Resume`: another worker takes those tokens as already generated and continues
the same seq numbering, so the client sees one answer. Chunks of an attempt
given up are dropped by their request id. A stream fails over at most
``failovers`` times; the next failure is the 502 it always was.

Broker faults: while this gateway is cut off from NATS, or just back
(`Bus.settling`), it hears no heartbeats, so a silent worker is not taken for
dead then. Chunks are core NATS messages: those sent while the gateway (or the
worker) was cut off are lost. A lost chunk in the middle shows as a gap in
``seq``; lost last chunks leave none, so an answer that has gone quiet asks the
broker whether its request is still in the stream (`ReplyStream._lost`): a
worker acks it only once its final chunk is out, so gone without an end means
lost, and the answer fails over like any other.

A worker says at once that it took a request, or moved it (`Taken`): before
the first chunk, the stream then watches that worker's liveness as after one.

Conversation affinity (`cortex.gateway.affinity`): a request may go to one
worker's affine subject first. Until that worker takes or moves it, the stream
watches that it still serves the model; if not, or if it dies after taking it
but before its first chunk, the stream sends it on itself (`ReplyStream._reroute`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

import msgspec

from cortex.broker import errors as broker_errors
from cortex.broker.bus import Bus
from cortex.gateway import errors
from cortex.gateway.affinity import Affinity, Placed
from cortex.gateway.inbox import Inbox
from cortex.protocol import Chunk, GenerateRequest, codec, names
from cortex.protocol.messages import (
    ERROR_CONTEXT_LENGTH,
    ERROR_DEADLINE,
    ERROR_INVALID_REQUEST,
    ERROR_MODEL_NOT_LOADED,
    Resume,
    Taken,
)

log = logging.getLogger("cortex.gateway")

LIVENESS_CHECK_S = 0.5
"""How often a request whose chunks have stopped coming checks that its worker is still live (a lookup): a
failover starts this soon after the fleet view stops counting the worker."""
WAITING_CHECK_S = 2.0
"""How often a request no worker has taken yet checks that one will (load on demand: it may write to the broker)."""
SILENCE_CHECK_S = 2.0
"""How long an answer may go without a chunk before it asks the broker whether its end was lost (then as often)."""
QUEUE_READ_S = 1.0
"""How often one gateway reads a model's queue for the positions it tells waiting streams (`Relay.queued`)."""
REPUBLISH_PATIENCE_S = 30.0
"""How long a failover keeps trying to publish its attempt while the broker cannot take it (a cluster that lost a
node elects new leaders for the streams it led, which takes seconds): the client is mid-answer, a 503 would end it."""


class Relay:
    check_waiting: Callable[[str], Awaitable[None]] | None = None
    """Called every few seconds for a request no worker has started (load on demand): raises if it never will."""
    affinity: Affinity | None = None
    """Conversation affinity (`cortex.gateway.affinity`); None: every request goes to its model's shared subject."""

    def __init__(self, bus: Bus, is_live: Callable[[str, str], bool], gateway_id: str | None = None) -> None:
        self.bus = bus
        self.is_live = is_live
        """Whether a worker id, and the process of it named (`Chunk.instance`, "": any), is still live."""
        self.gateway_id = gateway_id or f"gw-{uuid.uuid4().hex[:12]}"
        self._queues: dict[str, Inbox[bytes | Taken]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._queued: dict[str, tuple[float, asyncio.Task[list[int]]]] = {}
        """Per model: when its queue was last read, and the read (shared by every stream waiting on the model)."""

    async def start(self) -> None:
        await self.bus.subscribe(names.reply_wildcard(self.gateway_id), self._on_reply)
        await self.bus.subscribe(names.taken_wildcard(self.gateway_id), self._on_taken)

    def _on_reply(self, subject: str, data: bytes) -> None:
        queue = self._queues.get(names.request_id_from_reply(subject))
        if queue is not None:
            queue.put_nowait(data)

    def _on_taken(self, _subject: str, data: bytes) -> None:
        try:
            notice = codec.decode_taken(data)
        except codec.DecodeError as exc:
            log.warning("a malformed notice of a request taken: %s", exc)
            return
        queue = self._queues.get(notice.request_id)
        if queue is not None:
            queue.put_nowait(notice)

    def reply_subject(self, request_id: str) -> str:
        return names.reply_subject(self.gateway_id, request_id)

    async def submit(
        self, request: GenerateRequest, *, failovers: int = 0, on_failover: Callable[[], None] | None = None
    ) -> ReplyStream:
        """Queue `request` durably and return the stream of its chunks.

        If its worker dies mid-answer, the stream continues it on another one up to
        `failovers` times, calling `on_failover` each time (metrics).
        """
        queue: Inbox[bytes | Taken] = Inbox()
        worker = ""
        if self.affinity is not None and request.resume is None:
            request, worker = self.affinity.route(request)
        seq, worker = await self._publish(request, queue, worker)
        return ReplyStream(self, request, queue, seq, failovers=failovers, on_failover=on_failover, affine_to=worker)

    async def _publish(
        self, request: GenerateRequest, queue: Inbox[bytes | Taken], worker: str = ""
    ) -> tuple[int, str]:
        """Route `request`'s replies to `queue` and publish it, with its id as ``Nats-Msg-Id``, to `worker`'s affine
        subject if one is named (else, or if that fails, the shared one); its stream sequence and the worker."""
        self._queues[request.request_id] = queue
        published = False
        try:
            if worker:
                try:
                    seq = await self.bus.publish_request(request.model, codec.encode(request),
                                                         msg_id=request.request_id, worker=worker)  # fmt: skip
                    published = True
                    return seq, worker
                except broker_errors.PayloadTooLarge:
                    raise
                except broker_errors.BrokerError as exc:  # a full affine queue, a stream without affine subjects...
                    log.info("request %s not sent to %s first: %s", request.request_id, worker, exc)
            seq = await self.bus.publish_request(request.model, codec.encode(request), msg_id=request.request_id)
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
        return seq, ""

    async def _switch(self, old_id: str, attempt: GenerateRequest, queue: Inbox[bytes | Taken]) -> int:
        """Give up attempt `old_id` (its chunks are dropped from now on, its worker told to stop), publish `attempt`."""
        self._queues.pop(old_id, None)
        await self._cancel(old_id)
        give_up = time.monotonic() + REPUBLISH_PATIENCE_S
        while True:
            try:
                return (await self._publish(attempt, queue))[0]
            except errors.NoCapacity as exc:
                if time.monotonic() >= give_up or (attempt.deadline and time.time() >= attempt.deadline):
                    raise
                log.info("attempt %s not published yet, trying again: %s", attempt.request_id, exc.message)
                await asyncio.sleep(LIVENESS_CHECK_S)

    async def queued(self, model: str, limit: int) -> list[int] | None:
        """The stream sequences of the first `limit` requests in `model`'s queue, read at most once per
        `QUEUE_READ_S` for all of this gateway's streams; None when the broker cannot tell now."""
        now = time.monotonic()
        read = self._queued.get(model)
        if read is None or now - read[0] >= QUEUE_READ_S:
            read = (now, asyncio.get_running_loop().create_task(self.bus.queued_seqs(model, limit)))
            self._queued[model] = read
        try:
            return await asyncio.shield(read[1])
        except broker_errors.BrokerError as exc:
            log.debug("cannot read the queue of %s: %s", model, exc)
            return None

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
    """The chunks of one request, in order, until the final one or the deadline, across failovers."""

    def __init__(
        self,
        relay: Relay,
        request: GenerateRequest,
        queue: Inbox[bytes | Taken],
        seq: int = 0,
        *,
        failovers: int = 0,
        on_failover: Callable[[], None] | None = None,
        affine_to: str = "",
    ) -> None:
        self._relay = relay
        self.request = request
        """The request as first published (attempt 0)."""
        self._queue = queue
        self._next_seq = 0
        self.finished = False
        self.worker_id = ""
        """The worker answering the current attempt, once it has said so (`Taken`) or a chunk of it has named it."""
        self.instance = ""
        """Which start of that worker's process is answering ("" when it does not say)."""
        self.attempt = 0
        self.wire_id = request.request_id
        """The current attempt's id on the wire: the request id, then ``<request-id>-<attempt>`` after failovers."""
        self.delivered: list[int] = []
        """The token ids of every chunk passed on: what a failover resumes from."""
        self._covered = 0
        """Tokens the chunks passed on say they cover (a worker that sends no token ids cannot be resumed)."""
        self.failovers_left = failovers
        self._failovers = failovers
        self._on_failover = on_failover
        self._abandoned = False
        self._interrupted = ""
        """Why the last failover happened, while its attempt has no worker yet."""
        self._seq_in_stream = seq
        """The current attempt's sequence in the request stream (`_lost` looks it up)."""
        self._heard_at = self._next_check = time.monotonic()
        """When the current attempt was published or its last chunk came; when `_lost` may ask next."""
        self._reconnects = relay.bus.reconnects
        """The gateway's reconnects counted when `_lost` last asked (or at the publish)."""
        self._placed = Placed(relay.affinity, affine_to)
        """Which worker's affine subject holds the current attempt, and whose slot it takes (affinity's counts)."""
        self._started = False
        """A chunk of the current attempt has come."""
        self._answered = False
        """The final chunk came without an error: its worker now holds the prompt in its cache."""

    async def next(self, patience: float | None = None) -> Chunk:
        """The next chunk; raises DeadlineExceeded, UpstreamError, Abandoned, or StillWaiting after `patience` s.

        A worker that vanishes, or a chunk sequence that breaks, is failed over
        here while failovers are left: the caller only sees the answer go on.
        """
        give_up = time.monotonic() + patience if patience is not None else None
        while True:
            data = await self._receive(give_up)
            if isinstance(data, Taken):
                self._taken(data)
                continue
            if data is _ABANDONED or not data:
                raise Abandoned
            try:
                chunk = codec.decode_chunk(data)
            except codec.DecodeError as exc:
                raise errors.UpstreamError(f"A worker sent a malformed chunk: {exc}") from exc
            if chunk.request_id != self.wire_id:
                continue  # queued before its attempt was given up
            if chunk.seq != self._next_seq:
                await self._fail_over(
                    f"The answer was interrupted: expected chunk {self._next_seq}, got {chunk.seq} "
                    f"(worker {chunk.worker_id or self.worker_id or 'unknown'} restarted or lost messages)."
                )
                continue
            self._next_seq += 1
            self._heard_at = time.monotonic()
            self._interrupted = ""
            self._started = True
            self.delivered += chunk.token_ids
            self._covered += chunk.tokens
            if chunk.worker_id:
                self._placed.taken(chunk.worker_id)
                self.worker_id, self.instance = chunk.worker_id, chunk.instance
            if chunk.stream_seq:
                self._seq_in_stream = chunk.stream_seq  # moved from an affine subject: `_lost` asks after this one
            if chunk.final:
                self.finished = True
                self._answered = chunk.error is None
            return chunk

    def _taken(self, notice: Taken) -> None:
        """The current attempt's worker took it, or moved it to the shared queue: heard before its first chunk."""
        if notice.request_id != self.wire_id or self._started:
            return  # an attempt given up, or one whose chunks say it all already
        if notice.moved:
            self._placed.moved()
        else:
            self._placed.taken(notice.worker_id)
            self.worker_id, self.instance = notice.worker_id, notice.instance
            self._heard_at = time.monotonic()
        if notice.stream_seq or not notice.moved:
            self._seq_in_stream = notice.stream_seq  # 0: the worker holds the only copy, nothing to ask after

    def abandon(self) -> None:
        """Make a pending or later `next()` raise Abandoned (the client disconnected); it never fails over again."""
        self._abandoned = True
        self._queue.put_nowait(_ABANDONED)

    async def _receive(self, give_up: float | None) -> bytes | Taken:
        """The next message, checking every few seconds that the worker on it is still alive."""
        if not self._queue.empty():
            return self._queue.get_nowait()
        while True:
            check = LIVENESS_CHECK_S if self.worker_id or self._placed.waiting else WAITING_CHECK_S
            remaining = self.request.deadline - time.time() if self.request.deadline else check
            if remaining <= 0:
                raise errors.DeadlineExceeded("The request did not complete before its deadline.")
            wait = min(remaining, check)
            if give_up is not None:
                if give_up <= time.monotonic():
                    raise StillWaiting
                wait = min(wait, give_up - time.monotonic())
            try:
                return await self._queue.get(wait)
            except TimeoutError:
                pass
            if self._relay.bus.settling():
                continue  # this gateway has been deaf to the fleet: silence proves nothing yet
            if self.worker_id and not self._relay.is_live(self.worker_id, self.instance):
                if self._started:
                    await self._fail_over(
                        f"Worker {self.worker_id} stopped answering in the middle of the request (it left the fleet, "
                        "or restarted)."
                    )
                elif self._placed.affine_to:  # taken from its affine subject: no other worker can have it
                    await self._reroute(f"worker {self.worker_id} left before its first chunk")
                else:  # taken from the shared queue: JetStream offers it to another worker after its ack wait
                    self._placed.run_on("")
                    self.worker_id = self.instance = ""
            elif self._placed.waiting and not self._placed.serves(self.request.model):
                await self._reroute(f"worker {self._placed.affine_to} no longer serves {self.request.model}")
            elif self._placed.overdue():
                await self._reroute(f"worker {self._placed.affine_to} neither took nor moved it in time")
            elif await self._lost():
                if self._placed.affine_to and not self._started:  # it may only have moved: never a failover
                    await self._reroute("it left the stream before any chunk came")
                    continue
                await self._fail_over(
                    f"The answer's last chunks were lost on the way (worker {self.worker_id or 'unknown'} finished it "
                    "while a connection to the broker was broken)."
                )
            elif not self.worker_id and not self._placed.waiting and self._relay.check_waiting is not None:
                try:
                    await self._relay.check_waiting(self.request.model)
                except errors.ApiError as exc:
                    if not self._interrupted:
                        raise
                    # Still the interrupted answer's failure, naming the worker that died, not a fresh 503.
                    raise errors.UpstreamError(f"{self._interrupted} No other worker can continue it: {exc}") from exc

    async def ahead_in_queue(self, limit: int) -> int | None:
        """Requests for the model in the queue ahead of this one (waiting or running), counting at most `limit`;
        None when the broker cannot tell now."""
        seqs = await self._relay.queued(self.request.model, limit)
        return None if seqs is None else sum(1 for seq in seqs if seq < self._seq_in_stream)

    async def _lost(self) -> bool:
        """Whether the current attempt's answer is over, though its end never came: its request left the stream.

        Asked of a started answer silent for `SILENCE_CHECK_S` (then as often), and
        of one not started yet once after each reconnect of this gateway: a request
        waiting in the queue loses nothing, unless a worker took and answered it
        while the gateway was away.
        """
        now = time.monotonic()
        if not self._seq_in_stream or now - self._heard_at < SILENCE_CHECK_S or now < self._next_check:
            return False  # (no sequence: a worker runs the only copy, having moved it out of the stream)
        reconnects = self._relay.bus.reconnects
        if not self.worker_id and reconnects == self._reconnects:
            return False
        self._next_check, self._reconnects = now + SILENCE_CHECK_S, reconnects
        try:
            return await self._relay.bus.request_settled(self._seq_in_stream)
        except broker_errors.BrokerError as exc:
            log.debug("cannot tell whether %s is still queued: %s", self.wire_id, exc)
            return False

    async def _reroute(self, why: str) -> None:
        """Send a request sent to a worker first to the shared subject as a new attempt, before any chunk came.

        The old attempt is cancelled (a worker holding it drops it, and one that gets
        a moved copy acks it unrun) and its message deleted if still there; nothing was
        delivered, so nothing is resumed, and no failover is counted.
        """
        if self._abandoned:
            raise Abandoned
        if self._started:  # chunks came: restarting from scratch would repeat them; continue it instead
            return await self._fail_over(why)
        worker, old_seq = self._placed.affine_to, self._seq_in_stream
        log.info("request %s sent on as attempt %d to the shared queue: %s (it was sent to %s first)",
                 self.request.request_id, self.attempt + 1, why, worker)  # fmt: skip
        await self._next_attempt(None)
        if old_seq:
            await self._relay.bus.drop_request(old_seq)

    async def _next_attempt(self, resume: Resume | None) -> None:
        """Give up the current attempt and publish the next, ``<request-id>-<n>``, resuming after `resume` if given."""
        self._placed.moved()
        self._placed.run_on("")
        self.worker_id, self.instance, self._started = "", "", False
        self.attempt += 1
        old, self.wire_id = self.wire_id, f"{self.request.request_id}-{self.attempt}"
        attempt = msgspec.structs.replace(
            self.request, request_id=self.wire_id, reply_subject=self._relay.reply_subject(self.wire_id), resume=resume
        )
        self._seq_in_stream = await self._relay._switch(old, attempt, self._queue)
        self._heard_at = time.monotonic()

    async def _fail_over(self, why: str) -> None:
        """Continue the answer on another worker from the tokens delivered so far, or raise UpstreamError(`why`)."""
        if self._abandoned:
            raise Abandoned  # nobody to continue for: a cancelled request is never resumed
        if self.failovers_left <= 0:
            tried = f" It had been continued elsewhere {self._failovers} times already." if self._failovers else ""
            raise errors.UpstreamError(why + tried)
        if self._covered != len(self.delivered):
            raise errors.UpstreamError(why + " (its worker does not report token ids, so it cannot be continued).")
        self.failovers_left -= 1
        log.warning("failover %d of %s (%s): %d tokens delivered; continuing as attempt %d",
                    self.attempt + 1, self.request.request_id, why, len(self.delivered), self.attempt + 1)  # fmt: skip
        self._interrupted = why
        await self._next_attempt(Resume(token_ids=list(self.delivered), seq=self._next_seq, attempt=self.attempt + 1))
        if self._on_failover is not None:
            self._on_failover()

    def close(self) -> None:
        """Forget the request; tell the workers to stop if it had not finished."""
        self._placed.close(self.request, self.worker_id if self._answered else "")
        self._relay._close(self.wire_id)
        if not self.finished:
            self.finished = True
            self._relay._cancel_soon(self.wire_id)


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
