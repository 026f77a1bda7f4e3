"""A scripted engine that emits tokens at a fixed rate: for measuring the broker hop alone.

Never the default: ``cortex-worker --synthetic-engine SECONDS`` selects it, and
only the benchmarks and relay tests do. It speaks the same interface as
`cortex.worker.engine.Engine`, so the worker service, NATS and the gateway run
exactly as in production while no model runs.

Each request gets a token every `interval` seconds, the first as soon as it
is admitted (after `prefill`), on its own clock. With ``steps`` (or
``CORTEX_SYNTHETIC_STEPS=1`` in the worker's environment: the gateway-at-scale
benchmark sets it) it emits as a batching engine does instead: every token
after the first on the next tick of one clock for all its requests, so the
tokens of all running streams leave together, as one decoding step's do, and
hundreds of streams cost one wake-up per step, not one per token. Each engine's
clock has its own phase, as two GPUs' steps are not in time with each other.
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from cortex.protocol import Chunk, GenerateRequest, Usage
from cortex.protocol import messages as m
from cortex.worker.catalogue import ModelSpec

T = TypeVar("T")
Emit = Callable[[Chunk], None]
TOKEN = "tok "
STEPS_ENV = "CORTEX_SYNTHETIC_STEPS"


@dataclass(frozen=True)
class SyntheticModel:
    spec: ModelSpec
    context_length: int = 1 << 20


def load_synthetic(spec: ModelSpec) -> SyntheticModel:
    return SyntheticModel(spec=spec)


@dataclass
class _Job:
    request: GenerateRequest
    emit: Emit
    prompt_tokens: int
    total: int
    sent: int = 0


class SyntheticEngine:
    """Emits ``max_tokens`` (default 16) one-token chunks every `interval` seconds, the first after `prefill`."""

    def __init__(self, *, worker_id: str, interval: float, prefill: float = 0.0, steps: bool | None = None) -> None:
        self.worker_id = worker_id
        self.interval = interval
        self.prefill = prefill
        """Seconds before the first token, standing in for a prompt's prefill."""
        self.steps = os.environ.get(STEPS_ENV, "") == "1" if steps is None else steps
        """Tokens after the first on one step clock for all requests (else each request's own)."""
        self._phase = random.random() * interval
        """Where this engine's step clock ticks within each interval."""
        self._lock = threading.Condition()
        self._heap: list[tuple[float, int, str]] = []
        self._jobs: dict[str, _Job] = {}
        self._order = itertools.count()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="cortex-synthetic-engine", daemon=True)
        self._calls = ThreadPoolExecutor(1, thread_name_prefix="cortex-synthetic-calls")
        """Loads and unloads run off the event loop, one at a time, as the real engine's thread runs them."""

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join(timeout)
        self._calls.shutdown(wait=False, cancel_futures=True)

    def call(self, fn: Callable[[], T]) -> Future[T]:
        return self._calls.submit(fn)

    def add_model(self, loaded: Any) -> None:
        """Nothing to do: every request is answered the same way."""

    def remove_model(self, model_id: str) -> Future[int]:
        return self.call(lambda: 0)

    def submit(self, request: GenerateRequest, emit: Emit) -> None:
        prompt = sum(len(msg.content) for msg in request.messages) // 4 + 1
        job = _Job(request=request, emit=emit, prompt_tokens=prompt, total=request.sampling.max_tokens or 16)
        with self._lock:
            self._jobs[request.request_id] = job
            heapq.heappush(self._heap, (time.monotonic() + self.prefill, next(self._order), request.request_id))
            self._lock.notify()

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._jobs.pop(request_id, None)

    def _next_tick(self, now: float) -> float:
        """When a request that had a token at `now` has its next: `interval` later, or with ``steps`` the first tick
        of the step clock after `now` (`now` itself when the engine goes as fast as it can)."""
        if self.interval <= 0 or not self.steps:
            return now + self.interval
        return (math.floor((now - self._phase) / self.interval) + 1) * self.interval + self._phase

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._lock.wait(None if not self._heap else max(0.0, self._heap[0][0] - time.monotonic()))
                if self._stopping:
                    return
                step = self._step(time.monotonic())
            for job, sent, final in step:  # outside the lock: submit and cancel never wait for the emits
                job.emit(self._chunk(job, sent, final))

    def _step(self, now: float) -> list[tuple[_Job, int, bool]]:
        """Which requests are due by `now` (with the lock held), with their token's number and whether it is the
        last; each goes again at the next tick."""
        out: list[tuple[_Job, int, bool]] = []
        later: list[tuple[float, int, str]] = []
        tick = self._next_tick(now)
        while self._heap and self._heap[0][0] <= now:
            _, _, request_id = heapq.heappop(self._heap)
            job = self._jobs.get(request_id)
            if job is None:
                continue  # cancelled
            job.sent += 1
            final = job.sent >= job.total
            if final:
                del self._jobs[request_id]
            else:
                later.append((tick, next(self._order), request_id))
            out.append((job, job.sent, final))
        for entry in later:  # pushed after the loop: with no interval, the next tick is `now`, due again at once
            heapq.heappush(self._heap, entry)
        return out

    def _chunk(self, job: _Job, sent: int, final: bool) -> Chunk:
        first = sent == 1
        return Chunk(
            request_id=job.request.request_id,
            seq=sent - 1,
            text=TOKEN,
            tokens=1,
            prompt_tokens=job.prompt_tokens if first else 0,
            completion_tokens=sent,
            finish_reason=m.FINISH_LENGTH if final else None,
            usage=Usage(prompt_tokens=job.prompt_tokens, completion_tokens=sent, total_tokens=job.prompt_tokens + sent)
            if final
            else None,
            worker_id=self.worker_id if first else "",
        )
