"""The fleet page: ``GET /fleet``, a live view of the whole fleet, with admin buttons.

::

    GET  /            -> 307 to /fleet
    GET  /fleet       the page (plain HTML, one JS and one CSS file; no build step)
    GET  /fleet/events  server-sent events: a JSON snapshot whenever the fleet changes (4 a second at most)
    GET  /fleet/state   the same snapshot, once (curl, scripts)
    POST /fleet/actions {"action": "load", "model": "m", "worker": "w"}: load, unload, pin, unpin, drain, undrain

The snapshot (`cortex.gateway.fleet_feed`) comes from this gateway's
`FleetView`, whose watches call `FleetFeed` on every change, and from its own
metrics. Who may see and do what:

- the page itself (HTML, JS, CSS) is static and shows nothing until the
  snapshot comes; it is always served;
- the snapshot (``/fleet/events``, ``/fleet/state``) reveals model names and
  worker hosts, so once API keys exist it needs one, sent as ``Authorization:
  Bearer`` or ``x-api-key`` (the page asks for it and keeps it in the browser's
  session storage, or its local storage if asked to remember it; never in a
  URL, which logs keep). A key limited to some models sees only those;
- actions need an *admin* key (``cortexctl keys add NAME --admin``) once keys
  exist, and anyone may act on an open gateway, as anyone may use it. They are
  the ones cortexctl runs (`cortex.broker.fleet_ops`), recorded in the audit
  trail with the key's name before they are carried out. A body must be sent as
  ``application/json``, which a page of another site cannot do without asking
  first (CORS), and this gateway never says yes; on an open gateway, only when
  the page was reached by IP address or ``localhost`` (a site that points its
  own DNS name at this gateway is "same origin" to the browser).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib.resources
import ipaddress
import time
from collections.abc import AsyncGenerator, Awaitable, Callable

import msgspec
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from cortex.broker import fleet_ops
from cortex.broker.bus import Bus
from cortex.broker.errors import BrokerError
from cortex.gateway.errors import ApiError, InvalidRequest, PermissionDenied
from cortex.gateway.fleet_feed import FleetFeed, snapshot
from cortex.gateway.openai_errors import error_response
from cortex.gateway.services import Services
from cortex.gateway.sse import EventStreamResponse
from cortex.protocol.keys import ApiKey

SENDS_PER_S = 4.0
BURST = 4
"""A page gets at most `SENDS_PER_S` snapshots a second however busy the fleet, but `BURST` at once after a quiet
spell: a model's load (a placement, then the worker's loading and ready adverts, a tenth of a second apart for a
small one) is drawn step by step."""
RECHECK_S = 2.0
"""A snapshot is looked at again this often without a change: a worker whose advert goes stale says nothing."""
KEEPALIVE_S = 15.0
"""An SSE comment this often while nothing changes, so proxies and phones keep the connection."""
MAX_ACTION_BODY = 16 * 1024
STATIC = {"fleet.js": "text/javascript; charset=utf-8", "fleet.css": "text/css; charset=utf-8"}
SECURITY_HEADERS = {
    # Only this gateway's own files, no inline script, never in a frame (clickjacking on the buttons).
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "referrer-policy": "no-referrer",
    "x-content-type-options": "nosniff",
    "cache-control": "no-cache",
}
_encoder = msgspec.json.Encoder()


# -- who may see and act ------------------------------------------------------------------------------------


def _services(request: Request) -> Services:
    svc: Services = request.app.state.services
    return svc


def _feed(request: Request) -> FleetFeed:
    feed: FleetFeed = request.app.state.fleet_feed
    return feed


def _reader(request: Request) -> ApiKey | None:
    """The caller's key (None on an open gateway); raises Unauthenticated."""
    return _services(request).keys.authenticate(request.headers)


def _admin(request: Request) -> str:
    """Who acts, as the audit trail names them; raises Unauthenticated, or PermissionDenied for a non-admin key."""
    key = _reader(request)
    if key is None:
        if not _addressed_by_ip(request.headers.get("host", "")):
            # DNS rebinding: a page of another site that points its own name at this gateway is "same origin".
            raise PermissionDenied("On an open gateway, actions are taken only at its IP address or localhost "
                                   "(the Host header), never at a DNS name: create an admin key to act by name.",
                                   code="host_not_allowed")  # fmt: skip
        client = request.client.host if request.client else "?"
        return f"fleet page at {client} (open gateway)"
    if not key.admin:
        raise PermissionDenied(
            f"The API key `{key.name}` is not an admin key: the fleet page's actions need one "
            "(`cortexctl keys add NAME --admin`).",
            code="not_admin",
        )
    return key.name


def _addressed_by_ip(host: str) -> bool:
    """Whether a Host header names this gateway by an IP address or ``localhost`` (a name no other site controls)."""
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


# -- routes ---------------------------------------------------------------------------------------------------


@functools.cache
def _static(name: str) -> bytes:
    return importlib.resources.files("cortex.gateway").joinpath("static", name).read_bytes()


async def root(_request: Request) -> Response:
    return RedirectResponse("/fleet", status_code=307)


