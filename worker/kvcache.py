"""KV-cache surgery for the batching engine, the prefix cache, and how much KV a model's batch may hold.

The engine keeps one left-padded cache per running batch: every row's real
tokens end at the last column, so a decode step appends one column to all rows.
These helpers pad, join, select and crop such caches as plain per-layer
(keys, values) tensors of shape [batch, kv_heads, length, head_dim], and build
the transformers `DynamicCache` the model consumes. Only this module knows how
transformers stores a cache.

A batch's KV budget is counted in cells (rows x padded columns); by default it
is what a share of the device's free memory holds at the model's bytes per token.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from cortex.worker.loader import LoadedModel

KV = list[tuple[torch.Tensor, torch.Tensor]]


def to_tensors(cache: DynamicCache) -> KV:
    # Every layer of the models served holds full-attention keys and values (no linear-attention layers).
    return [(layer.keys, layer.values) for layer in cache.layers]  # type: ignore[union-attr,misc]


def from_tensors(kv: KV) -> DynamicCache:
    return DynamicCache(ddp_cache_data=kv)


def left_pad(kv: KV, n: int) -> KV:
    if n <= 0:
        return kv
    out: KV = []
    for keys, values in kv:
        pad_shape = (keys.shape[0], keys.shape[1], n, keys.shape[3])
        out.append((torch.cat([keys.new_zeros(pad_shape), keys], dim=2),
                    torch.cat([values.new_zeros(pad_shape), values], dim=2)))  # fmt: skip
    return out


def concat_rows(first: KV, second: KV) -> KV:
    """Stack two caches of equal length along the batch dimension."""
    return [(torch.cat([k1, k2]), torch.cat([v1, v2])) for (k1, v1), (k2, v2) in zip(first, second, strict=True)]


def select_rows(kv: KV, rows: torch.Tensor) -> KV:
    # Layers may live on different GPUs (a model spread over several): the index follows each layer.
    return [(keys.index_select(0, rows.to(keys.device)), values.index_select(0, rows.to(values.device)))
            for keys, values in kv]  # fmt: skip


def crop_left(kv: KV, n: int) -> KV:
    """Drop the first `n` columns (padding no row needs any more)."""
    if n <= 0:
        return kv
    return [(keys[:, :, n:], values[:, :, n:]) for keys, values in kv]


def row_tail(kv: KV, row: int, n: int) -> KV:
    """The last `n` columns of one row, as a batch-of-one cache (a copy)."""
    return [(keys[row : row + 1, :, -n:].clone(), values[row : row + 1, :, -n:].clone()) for keys, values in kv]


def head(kv: KV, n: int) -> KV:
    """The first `n` columns of a batch-of-one cache (shared storage; caches never write in place)."""
    return [(keys[:, :, :n], values[:, :, :n]) for keys, values in kv]


@dataclass
class _Entry:
    ids: tuple[int, ...]
    kv: KV


class PrefixCache:
    """Recently finished sequences' KV, so a prompt that starts the same way skips that part.

    Bounded by `max_tokens` in all, least recently used first out. A lookup
    returns the longest common prefix with any entry (a prefix of an entry is as
    good as the entry), which covers both a shared system prompt and a
    conversation's next turn.
    """

    def __init__(self, max_tokens: int, min_match: int = 16) -> None:
        self.max_tokens = max_tokens
        self.min_match = min_match
        self._entries: OrderedDict[tuple[int, ...], _Entry] = OrderedDict()
        self._tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, ids: list[int], kv: KV) -> None:
        key = tuple(ids)
        if self.max_tokens <= 0 or len(key) < self.min_match or len(key) > self.max_tokens:
            return
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        self._entries[key] = _Entry(key, kv)
        self._tokens += len(key)
        while self._tokens > self.max_tokens:
            _, dropped = self._entries.popitem(last=False)
            self._tokens -= len(dropped.ids)

    def match(self, ids: list[int]) -> tuple[int, KV | None]:
        """(number of leading tokens of `ids` whose KV is known, that KV) — at most len(ids) - 1."""
        best, best_entry = 0, None
        limit = len(ids) - 1  # the last prompt token must run to produce logits
        for entry in self._entries.values():
            n = _common_prefix(entry.ids, ids, limit)
            if n > best:
                best, best_entry = n, entry
        if best_entry is None or best < self.min_match:
            return 0, None
        self._entries.move_to_end(best_entry.ids)
        return best, head(best_entry.kv, best)


def _common_prefix(a: tuple[int, ...], b: list[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


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
