"""The gateway's Starlette application, assembled from lists in one factory."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Callable

import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from cortex.broker.bus import Bus
from cortex.gateway import anthropic_errors, openai_errors, routes_anthropic, routes_openai
from cortex.gateway.errors import ApiError, InvalidRequest
from cortex.gateway.fleet import FleetView
from cortex.gateway.metrics import Metrics
from cortex.gateway.placing import ensure_placed
from cortex.gateway.relay import Relay
from cortex.gateway.services import Services, Settings

log = logging.getLogger("cortex.gateway")


async def health(request: Request) -> Response:
    svc: Services = request.app.state.services
    workers = svc.fleet.workers()
    ok = svc.bus.connected
    body = {
        "status": "ok" if ok else "degraded",
        "nats": "connected" if ok else "disconnected",
        "workers": len(workers),
        "models_ready": sorted({m for w in workers for m in w.ready_models()}),
    }
    return Response(msgspec.json.encode(body), status_code=200 if ok else 503, media_type="application/json")


ANTHROPIC_PATHS = "/v1/messages"
"""Where Anthropic's endpoints live: every path under it is Anthropic's API, every other one OpenAI's."""


def error_envelope(path: str) -> Callable[[ApiError], Response]:
    """The error response of the API `path` belongs to, for errors no dialect handled (no such route, wrong method).

    An SDK reads only its own API's envelope; ``/v1/models``, which both SDKs list, answers in OpenAI's.
    """
    if path.startswith(ANTHROPIC_PATHS):
        return anthropic_errors.error_response
    return openai_errors.error_response


async def http_error(request: Request, exc: Exception) -> Response:
    """Unknown routes and wrong methods answer in the envelope of the API the path belongs to."""
    assert isinstance(exc, HTTPException)
    error = InvalidRequest(f"{exc.detail}: {request.method} {request.url.path}")
    error.status = exc.status_code
    return error_envelope(request.url.path)(error)


def create_app(settings: Settings, metrics: Metrics | None = None) -> Starlette:
    metrics = metrics or Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        bus = await Bus.open(settings.nats_url, name="cortex-gateway")
        fleet = FleetView()
        relay = Relay(bus, fleet.is_live)
        await relay.start()
        await bus.watch_fleet(fleet.on_change)
        await bus.watch_decisions(fleet.on_decision)
        services = Services(settings=settings, bus=bus, relay=relay, fleet=fleet, metrics=metrics)
        relay.check_waiting = functools.partial(ensure_placed, services)
        metrics.track_fleet(fleet.workers)
        app.state.services = services
        log.info("gateway %s connected to %s", relay.gateway_id, settings.nats_url)
        try:
            yield
        finally:
            await bus.close()

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", routes_openai.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", routes_openai.retrieve_model, methods=["GET"]),
        Route("/v1/chat/completions", routes_openai.chat_completions, methods=["POST"]),
        Route("/v1/completions", routes_openai.completions, methods=["POST"]),
        Route("/v1/responses", routes_openai.responses, methods=["POST"]),
        Route("/v1/responses/{response_id}", routes_openai.stored_response, methods=["GET", "DELETE"]),
        Route("/v1/messages", routes_anthropic.messages, methods=["POST"]),
        Route("/v1/messages/count_tokens", routes_anthropic.count_tokens, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.add_middleware(IgnoreTrailingSlash)
    return app


class IgnoreTrailingSlash:
    """``POST /v1/chat/completions/`` is served like the path without the slash.

    Starlette would answer it with an empty 307, which SDKs follow but curl and
    many scripts do not; a POST redirect gains nothing here.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            raw_path = scope.get("raw_path") or path.encode()
            scope = {**scope, "path": path.rstrip("/") or "/", "raw_path": raw_path.rstrip(b"/") or b"/"}
        await self.app(scope, receive, send)
