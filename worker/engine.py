"""The engine thread: continuous batching, and the only code that runs the model.

Requests arrive through `Engine.submit` from the asyncio side and leave as
`Chunk`s through the `emit` callback each was submitted with (thread-safe,
non-blocking). An admission thread (`cortex.worker.admission`) first renders
each prompt through the chat template, tokenizes it and compiles its grammar,
so a long prompt never holds up the decoding of others (the tokenizer releases
the GIL). Each loop iteration of the engine thread does:

1. take admitted requests, cancellations and calls from the inbox;
2. one prefill round (`cortex.worker.prefill`): a group of short waiting prompts in one padded
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
recomputation (the client sees nothing but a pause). A request resumed from
another worker (a failover: `Sequence.resume`) enters the same way, its tokens
already generated, its KV recomputed from prompt and tokens.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from cortex.protocol import ChunkError, GenerateRequest
from cortex.protocol import messages as m
from cortex.worker import kvcache
from cortex.worker.admission import Admission, Cancellations
from cortex.worker.batch import Batch, sample_and_accept
from cortex.worker.device import memory_in_use, release_memory
from cortex.worker.loader import LoadedModel
from cortex.worker.prefill import EngineModel, Prefill
from cortex.worker.sequence import Emit, LogitsProcessor, Sequence

log = logging.getLogger("cortex.worker")
T = TypeVar("T")


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


class Engine:
    """Owns the device thread; `submit`, `cancel`, `call`, `add_model`, `remove_model` and `take_model` are
    thread-safe."""

    def __init__(self, *, worker_id: str, limits: EngineLimits | None = None) -> None:
        self.worker_id = worker_id
        self.limits = limits or EngineLimits()
        self._models: dict[str, EngineModel] = {}
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._cancelled = Cancellations()
        self._admission = Admission(worker_id=worker_id, cancelled=self._cancelled, handoff=self._inbox.put)
        self._prefill = Prefill(self.limits)
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
        self._admission.stop()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self._admission.join(timeout)

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` on the engine thread (model loading); its result arrives as a Future."""
        future: Future[T] = Future()
        self._inbox.put(("call", (fn, future)))
        return future

    def add_model(self, loaded: LoadedModel) -> None:
        self._admission.add_model(loaded)

    def remove_model(self, model_id: str) -> Future[int]:
        """Drop a model (its requests must have finished); the Future gives the bytes this freed, measured.

        Through admission, like requests and additions: everything asked for before is
        admitted first, and nothing there still holds the model when it is freed.
        """
        future: Future[int] = Future()
        self._admission.remove_model(model_id, future)
        return future

    def take_model(self, model_id: str) -> Future[LoadedModel | None]:
        """Drop a model's engine state (its batch, its prefix cache) but hand back its `LoadedModel`, weights
        untouched, to park in the host tier; None if it was not here. Ordered as `remove_model` is."""
        future: Future[LoadedModel | None] = Future()
        self._admission.remove_model(model_id, future, keep=True)
        return future

    def _detach(self, model_id: str) -> EngineModel | None:
        if model_id not in self._models:
            return None
        for seq in self._all_sequences():  # none, normally: the worker waits for them first
            if seq.request.model == model_id:
                seq.finish(error=ChunkError(code=m.ERROR_MODEL_NOT_LOADED, message=f"{model_id} was unloaded"))
        self._drop_done()
        return self._models.pop(model_id)

    def _remove(self, model_id: str) -> int:
        state = self._detach(model_id)
        if state is None:
            return 0
        device = state.loaded.device
        before = memory_in_use(device)
        del state
        return max(0, before - release_memory(device))

    def _take(self, model_id: str) -> LoadedModel | None:
        state = self._detach(model_id)
        return state.loaded if state is not None else None

    def submit(
        self, request: GenerateRequest, emit: Emit, logits_processors: list[LogitsProcessor] | None = None
    ) -> None:
        """Queue a request; `logits_processors` (constrained decoding) run on its logits before each pick."""
        self._admission.submit(request, emit, list(logits_processors or []))

    def cancel(self, request_id: str) -> None:
        # Remembered for admission too: the request may not have reached the engine thread yet.
        self._cancelled.add(request_id)
        self._inbox.put(("cancel", request_id))

    def running(self) -> int:
        """Sequences waiting, prefilling or decoding. Engine thread only: use ``call(engine.running)``."""
        return len([s for s in self._all_sequences() if not s.done])

    # -- the engine thread ----------------------------------------------------

    def _busy(self) -> bool:
        return self._prefill.busy() or any(s.batch.rows for s in self._models.values())

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stopping:
                try:
                    self._drain_inbox(block=not self._busy())
                    if self._stopping:
                        break
                    self._prefill.round(self._models)
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
        self._prefill.clear()
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
            self._models[payload.spec.id] = EngineModel(
                loaded=payload,
                batch=Batch(payload),
                prefix=kvcache.PrefixCache(self.limits.prefix_cache_tokens),
                kv_budget=self.limits.kv_budget_tokens or kvcache.default_kv_budget(payload),
            )
        elif kind == "call":
            _resolve(*payload)
        elif kind == "remove":
            model_id, future, keep = payload
            _resolve(lambda: self._take(model_id) if keep else self._remove(model_id), future)
        elif kind == "stop":
            self._stopping = True

    def _cancel(self, request_id: str) -> None:
        for seq in self._all_sequences():
            if seq.request_id == request_id and not seq.done:
                seq.done = True  # silently: nobody listens any more
                self._cancelled.take(request_id)
                log.info("cancelled %s after %d tokens", request_id, len(seq.generated_ids))
        self._drop_done()

    def _drop_done(self) -> None:
        """Forget the sequences that have finished, wherever they wait or run."""
        self._prefill.drop_done()
        for state in self._models.values():
            state.batch.drop([i for i, row in enumerate(state.batch.rows) if not row.done])

    def _all_sequences(self) -> list[Sequence]:
        seqs = self._prefill.sequences()
        for state in self._models.values():
            seqs.extend(state.batch.rows)
        return seqs

    def _join(self, seq: Sequence) -> None:
        """Engine thread: an admitted request waits for prefill, unless it was cancelled or its model left."""
        if self._cancelled.take(seq.request_id):
            return
        state = self._models.get(seq.request.model)
        if state is None or state.loaded is not seq.loaded:
            seq.finish(error=ChunkError(code=m.ERROR_MODEL_NOT_LOADED, message=f"{seq.request.model} was unloaded"))
            return
        self._prefill.waiting.append(seq)

    # -- decoding -----------------------------------------------------------------

    def _decode(self, state: EngineModel) -> None:
        batch = state.batch
        try:
            logits = batch.step()
        except Exception as exc:
            log.exception("decoding step failed")
            for row in batch.rows:
                row.finish(error=ChunkError(code=m.ERROR_INTERNAL, message=f"generation failed: {exc}"))
            batch.drop([])
            return
        sample_and_accept(batch.rows, logits)
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

    def _preempt(self, state: EngineModel) -> None:
        """Move the newest row back to the front of the queue; it resumes by recomputation."""
        batch = state.batch
        victim = batch.rows[-1]
        batch.drop(list(range(len(batch) - 1)))
        victim.prefilled = 0
        self.preemptions += 1
        self._prefill.waiting.appendleft(victim)
        log.info("preempted %s (batch over its KV budget of %d)", victim.request_id, state.kv_budget)


def _resolve(fn: Callable[[], T], future: Future[T]) -> None:
    """Run `fn` into `future`, unless the caller cancelled it first."""
    if future.set_running_or_notify_cancel():
        try:
            future.set_result(fn())
        except BaseException as exc:
            future.set_exception(exc)
