"""The running batch of one model: left-padded rows that all advance one token per step.

`sample_and_accept` gives rows their next tokens, after a decoding step and
after a prefill alike.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from transformers import DynamicCache

from cortex.protocol import ChunkError, TokenLogprob
from cortex.protocol import messages as m
from cortex.worker import kvcache
from cortex.worker.loader import LoadedModel
from cortex.worker.sampling import sample
from cortex.worker.sequence import Sequence

log = logging.getLogger("cortex.worker")


def forward(loaded: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
            cache: DynamicCache | None) -> tuple[torch.Tensor, DynamicCache]:  # fmt: skip
    """One model call: logits of each row's last position, and the (grown) cache."""
    extra: dict[str, Any] = {} if cache is None else {loaded.cache_arg: cache}
    out = loaded.model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **extra
    )
    return out.logits[:, -1], getattr(out, loaded.cache_arg)


class Batch:
    """Rows share one cache whose columns are aligned at the right: a step appends one column to all."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.rows: list[Sequence] = []
        self.cache: DynamicCache | None = None
        """Kept between steps; rebuilt only when rows join or leave (rebuilding copies it)."""
        self.mask: torch.Tensor | None = None  # [rows, columns]; 1 = real token, 0 = padding

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    @property
    def kv(self) -> kvcache.KV:
        assert self.cache is not None
        return kvcache.to_tensors(self.cache)

    def add(self, rows: list[Sequence], cache: DynamicCache, mask: torch.Tensor) -> None:
        """Join rows whose (right-aligned) cache and mask were built by a prefill."""
        if self.cache is None or self.mask is None:
            self.rows, self.cache, self.mask = list(rows), cache, mask
            return
        kv = kvcache.to_tensors(cache)
        own = self.kv
        width, new_width = self.width, int(mask.shape[1])
        if new_width < width:
            kv = kvcache.left_pad(kv, width - new_width)
            mask = torch.cat([mask.new_zeros(mask.shape[0], width - new_width), mask], dim=1)
        elif new_width > width:
            own = kvcache.left_pad(own, new_width - width)
            self.mask = torch.cat([self.mask.new_zeros(self.mask.shape[0], new_width - width), self.mask], dim=1)
        self.cache = kvcache.from_tensors(kvcache.concat_rows(own, kv))
        self.mask = torch.cat([self.mask, mask])
        self.rows.extend(rows)

    def step(self) -> torch.Tensor:
        """Feed every row its last sampled token; returns next-token logits [rows, vocab]."""
        assert self.mask is not None
        device = self.loaded.device
        ids = torch.tensor([[row.last_token] for row in self.rows], device=device)
        positions = torch.tensor([[row.length] for row in self.rows], device=device)
        mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        logits, self.cache = forward(self.loaded, ids, mask, positions, self.cache)
        self.mask = mask
        return logits

    def row_cache(self, index: int, tokens: int) -> kvcache.KV:
        return kvcache.row_tail(self.kv, index, tokens)

    def drop(self, keep: list[int]) -> None:
        """Keep only the rows at `keep`, then crop padding columns no row needs."""
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        assert self.mask is not None
        index = torch.tensor(keep, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        kv = kvcache.select_rows(self.kv, index)
        self.mask = self.mask.index_select(0, index)
        used = torch.nonzero(self.mask.sum(dim=0))
        first = int(used[0]) if len(used) else 0
        if first:
            kv = kvcache.crop_left(kv, first)
            self.mask = self.mask[:, first:]
        self.cache = kvcache.from_tensors(kv)


def sample_and_accept(rows: list[Sequence], logits: torch.Tensor) -> None:
    """Pick each row's next token from its row of `logits` and hand it to the row (which may finish).

    A failure (a grammar, a penalty, the sampler) finishes only its own row, with an error.
    """
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
