"""The sampling parameters the OpenAI endpoints share: one validation, one conversion."""

from __future__ import annotations

from typing import Any

from cortex.gateway.errors import InvalidRequest
from cortex.protocol import Sampling


def check_sampling(req: Any) -> None:
    """400 for an out-of-range `temperature`, `top_p`, `seed` or penalty (absent fields pass)."""
    temperature = getattr(req, "temperature", None)
    if temperature is not None and not 0.0 <= temperature <= 2.0:
        raise InvalidRequest("`temperature` must be between 0 and 2.", param="temperature")
    top_p = getattr(req, "top_p", None)
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise InvalidRequest("`top_p` must be greater than 0 and at most 1.", param="top_p")
    seed = getattr(req, "seed", None)
    if seed is not None and not -(2**63) <= seed < 2**63:
        raise InvalidRequest("`seed` must be a 64-bit signed integer.", param="seed")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name, None)
        if value is not None and not -2.0 <= value <= 2.0:
            raise InvalidRequest(f"`{name}` must be between -2 and 2.", param=name)


def to_sampling(req: Any, *, max_tokens: int | None, stop: list[str] | None = None) -> Sampling:
    """The canonical sampling of a validated request; OpenAI's defaults for what it leaves out."""
    temperature, top_p = getattr(req, "temperature", None), getattr(req, "top_p", None)
    return Sampling(
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        max_tokens=max_tokens,
        stop=stop or [],
        seed=getattr(req, "seed", None),
        presence_penalty=getattr(req, "presence_penalty", None) or 0.0,
        frequency_penalty=getattr(req, "frequency_penalty", None) or 0.0,
    )