async def page(_request: Request) -> Response:
    return Response(_static("fleet.html"), media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


async def asset(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in STATIC:
        return error_response(_not_found(request))
    return Response(_static(name), media_type=STATIC[name], headers=SECURITY_HEADERS)


def _not_found(request: Request) -> ApiError:
    error = InvalidRequest(f"Not Found: {request.method} {request.url.path}")
    error.status = 404
    return error


async def state(request: Request) -> Response:
    try:
        key = _reader(request)
    except ApiError as exc:
        return error_response(exc)
    body = snapshot(_services(request), _feed(request), key)
    return Response(_encoder.encode(body), media_type="application/json", headers={"cache-control": "no-store"})


async def events(request: Request) -> Response | EventStreamResponse:
    try:
        key = _reader(request)
    except ApiError as exc:
        return error_response(exc)
    svc, feed = _services(request), _feed(request)
    who = {
        "auth": "open" if key is None else "key",
        "key": key.name if key else None,
        "may_act": key is None or key.admin,
    }

    async def stream() -> AsyncGenerator[bytes, None]:
        yield b"event: hello\ndata: " + _encoder.encode(who) + b"\n\n"
        sent, sent_at = b"", time.monotonic()
        tokens, refilled = float(BURST), sent_at
        while True:
            change = feed.next_change()
            try:
                svc.keys.authenticate(request.headers)  # a key revoked (or expired) meanwhile ends the stream
            except ApiError as exc:
                yield b"event: denied\ndata: " + _encoder.encode({"message": exc.message}) + b"\n\n"
                return
            data = _encoder.encode(snapshot(svc, feed, key))
            now = time.monotonic()
            if data != sent:
                tokens, refilled = min(float(BURST), tokens + (now - refilled) * SENDS_PER_S), now
                if tokens < 1:  # over the rate: what changes meanwhile goes out together, once a send is due
                    await asyncio.sleep((1 - tokens) / SENDS_PER_S)
                    continue
                tokens -= 1
                yield b"event: fleet\ndata: " + data + b"\n\n"
                sent, sent_at = data, now
            elif now - sent_at >= KEEPALIVE_S:
                yield b": keep-alive\n\n"
                sent_at = now
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(RECHECK_S):
                    await change.wait()

    headers = {"cache-control": "no-store", "x-accel-buffering": "no"}  # nginx: don't hold the events back
    return EventStreamResponse(stream(), headers=headers)


class Action(msgspec.Struct, kw_only=True):
    """A button of the page (an HTTP body: decoded leniently, unknown fields ignored)."""

    action: str
    model: str = ""
    worker: str = ""
    replicas: int = 1


_ACTION_DECODER = msgspec.json.Decoder(Action)
OPS: dict[str, Callable[[Bus, Action, fleet_ops.Actor], Awaitable[str]]] = {
    "load": lambda bus, a, actor: fleet_ops.load(bus, a.model, worker=a.worker or None, actor=actor),
    "unload": lambda bus, a, actor: fleet_ops.unload(bus, a.model, worker=a.worker or None, actor=actor),
    "pin": lambda bus, a, actor: fleet_ops.pin(bus, a.model, replicas=a.replicas, worker=a.worker or None, actor=actor),
    "unpin": lambda bus, a, actor: fleet_ops.unpin(bus, a.model, actor=actor),
    "drain": lambda bus, a, actor: fleet_ops.drain(bus, a.worker, actor=actor),
    "undrain": lambda bus, a, actor: fleet_ops.undrain(bus, a.worker, actor=actor),
}
NEEDS = {"load": "model", "unload": "model", "pin": "model", "unpin": "model", "drain": "worker", "undrain": "worker"}


async def act(request: Request) -> Response:
    try:
        who = _admin(request)
        action = await _read_action(request)
        svc = _services(request)
        actor = fleet_ops.Actor(via="fleet page", by=f"fleet page on gateway {svc.relay.gateway_id}", who=who)
        message = await OPS[action.action](svc.bus, action, actor)
    except ApiError as exc:
        return error_response(exc)
    except fleet_ops.Refused as exc:
        refused = InvalidRequest(f"Refused: {exc}", code="refused")
        refused.status = 409
        return error_response(refused)
    except BrokerError as exc:
        # No Retry-After: on a locked-down broker (the likely cause) the same action fails again.
        error = ApiError(f"The broker did not take the change: {exc}. On a locked-down broker the gateway's NATS "
                         "user may not write pins, drains or the audit trail: act with `cortexctl` as the admin "
                         "user, or run this gateway with admin credentials.", code="broker_refused")  # fmt: skip
        error.status, error.type = 503, "service_unavailable"
        return error_response(error)
    return Response(_encoder.encode({"ok": True, "message": message}), media_type="application/json")


async def _read_action(request: Request) -> Action:
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        error = InvalidRequest("Send the action as JSON (`Content-Type: application/json`).", code="unsupported_type")
        error.status = 415
        raise error
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_ACTION_BODY:
            raise InvalidRequest(f"An action is at most {MAX_ACTION_BODY} bytes.")
    try:
        action = _ACTION_DECODER.decode(body)
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"Invalid action: {exc}") from None
    need = NEEDS.get(action.action)
    if need is None:
        raise InvalidRequest(f"Unknown action `{action.action}`: one of {', '.join(OPS)}.", param="action")
    if not getattr(action, need):
        raise InvalidRequest(f"`{action.action}` needs `{need}`.", param=need)
    return action


def routes() -> list[Route]:
    return [
        Route("/", root, methods=["GET"]),
        Route("/fleet", page, methods=["GET"]),
        Route("/fleet/events", events, methods=["GET"]),
        Route("/fleet/state", state, methods=["GET"]),
        Route("/fleet/actions", act, methods=["POST"]),
        Route("/fleet/{name}", asset, methods=["GET"]),
    ]
