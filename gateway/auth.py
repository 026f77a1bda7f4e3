"""Who is calling: API keys from the ``cortex-keys`` bucket, checked on every route under ``/v1/``.

Each gateway holds every key in memory (by the hash of its secret), filled
from the bucket before it serves and kept current by a watch, so a key added or
revoked with cortexctl counts at every gateway within a moment. While the
bucket has never held a key the gateway is open: any key, or none, is accepted
(the quick start needs no set-up), and it says so in its log and ``/health``;
``--require-keys`` refuses to serve open. Once a key has existed, revoking the
last one closes the gateway to everyone rather than opening it: opening it
again is a purge of the bucket, on purpose.

A key is read from ``Authorization: Bearer`` (OpenAI's SDK) or ``x-api-key``
(Anthropic's). The secret itself is never logged nor echoed: errors name the
key by its hint (``sk-...abcd``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from cortex.gateway.errors import ApiError, PermissionDenied, Unauthenticated
from cortex.protocol import codec
from cortex.protocol.keys import ApiKey, secret_hash, secret_hint

log = logging.getLogger("cortex.gateway")

GUARDED_PREFIX = "/v1/"
"""Every API route; ``/health`` and ``/openapi.json`` stay open (probes, documentation)."""
STATE_KEY = "api_key"
"""Where the caller's `ApiKey` (None on an open gateway) is left in the request's state."""


class KeyRing:
    """The API keys this gateway knows, by the hash of their secret."""

    def __init__(self, *, required: bool = False, sealed: bool = False) -> None:
        self.required = required
        """Never open: with no key in the bucket, every request is refused (``--require-keys``)."""
        self.sealed = sealed
        """A key has existed: the ring stays closed with none left (set by the bucket's history, or a key seen)."""
        self._by_hash: dict[str, ApiKey] = {}
        self._hash_of: dict[str, str] = {}
        """Bucket key -> the hash it is filed under (a revoked key comes as its bucket key alone)."""

    @property
    def open(self) -> bool:
        """Whether any key, or none, is accepted: no key exists or ever did, and none is required."""
        return not self._by_hash and not self.required and not self.sealed

    def __len__(self) -> int:
        return len(self._by_hash)

    def on_change(self, key: str, value: bytes | None) -> None:
        """A change of the keys bucket: a key added or changed, or (value None) revoked."""
        old = self._hash_of.pop(key, None)
        if old is not None:
            self._by_hash.pop(old, None)
        if value is None:
            return
        try:
            api_key = codec.decode_api_key(value)
        except codec.DecodeError as exc:
            log.warning("ignoring malformed API key %s: %s", key, exc)
            return
        self._by_hash[api_key.secret_sha256] = api_key
        self._hash_of[key] = api_key.secret_sha256
        self.sealed = True

    def authenticate(self, headers: Mapping[str, str], now: float | None = None) -> ApiKey | None:
        """The caller's key; None on an open gateway. Raises Unauthenticated (missing, unknown, expired)."""
        if self.open:
            return None
        secret = presented_secret(headers)
        if not secret:
            raise Unauthenticated(
                "You didn't provide an API key. Send it as `Authorization: Bearer <key>` or `x-api-key: <key>`."
            )
        api_key = self._by_hash.get(secret_hash(secret))
        if api_key is None:
            raise Unauthenticated(f"Incorrect API key provided: {secret_hint(secret)}. It is unknown or was revoked.")
        if api_key.expired(time.time() if now is None else now):
            raise Unauthenticated(f"The API key `{api_key.name}` has expired.")
        return api_key


def presented_secret(headers: Mapping[str, str]) -> str:
    """The secret a request presents: ``Authorization: Bearer`` first, then ``x-api-key``; "" if neither."""
    scheme, _, credentials = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return headers.get("x-api-key", "").strip()


def check_model(api_key: ApiKey | None, model_id: str, aliases: list[str]) -> None:
    """Raise PermissionDenied unless the caller may use the model (`model_id`, or one of its `aliases`)."""
    if api_key is not None and not api_key.allows(model_id, *aliases):
        raise PermissionDenied(f"The API key `{api_key.name}` may not use the model `{model_id}`.", param="model")


class RequireKey:
    """ASGI middleware: authenticates every request under ``/v1/``, answering a refusal in the path's dialect.

    The key (or None) is left in the request's state under `STATE_KEY` for the route.
    """

    def __init__(
        self,
        app: ASGIApp,
        keys: Callable[[], KeyRing | None],
        envelope: Callable[[str], Callable[[ApiError], Response]],
    ) -> None:
        self.app = app
        self.keys = keys
        """The key ring, once the app has started (None before: nothing is served then)."""
        self.envelope = envelope

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        ring = self.keys() if scope["type"] == "http" else None
        if ring is None or not path.startswith(GUARDED_PREFIX):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            api_key = ring.authenticate(headers)
        except ApiError as exc:
            await self.envelope(path)(exc)(scope, receive, send)
            return
        scope.setdefault("state", {})[STATE_KEY] = api_key
        await self.app(scope, receive, send)


def caller(state: object) -> ApiKey | None:
    """The key the middleware left in a request's state (None: an open gateway)."""
    return getattr(state, STATE_KEY, None)
