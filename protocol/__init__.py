"""Cortex wire protocol: msgspec Structs, subject and bucket names, the codec.

Nothing in this package performs I/O or imports nats, asyncio or torch, so every
component (gateway, worker, cortexctl) can import it cheaply.
"""

from __future__ import annotations

from cortex.protocol.messages import (
    Chunk,
    ChunkError,
    Drain,
    GenerateRequest,
    Keeper,
    Message,
    ModelCard,
    ModelState,
    Pin,
    Placement,
    Reasoning,
    ResponseFormat,
    Sampling,
    TokenLogprob,
    Tool,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    TopLogprob,
    Usage,
    WorkerAdvert,
)
from cortex.protocol.names import (
    FLEET_BUCKET,
    REQUEST_STREAM,
    cancel_subject,
    consumer_name,
    decode_model_token,
    encode_model_token,
    reply_subject,
    reply_wildcard,
    request_subject,
    request_subject_wildcard,
    worker_key,
)

__all__ = [
    "FLEET_BUCKET",
    "REQUEST_STREAM",
    "Chunk",
    "ChunkError",
    "Drain",
    "GenerateRequest",
    "Keeper",
    "Message",
    "ModelCard",
    "ModelState",
    "Pin",
    "Placement",
    "Reasoning",
    "ResponseFormat",
    "Sampling",
    "TokenLogprob",
    "Tool",
    "ToolCall",
    "ToolCallDelta",
    "ToolChoice",
    "TopLogprob",
    "Usage",
    "WorkerAdvert",
    "cancel_subject",
    "consumer_name",
    "decode_model_token",
    "encode_model_token",
    "reply_subject",
    "reply_wildcard",
    "request_subject",
    "request_subject_wildcard",
    "worker_key",
]
