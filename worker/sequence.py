"""One request on the engine thread: its state, and what each new token does to it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cortex.protocol import Chunk, ChunkError, GenerateRequest, TokenLogprob, TopLogprob, Usage
from cortex.protocol import messages as m
from cortex.protocol.messages import Resume
from cortex.worker.detokenize import IncrementalDetokenizer
from cortex.worker.loader import LoadedModel
from cortex.worker.output import OutputSplitter, Piece
from cortex.worker.reasoning import START, ReasoningParser
from cortex.worker.stops import StopMatcher
from cortex.worker.tool_grammar import one_call

Emit = Callable[[Chunk], None]
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]
"""(ids generated so far, next-token logits) -> logits; constrained decoding plugs in here."""


class RequestRejected(Exception):
    """A request that cannot run at all; carries the wire error code, and the field at fault if not the prompt."""

    def __init__(self, code: str, message: str, *, param: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


def error_chunk(request_id: str, code: str, message: str, *, worker_id: str, seq: int = 0, param: str = "") -> Chunk:
    return Chunk(
        request_id=request_id,
        seq=seq,
        finish_reason=m.FINISH_ERROR,
        worker_id=worker_id,
        error=ChunkError(code=code, message=message, param=param),
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
    """Processors that see every generated token (penalties, and the caller's own)."""
    output: OutputSplitter = field(default_factory=OutputSplitter)
    constraints: list[LogitsProcessor] = field(default_factory=list)
    """The grammar processors; they see only the answer's tokens, after any thinking."""
    answer_start: int = 0
    forced: list[int] = field(default_factory=list)
    """Tokens that must come next (closing the thinking when its budget is spent)."""
    close_thinking_ids: list[int] = field(default_factory=list)
    open_thinking_id: int | None = None
    reasoning_tokens: int = 0
    generated_ids: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache."""
    prefilled: int = 0
    """Prompt tokens already in this sequence's cache (prefix hit + prefill chunks)."""
    seq_no: int = 0
    unsent_ids: list[int] = field(default_factory=list)
    """Generated tokens not covered by a chunk yet (their text may be held back)."""
    unsent_logprobs: list[TokenLogprob] = field(default_factory=list)
    unsent_logprob_starts: list[int] = field(default_factory=list)
    """Where each unsent logprob's token starts in the text the stop matcher was given."""
    done: bool = False
    clamped_to: int = 0
    """The token limit, when the asked one was lowered to fit the context (told to the gateway once)."""
    admitted_at: float = field(default_factory=time.monotonic)
    """When the sequence took its place in the batch (`Usage.slot_seconds` counts from here)."""
    _replaying: bool = field(default=False, init=False, repr=False)
    """While `resume` takes the tokens an earlier attempt delivered: chunks are built, not sent."""
    _replayed_end: Chunk | None = field(default=None, init=False, repr=False)

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
        piece: Piece | None = None,
        *,
        finish: str | None = None,
        error: ChunkError | None = None,
        stop: str | None = None,
    ) -> None:
        piece = piece or Piece()
        usage = None
        if finish is not None:
            n_prompt, n_gen = len(self.prompt_ids), len(self.generated_ids)
            usage = Usage(prompt_tokens=n_prompt, completion_tokens=n_gen, total_tokens=n_prompt + n_gen,
                          cached_tokens=self.cached_tokens, reasoning_tokens=self.reasoning_tokens,
                          slot_seconds=round(time.monotonic() - self.admitted_at, 6))  # fmt: skip
        chunk = Chunk(
            request_id=self.request_id,
            seq=self.seq_no,
            text=piece.text,
            tokens=len(self.unsent_ids),
            prompt_tokens=len(self.prompt_ids) if self.seq_no == 0 else 0,
            completion_tokens=len(self.generated_ids),
            finish_reason=finish,
            usage=usage,
            worker_id=self.worker_id if self.seq_no == 0 else "",
            error=error,
            stop_sequence=stop,
            tool_calls=piece.calls,
            logprobs=self.unsent_logprobs,
            reasoning=piece.reasoning,
            max_tokens=self.clamped_to if self.seq_no == 0 else 0,
            token_ids=self.unsent_ids,
        )
        self.seq_no += 1
        self.unsent_ids = []
        self.unsent_logprobs = []
        self.unsent_logprob_starts = []
        if not self._replaying:
            self.emit(chunk)
        elif chunk.final:
            self._replayed_end = chunk

    def resume(self, resume: Resume) -> None:
        """Continue an answer another worker started: take the tokens it delivered as if generated here.

        Each token goes through `accept` as it did there (detokenizer, thinking,
        tool calls, stop strings, limits, counters) but nothing is sent: the
        client has it. Text the first worker held back (a partial stop string,
        an incomplete character or tool tag) is held back here too, and goes out
        later, as it would have. Grammar and penalty processors catch up on
        `generated_ids` at the next step; the engine recomputes the KV of prompt
        and tokens as it does for a preempted sequence. The next chunk is
        `resume.seq`: a status chunk naming this worker, so the gateway watches
        the right one while that recomputation runs.
        """
        self._replaying = True
        try:
            for token in resume.token_ids:
                if self.done:
                    break
                self.accept(token, now=0.0)  # no deadline check: the next generated token does it
        finally:
            self._replaying = False
        self.seq_no = resume.seq
        self.unsent_ids, self.unsent_logprobs, self.unsent_logprob_starts = [], [], []
        if self._replayed_end is not None:
            # The delivered tokens already end the answer (an end token, the limit): just say so.
            end = self._replayed_end
            self.emit(Chunk(request_id=self.request_id, seq=self.seq_no, completion_tokens=end.completion_tokens,
                            finish_reason=end.finish_reason, usage=end.usage, worker_id=self.worker_id,
                            stop_sequence=end.stop_sequence))  # fmt: skip
            self.seq_no += 1
            return
        if self.seq_no:
            self.emit(Chunk(request_id=self.request_id, seq=self.seq_no, completion_tokens=len(self.generated_ids),
                            worker_id=self.worker_id))  # fmt: skip
            self.seq_no += 1

    def finish(self, *, error: ChunkError | None = None) -> None:
        """End the answer abnormally (an error, a cancellation)."""
        if self.done:
            return
        self.done = True
        self.send(finish=m.FINISH_ERROR, error=error)

    def _end(self, piece: Piece, finish: str, stop: str | None = None) -> None:
        """End the answer normally, with its last piece and whatever the parsers still hold.

        After a stop string nothing more is said; otherwise what the parsers
        held goes through the stop matcher too, and may still hit a stop string.
        """
        if self.done:
            return
        if stop is None:
            more = self.output.finish(truncated=finish == m.FINISH_LENGTH)
            more.text, stop = self.stops.push(more.text)
            if stop is None:
                more.tail, stop = self.stops.push(more.tail)
                more.tail += self.stops.flush() if stop is None else ""
            else:
                more.tail = ""
            if stop is not None:
                finish = m.FINISH_STOP
            piece += more
        if stop is not None:  # the tokens of the stop string (and after it) are no part of the answer
            kept = [i for i, at in enumerate(self.unsent_logprob_starts) if at < self.stops.emitted]
            self.unsent_logprobs = [self.unsent_logprobs[i] for i in kept]
        tools = self.output.tools
        if tools is not None and tools.completed and finish == m.FINISH_STOP:
            finish, stop = m.FINISH_TOOL_CALLS, None
        self.done = True
        if piece.tail:  # text after the calls goes in a chunk of its own, in order
            tail, piece.tail = piece.tail, ""
            self.send(piece)
            piece = Piece(text=tail)
        self.send(piece, finish=finish, stop=stop)

    def logprob(self, logits: torch.Tensor, token: int) -> TokenLogprob:
        """`token`'s log probability under `logits`, with the request's number of top alternatives."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        k = self.request.sampling.top_logprobs
        values, ids = torch.topk(logprobs, k)
        # One copy to the host: the chosen value, the top values, their ids (exact in float32 below 2**24).
        row = torch.cat([logprobs[token].reshape(1), values, ids.float()]).tolist()
        pairs = zip(row[1 : k + 1], row[k + 1 :], strict=True)
        top = [TopLogprob(token=self._piece(int(i)), logprob=_finite(v)) for v, i in pairs]
        return TokenLogprob(token=self._piece(token), logprob=_finite(row[0]), top=top)

    def _piece(self, token: int) -> str:
        """A token's own text, decoded once per model."""
        texts: dict[int, str] = self.loaded.extra.setdefault("token_texts", {})
        text = texts.get(token)
        if text is None:
            text = texts[token] = str(self.loaded.tokenizer.decode([token]))
        return text

    def accept(self, token: int, now: float, logprob: TokenLogprob | None = None) -> None:
        """Take one sampled token: emit its text, or finish (end token, stop string, limit, deadline)."""
        self.generated_ids.append(token)
        self.unsent_ids.append(token)
        ended = token in self.loaded.eos_ids and not self.request.sampling.ignore_eos
        if logprob is not None and not ended:  # the end token is no part of the answer's text
            self.unsent_logprobs.append(logprob)
            self.unsent_logprob_starts.append(self.stops.taken)
        if self.forced and token == self.forced[0]:
            self.forced.pop(0)
        thinking = self.output.reasoning
        was_thinking = thinking is not None and thinking.thinking
        self.reasoning_tokens += was_thinking
        limit = len(self.generated_ids) >= self.max_new_tokens
        raw = "" if ended else self.detok.push(token)
        if ended or limit:
            raw += self.detok.flush()
        # Stop strings apply to the answer only: not to the thinking, not inside tool-call markup.
        piece = self.output.push(raw)
        piece.text, hit = self.stops.push(piece.text)
        if thinking is not None:
            self._follow_thinking(thinking, was_thinking)
        if hit is not None or ended or limit:
            self._end(piece, m.FINISH_STOP if hit is not None or ended else m.FINISH_LENGTH, stop=hit)
            return
        if self.request.deadline and now > self.request.deadline:
            self.send(piece)
            self.finish(error=ChunkError(code=m.ERROR_DEADLINE, message="deadline passed during generation"))
            return
        tools = self.output.tools
        if tools is not None and (tools.repeated or (tools.completed and one_call(self.request))):
            # One call was asked for and it is complete, or the model started over: the answer is done.
            self._end(piece, m.FINISH_STOP)
            return
        # The first token always goes out at once (time to first token); later
        # ones only when they complete some text.
        if piece or self.seq_no == 0:
            self.send(piece)

    def _follow_thinking(self, thinking: ReasoningParser, was_thinking: bool) -> None:
        """Start the constraints where the answer starts; close the thinking when its budget is spent."""
        if was_thinking and not thinking.thinking:
            self.answer_start = len(self.generated_ids)
        budget = self.request.reasoning.budget_tokens
        if thinking.thinking and budget and self.reasoning_tokens >= budget and not self.forced:
            self.forced = list(self.close_thinking_ids)

    def processed(self, logits: torch.Tensor) -> torch.Tensor:
        for processor in self.logits_processors:
            logits = processor(self.generated_ids, logits)
        if self.forced:
            only = torch.full_like(logits, float("-inf"))
            only[self.forced[0]] = logits[self.forced[0]]
            return only
        thinking = self.output.reasoning
        if self.constraints and (thinking is None or not thinking.thinking):
            unconstrained = logits
            answer = self.generated_ids[self.answer_start :]
            for constraint in self.constraints:
                logits = constraint(answer, logits)
            if thinking is not None and thinking.state == START and self.open_thinking_id is not None:
                # The model may still open its thinking before the constrained answer.
                logits[self.open_thinking_id] = unconstrained[self.open_thinking_id]
        return logits

    @property
    def needs_processing(self) -> bool:
        return bool(self.logits_processors or self.constraints or self.forced)


LOWEST_LOGPROB = -9999.0
"""Stands for minus infinity (a masked token), which JSON cannot carry; OpenAI uses the same floor."""


def _finite(value: float) -> float:
    return max(value, LOWEST_LOGPROB)
