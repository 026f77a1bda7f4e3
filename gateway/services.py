"""What every request handler needs, created once in the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from cortex.broker.bus import Bus
from cortex.gateway.fleet import FleetView
from cortex.gateway.metrics import Metrics
from cortex.gateway.relay import Relay


@dataclass(frozen=True)
class Settings:
    nats_url: str = "nats://127.0.0.1:4222"
    request_timeout: float = 600.0
    """Seconds a request may take, queueing included, before the client gets a 504."""


@dataclass
class Services:
    settings: Settings
    bus: Bus
    relay: Relay
    fleet: FleetView
    metrics: Metrics
