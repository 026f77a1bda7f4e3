"""The admission thread: each request made ready to run before it reaches the engine thread.

In arrival order, admission renders a request's messages through the chat
template, tokenizes them, compiles its grammar and builds its `Sequence`, then
hands it to the engine thread, so a long prompt never holds up the decoding of
others (the tokenizer releases the GIL). It also refuses what can never run:
an unknown model, a passed deadline, a prompt or answer no context can hold, a
``logit_bias`` naming no token. Models are added and removed through the same
queue, so a request is prepared only for a model the engine thread will have.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from cortex.protocol import Chunk, GenerateRequest, Usage
from cortex.protocol import messages as m
from cortex.worker.constrain import GrammarError, request_constraints
from cortex.worker.detokenize import IncrementalDetokenizer
from cortex.worker.loader import LoadedModel, PromptError
from cortex.worker.output import OutputSplitter
from cortex.worker.reasoning import ReasoningParser, opens_thinking
from cortex.worker.sampling import is_greedy, logit_bias, make_generator, penalties
from cortex.worker.sequence import Emit, LogitsProcessor, RequestRejected, Sequence, error_chunk
from cortex.worker.stops import StopMatcher
from cortex.worker.tool_grammar import offered_tools
from cortex.worker.tool_parser import ToolCallParser

log = logging.getLogger("cortex.worker")


class Counted(Exception):
    """Raised by `_prepare` for a count-only request: the prompt's token count, nothing to run."""

    def __init__(self, tokens: int) -> None:
        super().__init__(tokens)
        self.tokens = tokens


class Cancellations:
    """Cancelled request ids not acted on yet, shared by the admission and engine threads.

    A request may be cancelled before it reaches the engine thread, so admission
    looks here too; whichever thread finds a cancel first acts on it.
    """

    def __init__(self) -> None:
        self._ids: dict[str, None] = {}
        """Insertion-ordered, capped."""
        self._lock = threading.Lock()

    def add(self, request_id: str) -> None:
        with self._lock:
            self._ids[request_id] = None
            if len(self._ids) > 10_000:  # ids of requests that had already finished
                del self._ids[next(iter(self._ids))]

    def take(self, request_id: str) -> bool:
        """Whether `request_id` was cancelled (forgetting it: each cancel is acted on once)."""
        with self._lock:
            if request_id not in self._ids:
                return False
            del self._ids[request_id]
            return True


