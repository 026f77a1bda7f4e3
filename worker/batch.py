"""The running batch of one model: left-padded rows that all advance one token per step."""

from __future__ import annotations

from typing import Any

import torch

from cortex.worker import kvcache
from cortex.worker.loader import LoadedModel
from cortex.worker.sequence import Sequence


def forward(loaded: LoadedModel, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
            kv: kvcache.KV | None) -> tuple[torch.Tensor, kvcache.KV]:  # fmt: skip
    """One model call: logits of each row's last position, and the grown cache."""
    extra: dict[str, Any] = {} if kv is None else {loaded.cache_arg: kvcache.from_tensors(kv)}
    out = loaded.model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1, **extra
    )
    return out.logits[:, -1], kvcache.to_tensors(getattr(out, loaded.cache_arg))


class Batch:
    """Rows share one cache whose columns are aligned at the right: a step appends one column to all."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.rows: list[Sequence] = []
        self.kv: kvcache.KV | None = None
        self.mask: torch.Tensor | None = None  # [rows, columns]; 1 = real token, 0 = padding

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def width(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    def add(self, rows: list[Sequence], kv: kvcache.KV, mask: torch.Tensor) -> None:
        """Join rows whose (right-aligned) cache and mask were built by a prefill."""
        if self.kv is None or self.mask is None:
            self.rows, self.kv, self.mask = list(rows), kv, mask
            return
        width, new_width = self.width, int(mask.shape[1])
        if new_width < width:
            kv = kvcache.left_pad(kv, width - new_width)
            mask = torch.cat([mask.new_zeros(mask.shape[0], width - new_width), mask], dim=1)
        elif new_width > width:
            self.kv = kvcache.left_pad(self.kv, new_width - width)
            self.mask = torch.cat([self.mask.new_zeros(self.mask.shape[0], new_width - width), self.mask], dim=1)
        self.kv = kvcache.concat_rows(self.kv, kv)
        self.mask = torch.cat([self.mask, mask])
        self.rows.extend(rows)

    def step(self) -> torch.Tensor:
        """Feed every row its last sampled token; returns next-token logits [rows, vocab]."""
        assert self.mask is not None
        device = self.loaded.device
        ids = torch.tensor([[row.last_token] for row in self.rows], device=device)
        positions = torch.tensor([[row.length] for row in self.rows], device=device)
        mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        logits, self.kv = forward(self.loaded, ids, mask, positions, self.kv)
        self.mask = mask
        return logits

    def row_cache(self, index: int, tokens: int) -> kvcache.KV:
        assert self.kv is not None
        return kvcache.row_tail(self.kv, index, tokens)

    def drop(self, keep: list[int]) -> None:
        """Keep only the rows at `keep`, then crop padding columns no row needs."""
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.kv, self.mask = [], None, None
            return
        assert self.kv is not None and self.mask is not None
        index = torch.tensor(keep, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.kv = kvcache.select_rows(self.kv, index)
        self.mask = self.mask.index_select(0, index)
        used = torch.nonzero(self.mask.sum(dim=0))
        first = int(used[0]) if len(used) else 0
        if first:
            self.kv = kvcache.crop_left(self.kv, first)
            self.mask = self.mask[:, first:]
