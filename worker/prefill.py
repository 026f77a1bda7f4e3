"""Prefill on the engine thread: the requests admitted and waiting to start, and the prompt prefilled in chunks.

`Prefill.round` runs once per engine loop iteration, before the decoding step,
and does prefill work worth up to `max_prefill_tokens`: a group of short
waiting prompts of one model in one padded forward pass, or one
`prefill_chunk` of a long prompt, of a prompt with a prefix-cache hit, or of a
preempted sequence (`Sequence.generated_ids` set: it resumes by recomputation).
Each sequence that finishes prefill samples its first token, sent at once, and
joins its model's running `Batch`, if the model's KV budget holds it (`fits`);
otherwise it waits for rows to finish.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from cortex.protocol import ChunkError
from cortex.protocol import messages as m
from cortex.worker import kvcache
from cortex.worker.batch import Batch, forward, sample_and_accept
from cortex.worker.loader import LoadedModel
from cortex.worker.sequence import Sequence

if TYPE_CHECKING:
    from cortex.worker.engine import EngineLimits

log = logging.getLogger("cortex.worker")

HEADROOM_TOKENS = 64
"""Columns a batch is expected to grow before the next admission check."""


@dataclass
class EngineModel:
    """A model as the engine holds it: its weights, its running batch, its prefix cache, its KV budget."""

    loaded: LoadedModel
    batch: Batch
    prefix: kvcache.PrefixCache
    kv_budget: int


def fits(state: EngineModel, rows: int, width: int) -> bool:
    batch = state.batch
    total_rows = len(batch) + rows
    return not batch.rows or total_rows * (max(batch.width, width) + HEADROOM_TOKENS) <= state.kv_budget


class Prefill:
    """The sequences not yet in a batch: `waiting` (admitted, or preempted), and `chunked`, the one being prefilled
    a chunk at a time with its KV so far. Engine thread only."""

    def __init__(self, limits: EngineLimits) -> None:
        self.limits = limits
        self.waiting: deque[Sequence] = deque()
        self.chunked: Sequence | None = None
        self.chunked_cache: DynamicCache | None = None

    def busy(self) -> bool:
        return bool(self.waiting or self.chunked)

    def sequences(self) -> list[Sequence]:
        return [*self.waiting, *([self.chunked] if self.chunked is not None else [])]

    def drop_done(self) -> None:
        """Forget the sequences that have finished (cancelled, failed) before their prefill."""
        self.waiting = deque(s for s in self.waiting if not s.done)
        if self.chunked is not None and self.chunked.done:
            self.chunked, self.chunked_cache = None, None

    def clear(self) -> None:
        self.waiting.clear()
        self.chunked, self.chunked_cache = None, None

    def round(self, models: dict[str, EngineModel]) -> None:
        """Prefill work worth up to `max_prefill_tokens` before the next decoding step."""
        budget = self.limits.max_prefill_tokens
        while budget > 0 and (self.waiting or self.chunked is not None):
            spent = self._once(models)
            if not spent:
                return
            budget -= spent

    def _once(self, models: dict[str, EngineModel]) -> int:
        """One prefill action; returns the tokens it computed (0: nothing could run)."""
        if self.chunked is None and self.waiting:
            head = self.waiting[0]
            state = models[head.request.model]
            context = head.prompt_ids + head.generated_ids[:-1]
            if not fits(state, 1, len(context)):
                return 0  # wait for rows to finish
            cached, prefix_kv = state.prefix.match(context)
            # A short prefix hit is not worth giving up a grouped prefill: one
            # padded pass over many prompts beats many small passes.
            use_hit = cached >= self.limits.prefill_chunk or (cached > 0 and not self._has_group_peer(head))
            if use_hit or len(context) > self.limits.prefill_chunk or head.generated_ids:
                if not use_hit:
                    cached, prefix_kv = 0, None
                self.waiting.popleft()
                self.chunked = head
                self.chunked_cache = kvcache.from_tensors(prefix_kv) if prefix_kv is not None else None
                head.prefilled = cached
                if not head.generated_ids:
                    head.cached_tokens = cached
            else:
                return self._group(state)
        if self.chunked is not None:
            return self._chunk(models)
        return 0

    def _groupable(self, seq: Sequence, model: str) -> bool:
        return seq.request.model == model and not seq.generated_ids and len(seq.prompt_ids) <= self.limits.prefill_chunk

    def _has_group_peer(self, head: Sequence) -> bool:
        return any(self._groupable(seq, head.request.model) for seq in list(self.waiting)[1:8])

    def _group(self, state: EngineModel) -> int:
        """Prefill consecutive short fresh prompts of one model in one padded pass."""
        group: list[Sequence] = []
        width = 0
        while self.waiting:
            seq = self.waiting[0]
            n = len(seq.prompt_ids)
            new_width = max(width, n)
            if not self._groupable(seq, state.loaded.spec.id):
                break
            if group and (new_width * (len(group) + 1) > self.limits.max_prefill_tokens
                          or not fits(state, len(group) + 1, new_width)):  # fmt: skip
                break
            group.append(self.waiting.popleft())
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

    def _chunk(self, models: dict[str, EngineModel]) -> int:
        seq = self.chunked
        assert seq is not None
        state = models[seq.request.model]
        context = seq.prompt_ids + seq.generated_ids[:-1]
        start, end = seq.prefilled, min(len(context), seq.prefilled + self.limits.prefill_chunk)
        device = state.loaded.device
        ids = torch.tensor([context[start:end]], device=device)
        mask = torch.ones((1, end), dtype=torch.long, device=device)
        positions = torch.arange(start, end, device=device).unsqueeze(0)
        try:
            logits, cache = forward(state.loaded, ids, mask, positions, self.chunked_cache)
        except Exception as exc:
            log.exception("prefill failed for %s", seq.request_id)
            seq.finish(error=ChunkError(code=m.ERROR_INTERNAL, message=f"prefill failed: {exc}"))
            self.chunked, self.chunked_cache = None, None
            return end - start
        seq.prefilled = end
        if end < len(context):
            self.chunked_cache = cache
            return end - start
        self.chunked, self.chunked_cache = None, None
        if seq.generated_ids:  # a preempted sequence resumes where it was
            state.batch.add([seq], cache, mask)
        else:
            self._first_tokens(state, [seq], logits, cache, mask)
        return end - start

    def _first_tokens(
        self, state: EngineModel, group: list[Sequence], logits: torch.Tensor, cache: DynamicCache, mask: torch.Tensor
    ) -> None:
        sample_and_accept(group, logits)
        keep = [i for i, seq in enumerate(group) if not seq.done]
        if keep and len(keep) < len(group):
            index = torch.tensor(keep, device=mask.device)
            cache = kvcache.from_tensors(kvcache.select_rows(kvcache.to_tensors(cache), index))
            mask = mask.index_select(0, index)
        if keep:
            state.batch.add([group[i] for i in keep], cache, mask)
