"""The broker codec: one JSON encoder and one typed decoder per message kind.

JSON (not MessagePack) keeps every stream and bucket readable with the ``nats``
CLI; msgspec's JSON is fast enough that the encoding is not the bottleneck.
Encoders and decoders are created once and reused, as msgspec recommends.
"""

from __future__ import annotations

import msgspec

from cortex.protocol import catalogues
from cortex.protocol.heartbeat import Heartbeat
from cortex.protocol.keys import ApiKey, AuditEvent, LimitWindow, UsageRecord
from cortex.protocol.messages import Chunk, Drain, GenerateRequest, Keeper, Pin, Placement, Taken, WorkerAdvert

_encoder = msgspec.json.Encoder()
_request_decoder = msgspec.json.Decoder(GenerateRequest)
_chunk_decoder = msgspec.json.Decoder(Chunk)
_advert_decoder = msgspec.json.Decoder(WorkerAdvert)
_placement_decoder = msgspec.json.Decoder(Placement)
_pin_decoder = msgspec.json.Decoder(Pin)
_drain_decoder = msgspec.json.Decoder(Drain)
_keeper_decoder = msgspec.json.Decoder(Keeper)
_heartbeat_decoder = msgspec.json.Decoder(Heartbeat)
_api_key_decoder = msgspec.json.Decoder(ApiKey)
_limit_window_decoder = msgspec.json.Decoder(LimitWindow)
_usage_decoder = msgspec.json.Decoder(UsageRecord)
_audit_decoder = msgspec.json.Decoder(AuditEvent)
_taken_decoder = msgspec.json.Decoder(Taken)

DecodeError = msgspec.DecodeError
"""Raised by every ``decode_*`` function on a malformed or mistyped message."""


Encodable = (
    GenerateRequest
    | Chunk
    | WorkerAdvert
    | Placement
    | Pin
    | Drain
    | Keeper
    | Heartbeat
    | ApiKey
    | LimitWindow
    | UsageRecord
    | AuditEvent
    | Taken
)


def encode(message: Encodable) -> bytes:
    return _encoder.encode(message)


def decode_request(data: bytes) -> GenerateRequest:
    return _request_decoder.decode(data)


def decode_chunk(data: bytes) -> Chunk:
    return _chunk_decoder.decode(data)


def decode_advert(data: bytes) -> WorkerAdvert:
    """An advert, its catalogue filled in from this process's `catalogues.CACHE` when it names one by digest (the
    broker side fetches a digest before it hands on the advert; one it could not fetch stays empty)."""
    return catalogues.CACHE.resolve(_advert_decoder.decode(data))


def decode_placement(data: bytes) -> Placement:
    return _placement_decoder.decode(data)


def decode_pin(data: bytes) -> Pin:
    return _pin_decoder.decode(data)


def decode_drain(data: bytes) -> Drain:
    return _drain_decoder.decode(data)


def decode_keeper(data: bytes) -> Keeper:
    return _keeper_decoder.decode(data)


def decode_heartbeat(data: bytes) -> Heartbeat:
    return _heartbeat_decoder.decode(data)


def decode_api_key(data: bytes) -> ApiKey:
    return _api_key_decoder.decode(data)


def decode_limit_window(data: bytes) -> LimitWindow:
    return _limit_window_decoder.decode(data)


def decode_usage(data: bytes) -> UsageRecord:
    return _usage_decoder.decode(data)


def decode_audit(data: bytes) -> AuditEvent:
    return _audit_decoder.decode(data)


def decode_taken(data: bytes) -> Taken:
    return _taken_decoder.decode(data)
