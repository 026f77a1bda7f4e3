"""The engine thread: continuous batching, and the only code that runs the model.

Requests arrive through `Engine.submit` from the asyncio side and leave as
`Chunk`s through the `emit` callback each was submitted with (thread-safe,
non-blocking). An admission thread first renders each prompt through the chat
template, tokenizes it and compiles its grammar, so a long prompt never holds
up the decoding of others (the tokenizer releases the GIL). Each loop
iteration of the engine thread does:

1. take admitted requests, cancellations and calls from the inbox;
2. one prefill action: either a group of short waiting prompts in one padded
   forward pass (up to `max_prefill_tokens`), or one `prefill_chunk` of a long
   prompt, a prompt with a prefix-cache hit, or a preempted sequence; each
   sequence that finishes prefill samples its first token, which is sent at
   once, and joins its model's running `Batch`;
3. one decoding step of every model's batch: each row gets one token, with its
   own sampling parameters, logits processors, stop strings, limits and deadline.

So requests join at the next step and leave when done; long prompts never stall
the others' decoding for more than one chunk. KV memory is bounded by
`kv_budget_tokens` (per model): new rows wait while the batch is full, and if
the running batch outgrows it, its newest row is preempted and later resumed by
recomputation (the client sees nothing but a pause).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from transformers import DynamicCache

from cortex.protocol import Chunk, ChunkError, GenerateRequest, TokenLogprob, Usage
from cortex.protocol import messages as m
from cortex.worker import kvcache
from cortex.worker.batch import Batch, forward
from cortex.worker.constrain import GrammarError, request_constraints
from cortex.worker.detokenize import IncrementalDetokenizer
from cortex.worker.loader import LoadedModel, PromptError
from cortex.worker.output import OutputSplitter
from cortex.worker.reasoning import ReasoningParser, opens_thinking
from cortex.worker.sampling import is_greedy, logit_bias, make_generator, penalties, sample
from cortex.worker.sequence import Emit, LogitsProcessor, RequestRejected, Sequence, error_chunk
from cortex.worker.stops import StopMatcher
from cortex.worker.tools import ToolCallParser, offered_tools

log = logging.getLogger("cortex.worker")
T = TypeVar("T")


class Counted(Exception):
    """Raised by `_prepare` for a count-only request: the prompt's token count, nothing to run."""

    def __init__(self, tokens: int) -> None:
        super().__init__(tokens)
        self.tokens = tokens


HEADROOM_TOKENS = 64
"""Columns a batch is expected to grow before the next admission check."""


@dataclass
class EngineLimits:
    max_prefill_tokens: int = 2048
    """Padded tokens one grouped prefill may process."""
    prefill_chunk: int = 512
    """Longer prompts are prefilled alone, this many tokens per loop iteration."""
    kv_budget_tokens: int = 0
    """Padded KV cells (rows x columns) a model's batch may hold; 0 derives it from device memory."""
    prefix_cache_tokens: int = 16384
    """Tokens of finished sequences kept for prefix reuse, per model (0 disables it)."""
    step_delay: float = 0.0
    """Seconds to pause after each decode step: a slow device, so tests and demos can hold requests in flight."""


@dataclass
class _ModelState:
    loaded: LoadedModel
    batch: Batch
    prefix: kvcache.PrefixCache
    kv_budget: int


