"""The engine thread: the only code that touches the device.

Requests arrive through `Engine.submit` from the asyncio side and leave as
`Chunk`s through the `emit` callback each request was submitted with (the
callback must be thread-safe and must not block). The thread interleaves every
active sequence one decoding step at a time, so a new request starts at the next
step instead of waiting for the others to finish.

Each request is driven by a `Sequence`: prefill, then one token per step, with
its own sampling parameters, stop strings, token limit and deadline. The batched
decoding step of the speed work replaces `_advance` without changing this API.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from cortex.protocol import Chunk, ChunkError, GenerateRequest, Usage
from cortex.protocol import messages as m
from cortex.worker.detokenize import IncrementalDetokenizer
from cortex.worker.loader import LoadedModel, PromptError
from cortex.worker.sampling import is_greedy, make_generator, sample
from cortex.worker.stops import StopMatcher

log = logging.getLogger("cortex.worker")

Emit = Callable[[Chunk], None]
T = TypeVar("T")


class RequestRejected(Exception):
    """A request that cannot run at all; carries the wire error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Sequence:
    """One request in flight on the engine thread."""

    request: GenerateRequest
    emit: Emit
    loaded: LoadedModel
    prompt_ids: list[int]
    max_new_tokens: int
    detok: IncrementalDetokenizer
    stops: StopMatcher
    generator: torch.Generator | None
    worker_id: str
    cache: Any = None
    last_token: int | None = None
    generated: int = 0
    seq_no: int = 0
    unsent_tokens: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    def send(self, text: str = "", *, finish: str | None = None, error: ChunkError | None = None) -> None:
        usage = None
        if finish is not None:
            n_prompt = len(self.prompt_ids)
            usage = Usage(
                prompt_tokens=n_prompt, completion_tokens=self.generated, total_tokens=n_prompt + self.generated
            )
        chunk = Chunk(
            request_id=self.request_id,
            seq=self.seq_no,
            text=text,
            tokens=self.unsent_tokens,
            prompt_tokens=len(self.prompt_ids) if self.seq_no == 0 else 0,
            completion_tokens=self.generated,
            finish_reason=finish,
            usage=usage,
            worker_id=self.worker_id if self.seq_no == 0 else "",
            error=error,
        )
        self.seq_no += 1
        self.unsent_tokens = 0
        self.emit(chunk)


def error_chunk(request_id: str, code: str, message: str, *, worker_id: str, seq: int = 0) -> Chunk:
    return Chunk(
        request_id=request_id,
        seq=seq,
        finish_reason=m.FINISH_ERROR,
        worker_id=worker_id,
        error=ChunkError(code=code, message=message),
    )


