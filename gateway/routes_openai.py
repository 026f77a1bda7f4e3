"""OpenAI routes: models, ``/v1/chat/completions``, ``/v1/completions`` and ``/v1/responses``.

The generation routes are thin: `cortex.gateway.exchange.handle` does the work,
the dialect modules parse and format.
"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from cortex.gateway import responses_store
from cortex.gateway.auth import caller, check_model
from cortex.gateway.errors import ApiError
from cortex.gateway.exchange import handle, services
from cortex.gateway.fleet import ModelEntry
from cortex.gateway.openai_chat import OpenAIChat
from cortex.gateway.openai_completions import OpenAICompletions
from cortex.gateway.openai_errors import error_response
from cortex.gateway.openai_responses import OpenAIResponses

_encoder = msgspec.json.Encoder()
CHAT = OpenAIChat()
COMPLETIONS = OpenAICompletions()
RESPONSES = OpenAIResponses()


def _model_object(entry: ModelEntry) -> dict[str, object]:
    """One entry both SDKs accept: OpenAI's `object`, `created`, `owned_by`; Anthropic's `type`,
    `display_name`, `created_at`, `lifecycle`, `max_input_tokens`."""
    created = entry.card.created
    return {
        "id": entry.id,
        "object": "model",
        "created": created,
        "owned_by": "cortex",
        "type": "model",
        "display_name": entry.id,
        "created_at": datetime.fromtimestamp(created, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "lifecycle": "active",
        "max_input_tokens": entry.card.context_length or None,
        "aliases": entry.card.aliases,
        "context_length": entry.card.context_length,
        "max_model_len": entry.card.context_length,
        # What Cortex serves for every model today (not `capabilities`: Anthropic's SDK types that key).
        "supports": {"json": True, "tools": True, "reasoning": entry.reasoning},
        "ready": bool(entry.ready_on),
        "loaded_on": entry.ready_on,
        "loading_on": entry.loading_on,
        "load_progress": entry.progress,
        "queue_depth": entry.queue_depth,
        "in_flight": entry.in_flight,
        "pinned": entry.pinned,
        # Why it is where it is (or why it cannot load): the placement's reason, from the placement bucket.
        "placement": entry.placement.reason if entry.placement is not None else None,
    }


async def list_models(request: Request) -> Response:
    svc = services(request)
    try:
        svc.require_broker()
    except ApiError as exc:
        return error_response(exc)
    key = caller(request.state)
    data = [_model_object(entry) for entry in svc.fleet.models().values()
            if key is None or key.allows(entry.id, *entry.card.aliases)]  # fmt: skip
    body = {
        "object": "list",
        "data": data,
        # Anthropic's page shape: the whole fleet fits in one page.
        "has_more": False,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }
    return Response(_encoder.encode(body), media_type="application/json")


async def retrieve_model(request: Request) -> Response:
    try:
        services(request).require_broker()
        entry = services(request).fleet.find(request.path_params["model"])
        check_model(caller(request.state), entry.id, entry.card.aliases)
    except ApiError as exc:
        return error_response(exc)
    return Response(_encoder.encode(_model_object(entry)), media_type="application/json")


async def chat_completions(request: Request) -> Response:
    return await handle(request, CHAT)


async def completions(request: Request) -> Response:
    return await handle(request, COMPLETIONS)


async def responses(request: Request) -> Response:
    return await handle(request, RESPONSES)


async def stored_response(request: Request) -> Response:
    """``GET`` or ``DELETE /v1/responses/{id}``."""
    svc, response_id = services(request), request.path_params["response_id"]
    try:
        if request.method == "DELETE":
            body = await responses_store.delete(svc, response_id)
        else:
            body = await responses_store.retrieve(svc, response_id)
    except ApiError as exc:
        return error_response(exc)
    return Response(body, media_type="application/json")
