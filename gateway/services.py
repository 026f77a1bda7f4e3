"""What every request handler needs, created once in the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from cortex.broker.bus import Bus
from cortex.gateway.auth import KeyRing
from cortex.gateway.errors import NoCapacity
from cortex.gateway.fleet import FleetView
from cortex.gateway.limits import Limiter
from cortex.gateway.metrics import Metrics
from cortex.gateway.relay import Relay
from cortex.gateway.usage import Accounting

MAX_TOKENS_POLICIES = ("clamp", "reject")


@dataclass(frozen=True)
class Settings:
    nats_url: str = "nats://127.0.0.1:4222"
    request_timeout: float = 600.0
    """Seconds a request may take, queueing included, before the client gets a 504."""
    stream_headers_within: float = 2.0
    """A streamed request waits this long for its first chunk before sending headers (errors keep their status)."""
    keepalive_interval: float = 5.0
    """Then an SSE comment goes out this often until the first chunk (long prefill, cold load)."""
    max_tokens_policy: str = "clamp"
    """``clamp``: a max_tokens over what the context leaves after the prompt is lowered to fit (agents ask for
    more than small contexts hold); ``reject``: it is a 400 ``context_length_exceeded``."""
    failover_attempts: int = 2
    """Times one answer may be continued on another worker after its worker died mid-answer (0: never; then 502)."""
    require_keys: bool = False
    """Refuse to serve open: with no API key in the ``cortex-keys`` bucket, start no gateway."""
    affinity: bool = True
    """Send a request first to the worker likely to hold its prompt's prefix in cache (`cortex.gateway.affinity`)."""


@dataclass
class Services:
    settings: Settings
    bus: Bus
    relay: Relay
    fleet: FleetView
    metrics: Metrics
    keys: KeyRing
    limiter: Limiter
    accounting: Accounting

    def require_broker(self) -> None:
        """A 503 while this gateway is cut off from NATS, or just back (`Bus.cut_off`): its view of the fleet is
        stale, so "no such model" would be a lie, a placement written from it wrong, and a publish would time out.
        Not while a watch's probe is merely slow (`Bus.settling`): an overloaded gateway's own event loop makes
        probes late, and refusing every request then would turn a slowdown into an outage."""
        if self.bus.cut_off():
            raise NoCapacity("The request broker (NATS) is unreachable from this gateway; retry shortly.",
                             code="broker_unavailable")  # fmt: skip
