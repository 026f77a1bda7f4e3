"""The broker codec: one JSON encoder and one typed decoder per message kind.

JSON (not MessagePack) keeps every stream and bucket readable with the ``nats``
CLI; msgspec's JSON is fast enough that the encoding is not the bottleneck.
Encoders and decoders are created once and reused, as msgspec recommends.
"""

from __future__ import annotations

import msgspec

from cortex.protocol.heartbeat import Heartbeat
from cortex.protocol.messages import Chunk, Drain, GenerateRequest, Pin, Placement, WorkerAdvert

_encoder = msgspec.json.Encoder()
_request_decoder = msgspec.json.Decoder(GenerateRequest)
_chunk_decoder = msgspec.json.Decoder(Chunk)
_advert_decoder = msgspec.json.Decoder(WorkerAdvert)
_placement_decoder = msgspec.json.Decoder(Placement)
_pin_decoder = msgspec.json.Decoder(Pin)
_drain_decoder = msgspec.json.Decoder(Drain)
_heartbeat_decoder = msgspec.json.Decoder(Heartbeat)

DecodeError = msgspec.DecodeError
"""Raised by every ``decode_*`` function on a malformed or mistyped message."""


def encode(message: GenerateRequest | Chunk | WorkerAdvert | Placement | Pin | Drain | Heartbeat) -> bytes:
    return _encoder.encode(message)


def decode_request(data: bytes) -> GenerateRequest:
    return _request_decoder.decode(data)


def decode_chunk(data: bytes) -> Chunk:
    return _chunk_decoder.decode(data)


def decode_advert(data: bytes) -> WorkerAdvert:
    return _advert_decoder.decode(data)


def decode_placement(data: bytes) -> Placement:
    return _placement_decoder.decode(data)


def decode_pin(data: bytes) -> Pin:
    return _pin_decoder.decode(data)


def decode_drain(data: bytes) -> Drain:
    return _drain_decoder.decode(data)


def decode_heartbeat(data: bytes) -> Heartbeat:
    return _heartbeat_decoder.decode(data)
