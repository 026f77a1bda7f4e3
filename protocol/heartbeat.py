"""The heartbeat a worker writes under its key in ``cortex-alive``, every `names.HEARTBEAT_INTERVAL_S`.

Readers go by the key alone (`cortex.protocol.liveness`): a heartbeat counts
while the key has a value and was rewritten within `names.HEARTBEAT_TTL_S`; the
value is there for people and tools (``nats kv get cortex-alive alive.<worker>``).
"""

from __future__ import annotations

import msgspec


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, tag_field="type", tag="heartbeat"):
    """One beat of a worker (the value of ``alive.<worker-id-token>`` in ``cortex-alive``)."""

    worker_id: str
    seq: int = 0
    """Counts from 0 at each start of the worker, so a reset shows a restart."""
    sent_at: float = 0.0
    """The worker's clock (Unix seconds), for people; no reader compares it with its own clock."""
    instance: str = ""
    """Random, new at each start of the worker process; its chunks carry the same (`Chunk.instance`), so a
    gateway can tell that a worker restarted under the same id and will never finish what the old process began."""