class Admission:
    """Owns the admission thread; `submit`, `add_model` and `remove_model` are thread-safe.

    What it has prepared goes to `handoff` as ``(kind, payload)``: ``admitted``
    with a `Sequence`, ``add`` with a `LoadedModel`, ``remove`` with the model id,
    the Future for the bytes its removal frees (or for the model itself) and
    whether to keep the model whole (`Engine.take_model`).
    """

    def __init__(self, *, worker_id: str, cancelled: Cancellations, handoff: Callable[[tuple[str, Any]], None]) -> None:
        self.worker_id = worker_id
        self._cancelled = cancelled
        self._handoff = handoff
        self._loaded: dict[str, LoadedModel] = {}
        """The models requests are prepared for (admission thread only)."""
        self._queue: queue.SimpleQueue[tuple[str, Any] | None] = queue.SimpleQueue()
        """Requests, model additions and removals, in the order they were asked for."""
        self._thread = threading.Thread(target=self._admit_all, name="cortex-admission", daemon=True)
        self._stopping = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to stop (see `join`); requests still queued are never admitted."""
        self._stopping = True
        self._queue.put(None)

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, request: GenerateRequest, emit: Emit, processors: list[LogitsProcessor]) -> None:
        self._queue.put(("request", (request, emit, processors)))

    def add_model(self, loaded: LoadedModel) -> None:
        self._queue.put(("add", loaded))

    def remove_model(self, model_id: str, future: Future[Any], keep: bool = False) -> None:
        """Forget the model; the engine thread then frees it (the Future: the bytes freed) or, with `keep`, hands
        it back whole (the Future: its `LoadedModel`, for the host tier)."""
        self._queue.put(("remove", (model_id, future, keep)))

    def _admit_all(self) -> None:
        """The admission thread: prepare each request in arrival order, then hand it to the engine thread."""
        while (item := self._queue.get()) is not None and not self._stopping:
            kind, payload = item
            try:
                if kind == "request":
                    self._admit(*payload)
                elif kind == "add":
                    self._loaded[payload.spec.id] = payload
                    self._handoff(("add", payload))
                elif kind == "remove":
                    self._loaded.pop(payload[0], None)  # later requests are refused at once
                    self._handoff(("remove", payload))
            except BaseException:  # a library panic included: this thread must outlive any one request
                log.exception("admission failed for a %s", kind)
                if kind == "request":
                    request, emit, _ = payload
                    with contextlib.suppress(BaseException):
                        emit(error_chunk(request.request_id, m.ERROR_INTERNAL, "could not start the request",
                                         worker_id=self.worker_id, seq=first_seq(request)))  # fmt: skip
            item = payload = None  # a request left in this frame would keep its model alive after an unload

    def _admit(self, request: GenerateRequest, emit: Emit, processors: list[LogitsProcessor]) -> None:
        if self._cancelled.take(request.request_id):
            return
        seq = self._start(request, emit, processors)
        if seq is not None:
            self._handoff(("admitted", seq))

    def _start(self, request: GenerateRequest, emit: Emit, processors: list[LogitsProcessor]) -> Sequence | None:
        """Admission thread: the request as a sequence ready to prefill, or None once it has been answered."""
        at = first_seq(request)
        try:
            seq = self._prepare(request, emit)
            seq.logits_processors.extend(processors)
            if request.resume is not None:
                _check_resume(seq.loaded, request.resume)
                log.info("resuming %s after %d tokens (attempt %d)", request.request_id,
                         len(request.resume.token_ids), request.resume.attempt)  # fmt: skip
                seq.resume(request.resume)
                if seq.done:
                    return None
        except RequestRejected as exc:
            emit(error_chunk(request.request_id, exc.code, exc.message, worker_id=self.worker_id, param=exc.param,
                             seq=at))  # fmt: skip
            return None
        except Counted as counted:
            n = counted.tokens
            usage = Usage(prompt_tokens=n, completion_tokens=0, total_tokens=n)
            emit(Chunk(request_id=request.request_id, seq=at, prompt_tokens=n, finish_reason=m.FINISH_STOP,
                       usage=usage, worker_id=self.worker_id))  # fmt: skip
            return None
        except Exception as exc:
            # Whatever goes wrong with one request must not take the admission thread down.
            log.exception("could not start %s", request.request_id)
            emit(error_chunk(request.request_id, m.ERROR_INTERNAL, f"could not start: {exc}", worker_id=self.worker_id,
                             seq=at))  # fmt: skip
            return None
        return seq

    def _prepare(self, request: GenerateRequest, emit: Emit) -> Sequence:
        loaded = self._loaded.get(request.model)
        if loaded is None:
            raise RequestRejected(m.ERROR_MODEL_NOT_LOADED, f"model {request.model!r} is not loaded on this worker")
        if request.deadline and time.time() > request.deadline:
            raise RequestRejected(m.ERROR_DEADLINE, "the request's deadline passed before it was started")
        tools = offered_tools(request.tools, request.tool_choice)
        syntax = loaded.reasoning if request.prompt is None else None
        try:
            if request.prompt is not None:
                _refuse_if_surely_too_long(loaded, request.prompt)
                prompt_ids = loaded.tokenize(request.prompt)
                opened = False
            else:
                switch = request.reasoning.enabled if syntax is not None else None
                text = loaded.render_text(request.messages, tools, switch)
                _refuse_if_surely_too_long(loaded, text)
                prompt_ids = loaded.tokenize_rendered(text)
                opened = syntax is not None and opens_thinking(text, syntax)
        except PromptError as exc:
            raise RequestRejected(m.ERROR_INVALID_REQUEST, str(exc)) from exc
        if request.count_only:
            raise Counted(len(prompt_ids))
        if not prompt_ids:
            raise RequestRejected(m.ERROR_INVALID_REQUEST, "the prompt is empty: there is nothing to continue")
        limit = loaded.context_length
        room = limit - len(prompt_ids)
        wanted = request.sampling.max_tokens
        clamped_to = 0
        if room > 0 and wanted is not None and wanted > room and request.clamp_max_tokens:
            wanted = clamped_to = room  # the gateway's policy: answer in what the context leaves
        if room <= 0 or (wanted is not None and wanted > room):
            asked = f", {wanted} in the completion" if wanted is not None else ""
            raise RequestRejected(
                m.ERROR_CONTEXT_LENGTH,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(prompt_ids) + (wanted or 0)} tokens ({len(prompt_ids)} in the messages{asked}). "
                "Please reduce the length of the messages or completion.",
            )
        sampling = request.sampling
        greedy = is_greedy(sampling.temperature)
        builtin = []
        try:
            constraints = request_constraints(loaded, request)
        except GrammarError as exc:
            raise RequestRejected(m.ERROR_INVALID_REQUEST, str(exc)) from exc
        if sampling.presence_penalty or sampling.frequency_penalty:
            vocab = int(loaded.model.config.vocab_size)
            builtin.append(penalties(sampling.presence_penalty, sampling.frequency_penalty, vocab, loaded.device))
        if sampling.logit_bias:
            _check_bias(loaded, sampling.logit_bias)
            builtin.append(logit_bias(sampling.logit_bias, loaded.device))
        return Sequence(
            logits_processors=builtin,
            request=request,
            emit=emit,
            loaded=loaded,
            prompt_ids=prompt_ids,
            max_new_tokens=wanted if wanted is not None else room,
            detok=IncrementalDetokenizer(loaded.tokenizer, prompt_ids),
            stops=StopMatcher(list(sampling.stop)),
            output=OutputSplitter(
                reasoning=ReasoningParser(syntax, thinking=opened) if syntax is not None else None,
                tools=ToolCallParser(loaded.tool_syntax, names=frozenset(t.name for t in tools)) if tools else None,
            ),
            constraints=constraints,
            open_thinking_id=thinking_ids(loaded)[0] if syntax is not None else None,
            close_thinking_ids=thinking_ids(loaded)[1] if syntax is not None else [],
            generator=None if greedy else make_generator(loaded.device, sampling.seed),
            worker_id=self.worker_id,
            clamped_to=clamped_to,
        )


def first_seq(request: GenerateRequest) -> int:
    """The `Chunk.seq` a request's first chunk from here carries: 0, or where a failover resumes it."""
    return request.resume.seq if request.resume is not None else 0


