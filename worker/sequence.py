"""One request on the engine thread: its state, and what each new token does to it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cortex.protocol import Chunk, ChunkError, GenerateRequest, TokenLogprob, ToolCallDelta, TopLogprob, Usage
from cortex.protocol import messages as m
from cortex.worker.detokenize import IncrementalDetokenizer
from cortex.worker.loader import LoadedModel
from cortex.worker.stops import StopMatcher
from cortex.worker.tools import ToolCallParser

Emit = Callable[[Chunk], None]
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]
"""(ids generated so far, next-token logits) -> logits; constrained decoding plugs in here."""


class RequestRejected(Exception):
    """A request that cannot run at all; carries the wire error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def error_chunk(request_id: str, code: str, message: str, *, worker_id: str, seq: int = 0) -> Chunk:
    return Chunk(
        request_id=request_id,
        seq=seq,
        finish_reason=m.FINISH_ERROR,
        worker_id=worker_id,
        error=ChunkError(code=code, message=message),
    )


@dataclass
class Sequence:
    request: GenerateRequest
    emit: Emit
    loaded: LoadedModel
    prompt_ids: list[int]
    max_new_tokens: int
    detok: IncrementalDetokenizer
    stops: StopMatcher
    generator: torch.Generator | None
    worker_id: str
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    tool_parser: ToolCallParser | None = None
    """Set when tools are offered: takes tool calls out of the text."""
    generated_ids: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache."""
    prefilled: int = 0
    """Prompt tokens already in this sequence's cache (prefix hit + prefill chunks)."""
    seq_no: int = 0
    unsent_tokens: int = 0
    unsent_logprobs: list[TokenLogprob] = field(default_factory=list)
    done: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def greedy(self) -> bool:
        return self.generator is None

    @property
    def length(self) -> int:
        """Tokens in this sequence's KV cache once running: the prompt and all but the last generated token."""
        return len(self.prompt_ids) + max(0, len(self.generated_ids) - 1)

    @property
    def last_token(self) -> int:
        return self.generated_ids[-1]

    def send(
        self,
        text: str = "",
        *,
        finish: str | None = None,
        error: ChunkError | None = None,
        stop: str | None = None,
        calls: list[ToolCallDelta] | None = None,
    ) -> None:
        usage = None
        if finish is not None:
            n_prompt, n_gen = len(self.prompt_ids), len(self.generated_ids)
            usage = Usage(prompt_tokens=n_prompt, completion_tokens=n_gen, total_tokens=n_prompt + n_gen,
                          cached_tokens=self.cached_tokens)  # fmt: skip
        chunk = Chunk(
            request_id=self.request_id,
            seq=self.seq_no,
            text=text,
            tokens=self.unsent_tokens,
            prompt_tokens=len(self.prompt_ids) if self.seq_no == 0 else 0,
            completion_tokens=len(self.generated_ids),
            finish_reason=finish,
            usage=usage,
            worker_id=self.worker_id if self.seq_no == 0 else "",
            error=error,
            stop_sequence=stop,
            tool_calls=calls or [],
            logprobs=self.unsent_logprobs,
        )
        self.seq_no += 1
        self.unsent_tokens = 0
        self.unsent_logprobs = []
        self.emit(chunk)

    def finish(
        self, *, text: str = "", finish: str | None = None, error: ChunkError | None = None, stop: str | None = None
    ) -> None:
        if self.done:
            return
        self.done = True
        self.send(text, finish=finish or m.FINISH_ERROR, error=error, stop=stop)

    def _end(self, text: str, finish: str, stop: str | None = None, calls: list[ToolCallDelta] | None = None) -> None:
        """Finish normally, with the last text (raw, or already split into `calls`) and what the parser holds."""
        if self.done:
            return
        if calls is None:
            text, calls = self._split(text)
        if self.tool_parser is not None:
            tail, more = self.tool_parser.finish(truncated=finish == m.FINISH_LENGTH)
            text, calls = text + tail, calls + more
        parser = self.tool_parser
        if parser is not None and parser.calls and finish == m.FINISH_STOP:
            finish, stop = m.FINISH_TOOL_CALLS, None
        self.done = True
        self.send(text, finish=finish, stop=stop, calls=calls)

    def _split(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """Text and tool-call pieces; the text is unchanged when no tools are offered."""
        if self.tool_parser is None:
            return text, []
        return self.tool_parser.push(text)

    def logprob(self, logits: torch.Tensor, token: int) -> TokenLogprob:
        """`token`'s log probability under `logits`, with the request's number of top alternatives."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top = []
        if self.request.sampling.top_logprobs:
            values, ids = torch.topk(logprobs, self.request.sampling.top_logprobs)
            top = [
                TopLogprob(token=self._piece(i), logprob=_finite(v))
                for v, i in zip(values.tolist(), ids.tolist(), strict=True)
            ]
        return TokenLogprob(token=self._piece(token), logprob=_finite(float(logprobs[token])), top=top)

    def _piece(self, token: int) -> str:
        return str(self.loaded.tokenizer.decode([token]))

    def accept(self, token: int, now: float, logprob: TokenLogprob | None = None) -> None:
        """Take one sampled token: emit its text, or finish (end token, stop string, limit, deadline)."""
        self.generated_ids.append(token)
        self.unsent_tokens += 1
        if logprob is not None:
            self.unsent_logprobs.append(logprob)
        if token in self.loaded.eos_ids and not self.request.sampling.ignore_eos:
            text, _ = self.stops.push(self.detok.flush())
            self._end(text + self.stops.flush(), m.FINISH_STOP)
            return
        text, hit = self.stops.push(self.detok.push(token))
        if hit is not None:
            self._end(text, m.FINISH_STOP, stop=hit)
            return
        if len(self.generated_ids) >= self.max_new_tokens:
            tail, hit = self.stops.push(self.detok.flush())
            text += tail if hit is not None else tail + self.stops.flush()
            self._end(text, m.FINISH_STOP if hit else m.FINISH_LENGTH, stop=hit)
            return
        if self.request.deadline and now > self.request.deadline:
            text, calls = self._split(text)
            self.send(text, calls=calls)
            self.finish(error=ChunkError(code=m.ERROR_DEADLINE, message="deadline passed during generation"))
            return
        text, calls = self._split(text)
        parser = self.tool_parser
        if parser is not None and (parser.repeated or (parser.completed and not self.request.parallel_tool_calls)):
            # One call was asked for and it is complete, or the model started over: the answer is done.
            self._end(text, m.FINISH_STOP, calls=calls)
            return
        # The first token always goes out at once (time to first token); later
        # ones only when they complete some text.
        if text or calls or self.seq_no == 0:
            self.send(text, calls=calls)

    def processed(self, logits: torch.Tensor) -> torch.Tensor:
        for processor in self.logits_processors:
            logits = processor(self.generated_ids, logits)
        return logits


LOWEST_LOGPROB = -9999.0
"""Stands for minus infinity (a masked token), which JSON cannot carry; OpenAI uses the same floor."""


def _finite(value: float) -> float:
    return max(value, LOWEST_LOGPROB)
