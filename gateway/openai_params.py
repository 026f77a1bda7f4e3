"""The sampling parameters the OpenAI endpoints share: one validation, one conversion."""

from __future__ import annotations

from typing import Any

from cortex.gateway.errors import InvalidRequest
from cortex.protocol import Reasoning, Sampling, TokenLogprob

MAX_TOP_LOGPROBS = 20


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


def check_logprobs(logprobs: bool, top_logprobs: int | None, *, asked_by: str = "`logprobs` set to true") -> None:
    """`asked_by`: how this dialect asks for log probabilities, named when `top_logprobs` comes without it."""
    if top_logprobs is not None and not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequest(f"`top_logprobs` must be between 0 and {MAX_TOP_LOGPROBS}.", param="top_logprobs")
    if top_logprobs and not logprobs:
        raise InvalidRequest(f"`top_logprobs` needs {asked_by}.", param="top_logprobs")


EFFORTS = {"none": False, "minimal": False, "low": True, "medium": True, "high": True, "xhigh": True}
"""OpenAI's reasoning efforts: the lowest ones ask a model to skip its thinking, the rest to think."""


def reasoning(effort: str | None, *, param: str) -> Reasoning:
    if effort is None:
        return Reasoning()
    if effort not in EFFORTS:
        raise InvalidRequest(f"Invalid reasoning effort {effort!r}; expected one of {', '.join(EFFORTS)}.", param=param)
    return Reasoning(enabled=EFFORTS[effort])


def logprob_objects(entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    """OpenAI's per-token log probabilities (chat ``logprobs.content``, Responses ``output_text.logprobs``)."""
    return [
        {
            "token": e.token,
            "logprob": e.logprob,
            "bytes": list(e.token.encode()),
            "top_logprobs": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode())} for t in e.top],
        }
        for e in entries
    ]


def to_sampling(
    req: Any, *, max_tokens: int | None, stop: list[str] | None = None, logprobs: bool = False, top_logprobs: int = 0
) -> Sampling:
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
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
