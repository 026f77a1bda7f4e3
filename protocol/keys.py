"""API keys and what is kept per key in NATS: the key itself, its rate-limit window, its usage, the audit trail.

A key's secret is shown once, when `cortexctl keys add` makes it, and stored
only as its SHA-256 (`secret_hash`). A secret is 32 random bytes, so a plain
hash is as strong as a slow one: there is no password to guess. Keys are
looked up by that hash, never compared as text.

A `LimitWindow` is what the gateways agree on, per key, by compare-and-set on
its KV entry: the admissions of the last minute (``rpm``), the tokens charged
in the last minute (``tpm``) and the requests running now
(``max_concurrent``). Times are Unix seconds from the gateways' clocks, so
gateways keep their clocks in step (NTP); a lease that a gateway never
returned (it died) ends at its request's deadline.
"""

from __future__ import annotations

import hashlib
import secrets

import msgspec

SECRET_PREFIX = "sk-"
LIMIT_WINDOW_S = 60.0
"""What "per minute" looks back over: a sliding window, not a calendar minute."""


def new_secret() -> str:
    """A fresh API key secret: ``sk-`` and 43 URL-safe characters (32 random bytes)."""
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def secret_hash(secret: str) -> str:
    """How a secret is stored and looked up: its SHA-256, in hex."""
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def secret_hint(secret: str) -> str:
    """What people see of a secret in listings and errors: ``sk-...`` and its last four characters."""
    return f"{SECRET_PREFIX}...{secret[-4:]}"


class ApiKey(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="type", tag="api_key"):
    """One API key (the value of ``keys.<name>`` in ``cortex-keys``)."""

    name: str
    secret_sha256: str
    hint: str = ""
    """The secret's last characters (`secret_hint`), for people telling keys apart."""
    models: list[str] = []
    """Models the key may use (ids or aliases, as the catalogue names them); empty: every model."""
    rpm: int = 0
    """Requests per minute across every gateway; 0: no limit."""
    tpm: int = 0
    """Tokens (prompt and completion) per minute across every gateway; 0: no limit."""
    max_concurrent: int = 0
    """Requests running at once across every gateway; 0: no limit."""
    expires_at: float = 0.0
    """Unix time after which the key is refused; 0: never."""
    created_at: float = 0.0
    created_by: str = ""
    admin: bool = False
    """May act on the fleet from the gateway's fleet page (load, unload, pin, unpin, drain, undrain)."""

    def expired(self, now: float) -> bool:
        return bool(self.expires_at) and now >= self.expires_at

    def allows(self, *model_names: str) -> bool:
        """Whether the key may use a model known by any of `model_names` (its id, its aliases)."""
        return not self.models or any(name in self.models for name in model_names)

    @property
    def limited(self) -> bool:
        return bool(self.rpm or self.tpm or self.max_concurrent)


class LimitWindow(msgspec.Struct, kw_only=True, omit_defaults=True, tag_field="type", tag="limit_window"):
    """One key's admissions, token charges and running requests (the value of ``limits.<name>`` in
    ``cortex-limits``); mutable: a gateway prunes and extends its copy, then writes it back if nobody wrote first."""

    requests: list[float] = []
    """When each request of the last minute was let in, oldest first."""
    token_times: list[float] = []
    token_counts: list[int] = []
    """When each finished request of the last minute was charged, and how many tokens (parallel lists)."""
    running: dict[str, float] = {}
    """Requests let in and not finished: request id -> when its lease ends (its deadline)."""

    def prune(self, now: float) -> None:
        """Forget what the window no longer looks at."""
        since = now - LIMIT_WINDOW_S
        self.requests = [t for t in self.requests if t > since]
        kept = [(t, n) for t, n in zip(self.token_times, self.token_counts, strict=True) if t > since]
        self.token_times, self.token_counts = [t for t, _ in kept], [n for _, n in kept]
        self.running = {rid: until for rid, until in self.running.items() if until > now}

    @property
    def tokens(self) -> int:
        return sum(self.token_counts)


class UsageRecord(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="type", tag="usage"):
    """One finished request, as `cortexctl usage` adds them up (a message on ``cortex.usage.<key>``)."""

    key: str
    model: str
    status: int
    at: float
    """When the request finished (Unix seconds)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    slot_seconds: float = 0.0
    """Seconds the request held a batch slot on its worker (the last worker, after a failover)."""
    dialect: str = ""
    gateway: str = ""


class AuditEvent(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="type", tag="audit"):
    """One admin action (a message on ``cortex.audit.<action>``): who did what, to what, when."""

    action: str
    """``keys.add``, ``keys.revoke``, ``pin``, ``unpin``, ``load``, ``unload``, ``drain``, ``undrain``."""
    target: str
    at: float
    who: str
    """The operator: their login and host (cortexctl), or the admin key's name."""
    detail: str = ""
