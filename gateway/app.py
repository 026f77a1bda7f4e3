"""The gateway's Starlette application, assembled from lists in one factory."""

from __future__ import annotations

import contextlib
import functools
import gc
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
from cortex.gateway import anthropic_errors, fleet_page, openai_errors, openapi, routes_anthropic, routes_openai
from cortex.gateway.affinity import Affinity
from cortex.gateway.auth import KeyRing, RequireKey
from cortex.gateway.errors import ApiError, InvalidRequest
from cortex.gateway.fleet import FleetView
from cortex.gateway.fleet_feed import FleetFeed
from cortex.gateway.limits import Limiter
from cortex.gateway.metrics import Metrics
from cortex.gateway.placing import ensure_placed
from cortex.gateway.relay import Relay
from cortex.gateway.services import Services, Settings
from cortex.gateway.sse import SERVER_SEND
from cortex.gateway.usage import Accounting

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
        # Whether anyone who can reach this port may use it: "open" until an API key exists.
        "auth": "open" if svc.keys.open else "keys",
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


def create_app(settings: Settings, metrics: Metrics | None = None, *, freeze_after_start: bool = False) -> Starlette:
    """The gateway's app. `freeze_after_start`: the process is the gateway's own (`cortex.gateway.main`), so what
    exists once it has started is kept for good (`gc.freeze`); not for an app made inside another process (tests)."""
    metrics = metrics or Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        bus = await Bus.open(settings.nats_url, name="cortex-gateway")
        fleet = FleetView()
        relay = Relay(bus, fleet.is_live)
        relay.affinity = Affinity(fleet.workers) if settings.affinity else None
        await relay.start()
        await bus.watch_fleet(fleet.on_change)
        await bus.watch_decisions(fleet.on_decision)
        keys = await load_keys(bus, settings)
        limiter = Limiter(bus)
        accounting = Accounting(bus, limiter, metrics, relay.gateway_id)
        services = Services(settings=settings, bus=bus, relay=relay, fleet=fleet, metrics=metrics, keys=keys,
                            limiter=limiter, accounting=accounting)  # fmt: skip
        relay.check_waiting = functools.partial(ensure_placed, services)
        metrics.track_fleet(fleet.workers)
        app.state.fleet_feed = FleetFeed(fleet, metrics)  # the fleet page's live snapshots
        app.state.services = services
        log.info("gateway %s connected to %s", relay.gateway_id, settings.nats_url)
        if freeze_after_start:
            # Everything made so far (modules, the app, the connection) lives as long as the process: out of the
            # collector's sight, a full collection no longer walks it. Under 256 streams a full collection stalled
            # the event loop 110 ms before, about half that after (bench/gateway_scale.py).
            gc.collect()
            gc.freeze()
        try:
            yield
        finally:
            await services.accounting.flush()
            await bus.close()

    routes = [
        # The generation routes first: the router tries each route in turn, and they take nearly all the requests.
        Route("/v1/chat/completions", routes_openai.chat_completions, methods=["POST"]),
        Route("/v1/messages", routes_anthropic.messages, methods=["POST"]),
        Route("/v1/completions", routes_openai.completions, methods=["POST"]),
        Route("/v1/responses", routes_openai.responses, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/openapi.json", openapi.openapi_json, methods=["GET"]),
        Route("/v1/models", routes_openai.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", routes_openai.retrieve_model, methods=["GET"]),
        Route("/v1/responses/{response_id}", routes_openai.stored_response, methods=["GET", "DELETE"]),
        Route("/v1/messages/count_tokens", routes_anthropic.count_tokens, methods=["POST"]),
        *fleet_page.routes(),
    ]
    app = GatewayApp(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    app.add_middleware(RequireKey, keys=lambda: _keys_of(app), envelope=error_envelope)
    app.add_middleware(IgnoreTrailingSlash)
    return app


class GatewayApp(Starlette):
    """Starlette, leaving the server's own ``send`` in the scope for streamed bodies (`cortex.gateway.sse`)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[SERVER_SEND] = send
        try:
            await super().__call__(scope, receive, send)
        finally:
            # The server's `send` is a method of its request cycle, which holds this scope: left here, every
            # request would end as a reference cycle, freed only by the garbage collector's passes.
            scope.pop(SERVER_SEND, None)


def _keys_of(app: Starlette) -> KeyRing | None:
    services: Services | None = getattr(app.state, "services", None)
    return services.keys if services is not None else None


class OpenRefused(Exception):
    """``--require-keys`` and no API key exists: the gateway will not serve open."""


async def load_keys(bus: Bus, settings: Settings) -> KeyRing:
    """Every API key, read before the gateway serves anything, then kept current by a watch."""
    keys = KeyRing(required=settings.require_keys, sealed=await bus.keys_ever_written())
    for key, value in (await bus.read_keys()).items():
        keys.on_change(key, value)
    await bus.watch_keys(keys.on_change)
    if keys.open:
        log.warning("no API key exists: this gateway serves anyone who can reach it "
                    "(`cortexctl keys add NAME` closes it; --require-keys refuses to start open)")  # fmt: skip
    elif not len(keys):
        if settings.require_keys and not keys.sealed:
            raise OpenRefused("--require-keys: no API key exists (create one with `cortexctl keys add NAME`)")
        log.warning("no API key is valid now (every key was revoked): every request is refused")
    else:
        log.info("API keys required: %d known", len(keys))
    return keys


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
