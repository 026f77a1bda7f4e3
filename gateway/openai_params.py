"""The sampling parameters the OpenAI endpoints share: one validation, one conversion."""

from __future__ import annotations

import re
from typing import Any

from cortex.gateway.errors import InvalidRequest
from cortex.protocol import Reasoning, Sampling, TokenLogprob

MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300
"""OpenAI's limit on the entries of `logit_bias`."""
_TOKEN_ID = re.compile(r"[0-9]{1,9}")
"""A token id as a `logit_bias` key: digits only, and few enough to fit every wire integer (no vocabulary is larger)."""
MAX_METADATA = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_SAFETY_IDENTIFIER = 64
VERBOSITIES = ("low", "medium", "high")


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
    logit_bias(getattr(req, "logit_bias", None))
    safety = getattr(req, "safety_identifier", None)
    if safety is not None and len(safety) > MAX_SAFETY_IDENTIFIER:
        raise InvalidRequest(f"`safety_identifier` may be at most {MAX_SAFETY_IDENTIFIER} characters long.",
                             param="safety_identifier")  # fmt: skip


def logit_bias(bias: dict[str, Any] | None) -> dict[int, float]:
    """`logit_bias` checked as OpenAI checks it: token ids (as strings) to numbers from -100 to 100.

    Whether an id is a token of the model only the worker knows: it rejects the others.
    """
    if not bias:
        return {}
    if len(bias) > MAX_LOGIT_BIAS:
        raise InvalidRequest(f"`logit_bias` may hold at most {MAX_LOGIT_BIAS} entries.", param="logit_bias")
    checked = {}
    for key, value in bias.items():
        if not _TOKEN_ID.fullmatch(key):
            raise InvalidRequest(f"Invalid key in `logit_bias`: {key!r}; keys are token ids (non-negative integers).",
                                 param="logit_bias")  # fmt: skip
        if isinstance(value, bool) or not isinstance(value, int | float) or not -100 <= value <= 100:
            raise InvalidRequest(f"Invalid value in `logit_bias` for token {key}: a number from -100 to 100 is "
                                 "expected.", param="logit_bias")  # fmt: skip
        checked[int(key)] = float(value)
    return checked


def metadata(value: dict[str, Any] | None, *, param: str = "metadata") -> dict[str, str]:
    """OpenAI's `metadata`: at most 16 keys of up to 64 characters, each with a string of up to 512."""
    if value is None:
        return {}
    if len(value) > MAX_METADATA:
        raise InvalidRequest(f"`{param}` may hold at most {MAX_METADATA} keys.", param=param)
    for key, text in value.items():
        if len(key) > MAX_METADATA_KEY:
            raise InvalidRequest(f"`{param}` keys may be at most {MAX_METADATA_KEY} characters long.", param=param)
        if not isinstance(text, str) or len(text) > MAX_METADATA_VALUE:
            raise InvalidRequest(f"`{param}` values must be strings of at most {MAX_METADATA_VALUE} characters; "
                                 f"{key!r} is not.", param=param)  # fmt: skip
    return value


def check_verbosity(verbosity: str | None, *, param: str) -> None:
    if verbosity is not None and verbosity not in VERBOSITIES:
        raise InvalidRequest(f"Invalid verbosity {verbosity!r}; expected one of {', '.join(VERBOSITIES)}.", param=param)


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
        logit_bias=logit_bias(getattr(req, "logit_bias", None)),
    )
