"""Stored OpenAI Responses (``store``), kept in the ``cortex-responses`` KV bucket under their id.

A stored response keeps the whole conversation that produced it (canonical
messages plus the answer), so a follow-up naming it in ``previous_response_id``
continues through any gateway replica, and ``GET``/``DELETE /v1/responses/{id}``
work on any of them.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import msgspec

from cortex.broker.errors import BrokerError
from cortex.gateway.errors import ModelNotFound, NoCapacity
from cortex.gateway.services import Services
from cortex.protocol import Message

log = logging.getLogger("cortex.gateway")
RESPONSE_ID = re.compile(r"resp_[0-9a-f]{32}")


class Stored(msgspec.Struct, kw_only=True):
    """What the responses bucket keeps per response id: the conversation, without instructions, and the response."""

    messages: list[Message]
    response: msgspec.Raw = msgspec.Raw(b"null")
    """The response object as returned (JSON); null if an older gateway stored only the conversation."""


_stored_decoder = msgspec.json.Decoder(Stored)
_encoder = msgspec.json.Encoder()


async def load(svc: Services, response_id: str, *, param: str) -> Stored:
    """A stored response, or 404 in OpenAI's words."""
    if not RESPONSE_ID.fullmatch(response_id):
        raise ModelNotFound(f"Response with id '{response_id}' not found.", param=param, code="not_found")
    try:
        raw = await svc.bus.get_stored(response_id)
    except BrokerError as exc:
        raise NoCapacity(f"Stored responses are unavailable: {exc}") from exc
    stored = None
    if raw is not None:
        try:
            stored = _stored_decoder.decode(raw)
        except msgspec.DecodeError:
            log.warning("stored response %s is unreadable", response_id)
    if stored is None:
        raise ModelNotFound(f"Response with id '{response_id}' not found.", param=param, code="not_found")
    return stored


async def save(svc: Services, response_id: str, messages: list[Message], response: dict[str, Any]) -> None:
    """Keep `response` and the conversation that led to it (`messages`, the answer last)."""
    stored = Stored(messages=messages, response=msgspec.Raw(_encoder.encode(response)))
    try:
        await svc.bus.put_stored(response_id, _encoder.encode(stored))
    except BrokerError as exc:
        # The answer is done and paid for: deliver it; only a follow-up naming it will miss it.
        log.warning("response %s not stored: %s", response_id, exc)


async def retrieve(svc: Services, response_id: str) -> bytes:
    """``GET /v1/responses/{id}``: the response as it was returned."""
    stored = await load(svc, response_id, param="response_id")
    if bytes(stored.response) == b"null":
        raise ModelNotFound(f"Response with id '{response_id}' not found.", param="response_id", code="not_found")
    return bytes(stored.response)


async def delete(svc: Services, response_id: str) -> bytes:
    """``DELETE /v1/responses/{id}``: forget it (a follow-up naming it is then a 404)."""
    await load(svc, response_id, param="response_id")
    try:
        await svc.bus.delete_stored(response_id)
    except BrokerError as exc:
        raise NoCapacity(f"Stored responses are unavailable: {exc}") from exc
    return _encoder.encode({"id": response_id, "object": "response", "deleted": True})
