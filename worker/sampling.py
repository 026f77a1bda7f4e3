"""Choosing the next token from logits: greedy at temperature 0, else temperature + top-p."""

from __future__ import annotations

from collections.abc import Callable

import torch

GREEDY_BELOW = 1e-5
"""Temperatures this small are greedy (dividing logits by them would overflow)."""


def is_greedy(temperature: float) -> bool:
    return temperature < GREEDY_BELOW


def sample(
    logits: torch.Tensor, *, temperature: float, top_p: float, generator: torch.Generator | None, top_k: int = 0
) -> int:
    """Pick one token id from a 1-D logits vector."""
    if is_greedy(temperature):
        return int(torch.argmax(logits).item())
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = cumulative - sorted_probs >= top_p
        drop[0] = False  # a top_p that rounds to 0 in float32 (1e-50) would otherwise drop every token
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice].item())
    return int(torch.multinomial(probs, 1, generator=generator).item())


def penalties(presence: float, frequency: float, vocab: int, device: torch.device):  # type: ignore[no-untyped-def]
    """A logits processor applying OpenAI's presence and frequency penalties to generated tokens."""
    # float32 said, not implied: a load on a loader thread sets torch's default dtype process-wide while it builds.
    counts = torch.zeros(vocab, dtype=torch.float32, device=device)
    seen = 0

    def apply(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        nonlocal seen
        for token in generated[seen:]:
            if token < vocab:
                counts[token] += 1
        seen = len(generated)
        return logits - frequency * counts[: logits.shape[-1]] - presence * (counts[: logits.shape[-1]] > 0)

    return apply


def logit_bias(bias: dict[int, float], device: torch.device) -> Callable[[list[int], torch.Tensor], torch.Tensor]:
    """A logits processor adding OpenAI's ``logit_bias`` to the listed token ids (checked against the vocabulary)."""
    ids = torch.tensor(list(bias), dtype=torch.long, device=device)
    values = torch.tensor(list(bias.values()), dtype=torch.float32, device=device)

    def apply(generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        # Out of place: `logits` may be a view into the whole batch's logits.
        return logits.index_add(0, ids, values.to(logits.dtype))

    return apply


def make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()
    else:
        # OpenAI seeds are any int64; torch wants a non-negative 64-bit value.
        generator.manual_seed(seed % 2**64)
    return generator