class Engine:
    """Owns the device thread; `submit`, `cancel`, `call` and `add_model` are thread-safe."""

    def __init__(self, *, worker_id: str, limits: EngineLimits | None = None) -> None:
        self.worker_id = worker_id
        self.limits = limits or EngineLimits()
        self._models: dict[str, _ModelState] = {}
        self._loaded: dict[str, LoadedModel] = {}
        """The models admission prepares requests for (admission thread only)."""
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._admissions: queue.SimpleQueue[tuple[str, Any] | None] = queue.SimpleQueue()
        """Requests, model additions and removals, in the order they were asked for."""
        self._cancelled: dict[str, None] = {}
        """Cancelled request ids the engine thread had not seen yet (insertion-ordered, capped)."""
        self._cancelled_lock = threading.Lock()
        self._admission = threading.Thread(target=self._admit_all, name="cortex-admission", daemon=True)
        self._waiting: deque[Sequence] = deque()
        self._chunked: Sequence | None = None
        self._chunked_cache: DynamicCache | None = None
        self._thread = threading.Thread(target=self._run, name="cortex-engine", daemon=True)
        self._stopping = False
        self.preemptions = 0

    # -- called from any thread ---------------------------------------------

    def start(self) -> None:
        self._thread.start()
        self._admission.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._inbox.put(("stop", None))
        self._admissions.put(None)
        for thread in (self._thread, self._admission):
            if thread.is_alive():
                thread.join(timeout)

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` on the engine thread (model loading); its result arrives as a Future."""
        future: Future[T] = Future()
        self._inbox.put(("call", (fn, future)))
        return future

    def add_model(self, loaded: LoadedModel) -> None:
        self._admissions.put(("add", loaded))

    def remove_model(self, model_id: str) -> Future[int]:
        """Drop a model (its requests must have finished); the Future gives the bytes this freed, measured.

        Through admission, like requests and additions: everything asked for before is
        admitted first, and nothing there still holds the model when it is freed.
        """
        future: Future[int] = Future()
        self._admissions.put(("remove", (model_id, future)))
        return future

    def _remove(self, model_id: str) -> int:
        if model_id not in self._models:
            return 0
        for seq in self._all_sequences():  # none, normally: the worker waits for them first
            if seq.request.model == model_id:
                seq.finish(error=ChunkError(code=m.ERROR_MODEL_NOT_LOADED, message=f"{model_id} was unloaded"))
        self._drop_done()
        state = self._models.pop(model_id)
        device = state.loaded.device
        before = memory_in_use(device)
        del state
        return max(0, before - release_memory(device))

    def submit(
        self, request: GenerateRequest, emit: Emit, logits_processors: list[LogitsProcessor] | None = None
    ) -> None:
        """Queue a request; `logits_processors` (constrained decoding) run on its logits before each pick."""
        self._admissions.put(("request", (request, emit, list(logits_processors or []))))

    def cancel(self, request_id: str) -> None:
        # Remembered for admission too: the request may not have reached the engine thread yet.
        with self._cancelled_lock:
            self._cancelled[request_id] = None
            if len(self._cancelled) > 10_000:  # ids of requests that had already finished
                del self._cancelled[next(iter(self._cancelled))]
        self._inbox.put(("cancel", request_id))

    def _take_cancel(self, request_id: str) -> bool:
        """Whether `request_id` was cancelled (forgetting it: each cancel is acted on once)."""
        with self._cancelled_lock:
            if request_id not in self._cancelled:
                return False
            del self._cancelled[request_id]
            return True

    def running(self) -> int:
        """Sequences waiting, prefilling or decoding. Engine thread only: use ``call(engine.running)``."""
        return len([s for s in self._all_sequences() if not s.done])

    # -- the engine thread ----------------------------------------------------

    def _busy(self) -> bool:
        return bool(self._waiting or self._chunked or any(s.batch.rows for s in self._models.values()))

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stopping:
                try:
                    self._drain_inbox(block=not self._busy())
                    if self._stopping:
                        break
                    self._prefill_round()
                    self._decode_all()
                except Exception as exc:
                    # A bug must cost the requests in flight, never the engine thread.
                    log.exception("engine step failed; failing the requests in flight")
                    self._fail_all(exc)

    def _decode_all(self) -> None:
        # A method of its own: a loop variable left in `_run`'s frame would keep a removed model alive.
        decoded = False
        for state in list(self._models.values()):
            if state.batch.rows:
                self._decode(state)
                decoded = True
        if decoded and self.limits.step_delay:
            time.sleep(self.limits.step_delay)

    def _fail_all(self, exc: Exception) -> None:
        error = ChunkError(code=m.ERROR_INTERNAL, message=f"the engine failed: {exc}")
        for seq in self._all_sequences():
            seq.finish(error=error)
        self._waiting.clear()
        self._chunked, self._chunked_cache = None, None
        for state in self._models.values():
            state.batch.drop([])

    def _drain_inbox(self, *, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(*item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "admitted":
            self._join(payload)
        elif kind == "cancel":
            self._cancel(payload)
        elif kind == "add":
            self._models[payload.spec.id] = _ModelState(
                loaded=payload,
                batch=Batch(payload),
                prefix=kvcache.PrefixCache(self.limits.prefix_cache_tokens),
                kv_budget=self.limits.kv_budget_tokens or default_kv_budget(payload),
            )
        elif kind == "call":
            fn, future = payload
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)
        elif kind == "stop":
            self._stopping = True

    def _cancel(self, request_id: str) -> None:
        for seq in self._all_sequences():
            if seq.request_id == request_id and not seq.done:
                seq.done = True  # silently: nobody listens any more
                self._take_cancel(request_id)
                log.info("cancelled %s after %d tokens", request_id, len(seq.generated_ids))
        self._drop_done()

    def _drop_done(self) -> None:
        """Forget the sequences that have finished, wherever they wait or run."""
        self._waiting = deque(s for s in self._waiting if not s.done)
        if self._chunked is not None and self._chunked.done:
            self._chunked, self._chunked_cache = None, None
        for state in self._models.values():
            state.batch.drop([i for i, row in enumerate(state.batch.rows) if not row.done])

    def _all_sequences(self) -> list[Sequence]:
        seqs = list(self._waiting)
        if self._chunked is not None:
            seqs.append(self._chunked)
        for state in self._models.values():
            seqs.extend(state.batch.rows)
        return seqs

    # -- admission ----------------------------------------------------------------

    def _admit_all(self) -> None:
        """The admission thread: prepare each request in arrival order, then hand it to the engine thread."""
        while (item := self._admissions.get()) is not None and not self._stopping:
            kind, payload = item
            try:
                if kind == "request":
                    self._admit(*payload)
                elif kind == "add":
                    self._loaded[payload.spec.id] = payload
                    self._inbox.put(("add", payload))
                elif kind == "remove":
                    self._removal(*payload)
            except BaseException:  # a library panic included: this thread must outlive any one request
                log.exception("admission failed for a %s", kind)
                if kind == "request":
                    request, emit, _ = payload
                    with contextlib.suppress(BaseException):
                        emit(error_chunk(request.request_id, m.ERROR_INTERNAL, "could not start the request",
                                         worker_id=self.worker_id))  # fmt: skip
            item = payload = None  # a request left in this frame would keep its model alive after an unload

    def _removal(self, model_id: str, future: Future[int]) -> None:
        self._loaded.pop(model_id, None)  # later requests are refused at once
        self._inbox.put(("call", (lambda: self._remove(model_id), future)))

    def _admit(self, request: GenerateRequest, emit: Emit, processors: list[LogitsProcessor]) -> None:
        if self._take_cancel(request.request_id):
            return
        seq = self._start(request, emit, processors)
        if seq is not None:
            self._inbox.put(("admitted", seq))

    def _join(self, seq: Sequence) -> None:
        """Engine thread: an admitted request waits for prefill, unless it was cancelled or its model left."""
        if self._take_cancel(seq.request_id):
            return
        state = self._models.get(seq.request.model)
        if state is None or state.loaded is not seq.loaded:
            seq.finish(error=ChunkError(code=m.ERROR_MODEL_NOT_LOADED, message=f"{seq.request.model} was unloaded"))
            return
        self._waiting.append(seq)

    def _start(self, request: GenerateRequest, emit: Emit, processors: list[LogitsProcessor]) -> Sequence | None:
        """Admission thread: the request as a sequence ready to prefill, or None once it has been answered."""
        try:
            seq = self._prepare(request, emit)
            seq.logits_processors.extend(processors)
        except RequestRejected as exc:
            emit(error_chunk(request.request_id, exc.code, exc.message, worker_id=self.worker_id, param=exc.param))
            return None
        except Counted as counted:
            n = counted.tokens
            usage = Usage(prompt_tokens=n, completion_tokens=0, total_tokens=n)
            emit(Chunk(request_id=request.request_id, seq=0, prompt_tokens=n, finish_reason=m.FINISH_STOP,
                       usage=usage, worker_id=self.worker_id))  # fmt: skip
            return None
        except Exception as exc:
            # Whatever goes wrong with one request must not take the admission thread down.
            log.exception("could not start %s", request.request_id)
            emit(error_chunk(request.request_id, m.ERROR_INTERNAL, f"could not start: {exc}", worker_id=self.worker_id))
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

    def _fits(self, state: _ModelState, rows: int, width: int) -> bool:
        batch = state.batch
        total_rows = len(batch) + rows
        return not batch.rows or total_rows * (max(batch.width, width) + HEADROOM_TOKENS) <= state.kv_budget

    # -- prefill ------------------------------------------------------------------

    def _prefill_round(self) -> None:
        """Prefill work worth up to `max_prefill_tokens` before the next decoding step."""
        budget = self.limits.max_prefill_tokens
        while budget > 0 and (self._waiting or self._chunked is not None):
            spent = self._prefill_once()
            if not spent:
                return
            budget -= spent

    def _prefill_once(self) -> int:
        """One prefill action; returns the tokens it computed (0: nothing could run)."""
        if self._chunked is None and self._waiting:
            head = self._waiting[0]
            state = self._models[head.request.model]
            context = head.prompt_ids + head.generated_ids[:-1]
            if not self._fits(state, 1, len(context)):
                return 0  # wait for rows to finish
            cached, prefix_kv = state.prefix.match(context)
            # A short prefix hit is not worth giving up a grouped prefill: one
            # padded pass over many prompts beats many small passes.
            use_hit = cached >= self.limits.prefill_chunk or (cached > 0 and not self._has_group_peer(head))
            if use_hit or len(context) > self.limits.prefill_chunk or head.generated_ids:
                if not use_hit:
                    cached, prefix_kv = 0, None
                self._waiting.popleft()
                self._chunked = head
                self._chunked_cache = kvcache.from_tensors(prefix_kv) if prefix_kv is not None else None
                head.prefilled = cached
                if not head.generated_ids:
                    head.cached_tokens = cached
            else:
                return self._prefill_group(state)
        if self._chunked is not None:
            return self._prefill_chunk()
        return 0

    def _groupable(self, seq: Sequence, model: str) -> bool:
        return seq.request.model == model and not seq.generated_ids and len(seq.prompt_ids) <= self.limits.prefill_chunk

    def _has_group_peer(self, head: Sequence) -> bool:
        return any(self._groupable(seq, head.request.model) for seq in list(self._waiting)[1:8])

    def _prefill_group(self, state: _ModelState) -> int:
        """Prefill consecutive short fresh prompts of one model in one padded pass."""
        group: list[Sequence] = []
        width = 0
        while self._waiting:
            seq = self._waiting[0]
            n = len(seq.prompt_ids)
            new_width = max(width, n)
            if not self._groupable(seq, state.loaded.spec.id):
                break
            if group and (new_width * (len(group) + 1) > self.limits.max_prefill_tokens
                          or not self._fits(state, len(group) + 1, new_width)):  # fmt: skip
                break
            group.append(self._waiting.popleft())
            width = new_width
        device = state.loaded.device
        pad = int(state.loaded.tokenizer.pad_token_id or 0)
        ids = torch.full((len(group), width), pad, dtype=torch.long, device=device)
        mask = torch.zeros((len(group), width), dtype=torch.long, device=device)
        for i, seq in enumerate(group):
            n = len(seq.prompt_ids)
            ids[i, width - n :] = torch.tensor(seq.prompt_ids, device=device)
            mask[i, width - n :] = 1
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        try:
            logits, cache = forward(state.loaded, ids, mask, positions, None)
        except Exception as exc:
            log.exception("prefill failed")
            for seq in group:
                seq.finish(error=ChunkError(code=m.ERROR_INTERNAL, message=f"prefill failed: {exc}"))
            return int(ids.numel())
        self._first_tokens(state, group, logits, cache, mask)
        return int(ids.numel())

    def _prefill_chunk(self) -> int:
        seq = self._chunked
        assert seq is not None
        state = self._models[seq.request.model]
        context = seq.prompt_ids + seq.generated_ids[:-1]
        start, end = seq.prefilled, min(len(context), seq.prefilled + self.limits.prefill_chunk)
        device = state.loaded.device
        ids = torch.tensor([context[start:end]], device=device)
        mask = torch.ones((1, end), dtype=torch.long, device=device)
        positions = torch.arange(start, end, device=device).unsqueeze(0)
        try:
            logits, cache = forward(state.loaded, ids, mask, positions, self._chunked_cache)
        except Exception as exc:
            log.exception("prefill failed for %s", seq.request_id)
            seq.finish(error=ChunkError(code=m.ERROR_INTERNAL, message=f"prefill failed: {exc}"))
            self._chunked, self._chunked_cache = None, None
            return end - start
        seq.prefilled = end
        if end < len(context):
            self._chunked_cache = cache
            return end - start
        self._chunked, self._chunked_cache = None, None
        if seq.generated_ids:  # a preempted sequence resumes where it was
            state.batch.add([seq], cache, mask)
        else:
            self._first_tokens(state, [seq], logits, cache, mask)
        return end - start

    def _first_tokens(
        self, state: _ModelState, group: list[Sequence], logits: torch.Tensor, cache: DynamicCache, mask: torch.Tensor
    ) -> None:
        self._sample_and_accept(group, logits)
        keep = [i for i, seq in enumerate(group) if not seq.done]
        if keep and len(keep) < len(group):
            index = torch.tensor(keep, device=mask.device)
            cache = kvcache.from_tensors(kvcache.select_rows(kvcache.to_tensors(cache), index))
            mask = mask.index_select(0, index)
        if keep:
            state.batch.add([group[i] for i in keep], cache, mask)

    # -- decoding -----------------------------------------------------------------

    def _decode(self, state: _ModelState) -> None:
        batch = state.batch
        try:
            logits = batch.step()
        except Exception as exc:
            log.exception("decoding step failed")
            for row in batch.rows:
                row.finish(error=ChunkError(code=m.ERROR_INTERNAL, message=f"generation failed: {exc}"))
            batch.drop([])
            return
        self._sample_and_accept(batch.rows, logits)
        keep = []
        for i, row in enumerate(batch.rows):
            if not row.done:
                keep.append(i)
            elif row.seq_no and row.length >= state.prefix.min_match and row.generated_ids:
                # Its KV (prompt and answer) may start the next turn of the conversation.
                state.prefix.put(row.prompt_ids + row.generated_ids[:-1], batch.row_cache(i, row.length))
        batch.drop(keep)
        if batch.rows and len(batch) * batch.width > state.kv_budget and len(batch) > 1:
            self._preempt(state)

    def _preempt(self, state: _ModelState) -> None:
        """Move the newest row back to the front of the queue; it resumes by recomputation."""
        batch = state.batch
        victim = batch.rows[-1]
        batch.drop(list(range(len(batch) - 1)))
        victim.prefilled = 0
        self.preemptions += 1
        self._waiting.appendleft(victim)
        log.info("preempted %s (batch over its KV budget of %d)", victim.request_id, state.kv_budget)

    def _sample_and_accept(self, rows: list[Sequence], logits: torch.Tensor) -> None:
        greedy = [i for i, row in enumerate(rows) if row.greedy and not row.needs_processing]
        tokens: dict[int, int] = {}
        if greedy:
            picks = torch.argmax(logits[greedy], dim=-1).tolist()
            tokens.update(zip(greedy, picks, strict=True))
        logprobs: dict[int, TokenLogprob] = {}
        for i, row in enumerate(rows):
            sampling = row.request.sampling
            if i in tokens and not sampling.logprobs:
                continue
            try:
                processed = row.processed(logits[i])
                if i not in tokens:
                    tokens[i] = sample(processed, temperature=sampling.temperature, top_p=sampling.top_p,
                                       generator=row.generator, top_k=sampling.top_k)  # fmt: skip
                if sampling.logprobs:
                    logprobs[i] = row.logprob(processed, tokens[i])
            except Exception as exc:  # a logits processor (grammar, penalties) or sampling failed
                log.exception("sampling failed for %s", row.request_id)
                row.finish(error=ChunkError(code=m.ERROR_INTERNAL, message=f"sampling failed: {exc}"))
                tokens.pop(i, None)
        now = time.time()
        for i, row in enumerate(rows):
            if i not in tokens:
                continue
            try:
                row.accept(tokens[i], now, logprobs.get(i))
            except Exception as exc:
                log.exception("token handling failed for %s", row.request_id)
                row.finish(error=ChunkError(code=m.ERROR_INTERNAL, message=f"generation failed: {exc}"))


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


def kv_bytes_per_token(loaded: LoadedModel) -> int:
    config = loaded.model.config
    layers = int(config.num_hidden_layers)
    heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    element = torch.finfo(loaded.model.dtype).bits // 8
    return 2 * layers * heads * head_dim * element


def default_kv_budget(loaded: LoadedModel) -> int:
    """KV cells that fit in a share of the device's free memory (a quarter of RAM on a CPU)."""
    if loaded.device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(loaded.device)
        budget = int(free * 0.8)
    else:
        try:
            budget = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES") // 4
        except (ValueError, OSError):
            budget = 2 * 2**30
    return max(budget // kv_bytes_per_token(loaded), loaded.context_length)


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
    return cached  # type: ignore[no-any-return]


def memory_in_use(device: torch.device) -> int:
    """Bytes in use: allocated by torch on a GPU, the process's resident memory on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def release_memory(device: torch.device) -> int:
    """Hand freed memory back (garbage, the CUDA cache, glibc's free lists); the bytes in use afterwards."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
    return memory_in_use(device)