class Engine:
    """Owns the device thread; thread-safe `submit`, `cancel` and `call`."""

    def __init__(self, *, worker_id: str) -> None:
        self.worker_id = worker_id
        self._models: dict[str, LoadedModel] = {}
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._active: dict[str, Sequence] = {}
        self._thread = threading.Thread(target=self._run, name="cortex-engine", daemon=True)
        self._stopping = False

    # -- called from any thread ---------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._inbox.put(("stop", None))
        if self._thread.is_alive():
            self._thread.join(timeout)

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` on the engine thread (model loading); its result arrives as a Future."""
        future: Future[T] = Future()
        self._inbox.put(("call", (fn, future)))
        return future

    def add_model(self, loaded: LoadedModel) -> None:
        self._inbox.put(("add", loaded))

    def submit(self, request: GenerateRequest, emit: Emit) -> None:
        self._inbox.put(("submit", (request, emit)))

    def cancel(self, request_id: str) -> None:
        self._inbox.put(("cancel", request_id))

    # -- the engine thread ----------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while not self._stopping:
                self._drain_inbox(block=not self._active)
                for seq in list(self._active.values()):
                    if self._stopping:
                        break
                    self._advance(seq)

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
        if kind == "submit":
            self._start(*payload)
        elif kind == "cancel":
            seq = self._active.pop(payload, None)
            if seq is not None:
                log.info("cancelled %s after %d tokens", payload, seq.generated)
        elif kind == "add":
            self._models[payload.spec.id] = payload
        elif kind == "call":
            fn, future = payload
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:
                    future.set_exception(exc)
        elif kind == "stop":
            self._stopping = True

    def _start(self, request: GenerateRequest, emit: Emit) -> None:
        try:
            seq = self._prepare(request, emit)
        except RequestRejected as exc:
            emit(error_chunk(request.request_id, exc.code, exc.message, worker_id=self.worker_id))
            return
        except Exception as exc:
            # Whatever goes wrong with one request must not take the engine thread down.
            log.exception("could not start %s", request.request_id)
            emit(error_chunk(request.request_id, m.ERROR_INTERNAL, f"could not start: {exc}", worker_id=self.worker_id))
            return
        self._active[request.request_id] = seq

    def _prepare(self, request: GenerateRequest, emit: Emit) -> Sequence:
        loaded = self._models.get(request.model)
        if loaded is None:
            raise RequestRejected(m.ERROR_MODEL_NOT_LOADED, f"model {request.model!r} is not loaded on this worker")
        if request.deadline and time.time() > request.deadline:
            raise RequestRejected(m.ERROR_DEADLINE, "the request's deadline passed before it was started")
        try:
            prompt_ids = loaded.render_prompt(request.messages)
        except PromptError as exc:
            raise RequestRejected(m.ERROR_INVALID_REQUEST, str(exc)) from exc
        limit = loaded.context_length
        room = limit - len(prompt_ids)
        wanted = request.sampling.max_tokens
        if room <= 0 or (wanted is not None and wanted > room):
            asked = f", {wanted} in the completion" if wanted is not None else ""
            raise RequestRejected(
                m.ERROR_CONTEXT_LENGTH,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(prompt_ids) + (wanted or 0)} tokens ({len(prompt_ids)} in the messages{asked}). "
                "Please reduce the length of the messages or completion.",
            )
        sampling = request.sampling
        generator = None if is_greedy(sampling.temperature) else make_generator(loaded.device, sampling.seed)
        return Sequence(
            request=request,
            emit=emit,
            loaded=loaded,
            prompt_ids=prompt_ids,
            max_new_tokens=wanted if wanted is not None else room,
            detok=IncrementalDetokenizer(loaded.tokenizer, prompt_ids),
            stops=StopMatcher(list(sampling.stop)),
            generator=generator,
            worker_id=self.worker_id,
        )

    def _advance(self, seq: Sequence) -> None:
        """One step of one sequence: forward, sample, emit."""
        try:
            logits = self._forward(seq)
            token = sample(
                logits, temperature=seq.request.sampling.temperature, top_p=seq.request.sampling.top_p,
                generator=seq.generator,
            )  # fmt: skip
            self._accept(seq, token)
        except Exception as exc:
            log.exception("generation failed for %s", seq.request_id)
            self._finish(seq, error=ChunkError(code=m.ERROR_INTERNAL, message=f"generation failed: {exc}"))

    def _forward(self, seq: Sequence) -> torch.Tensor:
        model = seq.loaded.model
        if seq.cache is None:
            ids = torch.tensor([seq.prompt_ids], device=seq.loaded.device)
        else:
            ids = torch.tensor([[seq.last_token]], device=seq.loaded.device)
        out = model(input_ids=ids, use_cache=True, **{seq.loaded.cache_arg: seq.cache})
        seq.cache = getattr(out, seq.loaded.cache_arg)
        return out.logits[0, -1]

    def _accept(self, seq: Sequence, token: int) -> None:
        seq.last_token = token
        seq.generated += 1
        seq.unsent_tokens += 1
        if token in seq.loaded.eos_ids:
            self._finish(seq, text=seq.stops.push(seq.detok.flush())[0] + seq.stops.flush(), finish=m.FINISH_STOP)
            return
        text, hit = seq.stops.push(seq.detok.push(token))
        if hit is not None:
            self._finish(seq, text=text, finish=m.FINISH_STOP)
            return
        if seq.generated >= seq.max_new_tokens:
            tail, hit = seq.stops.push(seq.detok.flush())
            text += tail
            if hit is None:
                text += seq.stops.flush()
            self._finish(seq, text=text, finish=m.FINISH_STOP if hit else m.FINISH_LENGTH)
            return
        if seq.request.deadline and time.time() > seq.request.deadline:
            seq.send(text)
            self._finish(seq, error=ChunkError(code=m.ERROR_DEADLINE, message="deadline passed during generation"))
            return
        # The first token always goes out at once (time to first token); later
        # ones only when they complete some text.
        if text or seq.seq_no == 0:
            seq.send(text)

    def _finish(
        self, seq: Sequence, *, text: str = "", finish: str | None = None, error: ChunkError | None = None
    ) -> None:
        self._active.pop(seq.request_id, None)
        seq.cache = None
        seq.send(text, finish=finish or m.FINISH_ERROR, error=error)
