"""The audit trail: every admin action appended to the ``CORTEX_AUDIT`` stream, with who and when.

``nats stream view CORTEX_AUDIT`` (or ``nats sub 'cortex.audit.>'``) reads it;
each message is an `AuditEvent` on ``cortex.audit.<action>``.
"""

from __future__ import annotations

import getpass
import socket
import time

from cortex.broker.bus import Bus
from cortex.protocol import codec, names
from cortex.protocol.keys import AuditEvent


def operator() -> str:
    """Who runs this process, as the trail names them: ``login@host``."""
    try:
        login = getpass.getuser()
    except (KeyError, OSError):  # no login name for this uid (a container)
        login = "unknown"
    return f"{login}@{socket.gethostname()}"


async def record(bus: Bus, action: str, target: str, detail: str = "", who: str | None = None) -> None:
    """Append one admin action; raises BrokerUnavailable if the trail cannot take it."""
    event = AuditEvent(action=action, target=target, at=time.time(), who=who or operator(), detail=detail)
    await bus.append_record(names.audit_subject(action), codec.encode(event))
