"""Anthropic routes. A key comes as ``x-api-key`` or ``Authorization: Bearer``
(`cortex.gateway.auth` checks it); any ``anthropic-version`` / ``anthropic-beta``
header is accepted."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from cortex.gateway.anthropic_messages import AnthropicCountTokens, AnthropicMessages
from cortex.gateway.exchange import handle

MESSAGES = AnthropicMessages()
COUNT_TOKENS = AnthropicCountTokens()


async def messages(request: Request) -> Response:
    return await handle(request, MESSAGES)


async def count_tokens(request: Request) -> Response:
    return await handle(request, COUNT_TOKENS)