def _check_resume(loaded: LoadedModel, resume: m.Resume) -> None:
    """A 400 for resumed tokens that are no tokens of this model (the gateway sends back what a worker sent)."""
    vocab = int(loaded.model.config.vocab_size)
    if any(not 0 <= token < vocab for token in resume.token_ids):
        raise RequestRejected(m.ERROR_INVALID_REQUEST, "the resumed answer holds token ids this model does not have")


def _refuse_if_surely_too_long(loaded: LoadedModel, text: str) -> None:
    if loaded.surely_too_long(text):
        raise RequestRejected(
            m.ERROR_CONTEXT_LENGTH,
            f"This model's maximum context length is {loaded.context_length} tokens. However, your prompt is "
            f"{len(text)} characters long, more than that many tokens can hold. Please shorten the prompt.",
        )


def _check_bias(loaded: LoadedModel, bias: dict[int, float]) -> None:
    """A 400 naming ``logit_bias`` for an id that is no token of this model (the gateway cannot know its vocabulary)."""
    # Ids past the tokenizer are padding rows of the embedding (never real tokens); past the logits, nothing at all.
    vocab = min(int(loaded.model.config.vocab_size), len(loaded.tokenizer))
    for token in bias:
        if not 0 <= token < vocab:
            raise RequestRejected(m.ERROR_INVALID_REQUEST, f"Invalid key in 'logit_bias': {token}. Maximum value is "
                                  f"{vocab - 1}.", param="logit_bias")  # fmt: skip


def thinking_ids(loaded: LoadedModel) -> tuple[int | None, list[int]]:
    """The token that opens a thinking block (if the tag is one token), and the tokens that close one."""
    cached = loaded.extra.get("thinking_ids")
    if cached is None:
        assert loaded.reasoning is not None
        tokenizer, syntax = loaded.tokenizer, loaded.reasoning
        opening = tokenizer(syntax.open, add_special_tokens=False)["input_ids"]
        closing = tokenizer("\n" + syntax.close, add_special_tokens=False)["input_ids"]
        cached = (opening[0] if len(opening) == 1 else None, list(closing))
        loaded.extra["thinking_ids"] = cached
    return cached
