"""Idempotent creation of the stream, consumers and bucket Cortex needs.

Every function may run at every start of every process: it creates what is
missing and brings an existing object's configuration up to date.

Replicas: on a cluster of three or more JetStream servers the request stream and
every bucket are kept on three of them (``num_replicas=3``), so one server may
die, or restart, without losing a queued request, an advert or a placement; on a
single server they have one copy (all a single server allows). The count comes
from the server the process connected to (`replicas_for`). An existing stream or
bucket is scaled up to it, never down: a cluster that has lost a node for now
still means three, and fewer copies is an operator's decision
(``nats stream edit KV_cortex-fleet --replicas 1``). Durable consumers inherit
their stream's count.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DiscardPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from nats.js.errors import BadRequestError, KeyValueLimitMarkerTTLNotSupportedError, NotFoundError
from nats.js.kv import KeyValue

from cortex.broker.errors import BrokerUnavailable, NotProvisioned
from cortex.protocol import names

log = logging.getLogger("cortex.broker")

MAX_QUEUED_PER_MODEL = 10_000
"""Requests waiting per model before new ones are refused (HTTP 429)."""

MAX_REQUEST_BYTES = 8 * 1024 * 1024
DUPLICATE_WINDOW_S = 120.0
ACK_WAIT_S = 30.0
"""A worker that neither acks nor reports progress for this long loses the request to another."""
MAX_DELIVER = 5
USAGE_MAX_AGE_S = 90 * 24 * 3600.0
"""How long usage records are kept."""
AUDIT_MAX_AGE_S = 365 * 24 * 3600.0
"""How long the audit trail is kept."""
RECORDS_MAX_BYTES = 1 << 30
"""Each of the usage and audit streams keeps at most this much, the oldest dropped first."""
CLUSTER_REPLICAS = 3
"""Copies of the stream and of each bucket on a cluster of at least this many servers (else one)."""


@dataclass(frozen=True)
class Buckets:
    """Every KV bucket Cortex uses, provisioned."""

    fleet: KeyValue
    responses: KeyValue
    placement: KeyValue
    alive: KeyValue
    keys: KeyValue
    limits: KeyValue
    catalogues: KeyValue


def cluster_replicas(server_info: Mapping[str, Any]) -> int:
    """`CLUSTER_REPLICAS` when the server's INFO says it is one of a cluster of at least that many, else 1.

    A clustered server names its cluster (``cluster``) and lists every member's
    client URL, its own included (``connect_urls``); a single server has neither.
    """
    if not server_info.get("cluster") or len(server_info.get("connect_urls") or ()) < CLUSTER_REPLICAS:
        return 1
    return CLUSTER_REPLICAS


def replicas_for(nc: NATS) -> int:
    """The replica count for the stream and buckets on the server `nc` is connected to."""
    return cluster_replicas(nc._server_info)  # nats-py keeps the server's INFO only here


def request_stream_config(replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=names.REQUEST_STREAM,
        description="Cortex generation requests: a subject per model, and per model and worker (affinity)",
        subjects=[names.request_subject_wildcard()],
        retention=RetentionPolicy.WORK_QUEUE,
        storage=StorageType.FILE,
        discard=DiscardPolicy.NEW,
        discard_new_per_subject=True,
        max_msgs_per_subject=MAX_QUEUED_PER_MODEL,
        max_msg_size=MAX_REQUEST_BYTES,
        max_age=24 * 3600.0,
        duplicate_window=DUPLICATE_WINDOW_S,
        num_replicas=replicas,
    )


async def ensure_request_stream(js: JetStreamContext, replicas: int = 1) -> None:
    """Create the request stream, or bring an existing one's configuration up to date in place (its subjects too:
    an older ``cortex.req.*`` becomes ``cortex.req.>`` with the affine subjects; queued requests stay)."""
    config = request_stream_config(replicas)
    try:
        info = await js.stream_info(names.REQUEST_STREAM)
    except NotFoundError:
        await js.add_stream(config)
        return
    config.num_replicas = max(replicas, info.config.num_replicas or 1)  # never scaled down here
    await js.update_stream(config)


async def ensure_model_consumer(js: JetStreamContext, model: str) -> str:
    """Create the durable pull consumer for `model`; return its name."""
    durable = names.consumer_name(model)
    config = ConsumerConfig(
        durable_name=durable,
        description=f"workers serving {model}",
        filter_subject=names.request_subject(model),
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ACK_WAIT_S,
        max_deliver=MAX_DELIVER,
        max_ack_pending=-1,
        max_waiting=512,
    )
    try:
        await js.add_consumer(names.REQUEST_STREAM, config)
    except BadRequestError:
        # An existing consumer with an older configuration: keep it (its
        # pending acks live there) rather than failing the worker's start.
        await js.consumer_info(names.REQUEST_STREAM, durable)
    return durable


AFFINE_IDLE_S = 24 * 3600.0
"""An affine consumer whose worker has not pulled from it for this long is deleted by the server (a worker gone for
good); its worker makes it again when it comes back."""


async def ensure_affine_consumer(js: JetStreamContext, model: str, worker_id: str) -> str:
    """Create `worker_id`'s durable pull consumer of its affine subject of `model`; return its name.

    No delivery limit: the worker is its only reader, and a message of it must never
    stay in the stream undeliverable (one that does not decode is termed).
    """
    durable = names.affine_consumer_name(model, worker_id)
    config = ConsumerConfig(
        durable_name=durable,
        description=f"requests for {model} meant for {worker_id} first (conversation affinity)",
        filter_subject=names.affine_subject(model, worker_id),
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ACK_WAIT_S,
        max_deliver=-1,
        max_ack_pending=-1,
        max_waiting=64,
        inactive_threshold=AFFINE_IDLE_S,
    )
    try:
        await js.add_consumer(names.REQUEST_STREAM, config)
    except BadRequestError:
        # An older configuration is kept, as above, but only one that reads the affine subject by pulling: under
        # any other, the requests sent there would wait for nobody.
        info = await js.consumer_info(names.REQUEST_STREAM, durable)
        if info.config.filter_subject != config.filter_subject or info.config.deliver_subject:
            raise NotProvisioned(f"consumer {durable} exists with another filter, or pushes: none to pull") from None
    return durable


async def _ensure_bucket(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    try:
        bucket = await js.key_value(config.bucket)
    except Exception:  # nats-py raises BucketNotFoundError or NotFoundError by version
        return await js.create_key_value(config)
    await _scale_up(js, f"KV_{config.bucket}", config.replicas)
    return bucket


async def _scale_up(js: JetStreamContext, stream: str, replicas: int) -> None:
    """Give a bucket's stream `replicas` copies if it has fewer (nats-py's KV has no update; its stream does)."""
    info = await js.stream_info(stream)
    if (info.config.num_replicas or 1) < replicas:
        log.info("scaling %s up to %d replicas", stream, replicas)
        info.config.num_replicas = replicas
        await js.update_stream(info.config)


async def ensure_fleet_bucket(js: JetStreamContext, replicas: int = 1) -> KeyValue:
    return await _ensure_bucket(
        js,
        KeyValueConfig(
            bucket=names.FLEET_BUCKET, description="Cortex worker adverts (expire by TTL)", history=1,
            ttl=names.ADVERT_TTL_S, storage=StorageType.FILE, replicas=replicas,
        ),
    )  # fmt: skip


async def ensure_responses_bucket(js: JetStreamContext, replicas: int = 1) -> KeyValue:
    return await _ensure_bucket(
        js,
        KeyValueConfig(
            bucket=names.RESPONSES_BUCKET, description="Cortex stored responses (OpenAI Responses API `store`)",
            history=1, ttl=names.RESPONSES_TTL_S, storage=StorageType.FILE, max_value_size=MAX_REQUEST_BYTES,
            replicas=replicas,
        ),
    )  # fmt: skip


async def ensure_placement_bucket(js: JetStreamContext, replicas: int = 1) -> KeyValue:
    return await _ensure_bucket(
        js,
        KeyValueConfig(
            bucket=names.PLACEMENT_BUCKET, description="Cortex placements, pins and drains (kept until changed)",
            history=8, storage=StorageType.FILE, replicas=replicas,
        ),
    )  # fmt: skip


async def ensure_alive_bucket(js: JetStreamContext, replicas: int = 1) -> KeyValue:
    """Heartbeats, each key expiring on its own.

    No bucket TTL: every heartbeat is written with a per-message TTL, and a key
    that expires leaves a marker (``limit_marker_ttl``) that watchers see as a
    purge. Both need nats-server 2.11 or newer. File storage, though nothing in
    it outlives a few seconds: a memory stream is gone after a server restart,
    and every process holding it would write and watch into nothing.
    """
    try:
        return await _ensure_bucket(
            js,
            KeyValueConfig(
                bucket=names.ALIVE_BUCKET, description="Cortex worker heartbeats (each key expires on its own)",
                history=1, storage=StorageType.FILE, limit_marker_ttl=names.HEARTBEAT_GONE_S, replicas=replicas,
            ),
        )  # fmt: skip
    except KeyValueLimitMarkerTTLNotSupportedError as exc:
        raise BrokerUnavailable(f"the {names.ALIVE_BUCKET} bucket needs nats-server 2.11 or newer") from exc


async def ensure_keys_bucket(js: JetStreamContext, replicas: int = 1) -> KeyValue:
    return await _ensure_bucket(
        js,
        KeyValueConfig(
            bucket=names.KEYS_BUCKET, description="Cortex API keys (secrets stored as their SHA-256)", history=4,
            storage=StorageType.FILE, replicas=replicas,
        ),
    )  # fmt: skip


async def ensure_limits_bucket(js: JetStreamContext, replicas: int = 1) -> KeyValue:
    """Each key's rate-limit window. No TTL: a window holds the leases of requests that may run for minutes."""
    return await _ensure_bucket(
        js,
        KeyValueConfig(
            bucket=names.LIMITS_BUCKET, description="Cortex per-key rate-limit windows (compare-and-set)", history=1,
            storage=StorageType.FILE, replicas=replicas,
        ),
    )  # fmt: skip


async def ensure_catalogue_bucket(js: JetStreamContext, replicas: int = 1) -> KeyValue:
    """Worker catalogues under their digests (`cortex.protocol.catalogues`), written once per change.

    A bucket max age (`names.CATALOGUE_MAX_AGE_S`), no per-key TTL: workers write theirs again every
    `names.CATALOGUE_REFRESH_S`, so only the catalogues of workers gone for that long expire; history 1 keeps one
    copy of each (the same digest is the same bytes).
    """
    return await _ensure_bucket(
        js,
        KeyValueConfig(
            bucket=names.CATALOGUE_BUCKET, description="Cortex worker catalogues, by digest (adverts name them)",
            history=1, ttl=names.CATALOGUE_MAX_AGE_S, storage=StorageType.FILE, max_value_size=MAX_REQUEST_BYTES,
            replicas=replicas,
        ),
    )  # fmt: skip


def _record_stream_config(name: str, description: str, subjects: str, max_age: float, replicas: int) -> StreamConfig:
    return StreamConfig(
        name=name, description=description, subjects=[subjects], retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE, discard=DiscardPolicy.OLD, max_age=max_age, max_bytes=RECORDS_MAX_BYTES,
        num_replicas=replicas,
    )  # fmt: skip


async def ensure_record_streams(js: JetStreamContext, replicas: int = 1) -> None:
    """The usage stream (a record per finished request) and the audit stream (a record per admin action)."""
    for config in (
        _record_stream_config(names.USAGE_STREAM, "Cortex usage, one record per finished request, by key",
                              names.usage_wildcard(), USAGE_MAX_AGE_S, replicas),
        _record_stream_config(names.AUDIT_STREAM, "Cortex admin actions: keys, pins, loads, drains",
                              names.audit_wildcard(), AUDIT_MAX_AGE_S, replicas),
    ):  # fmt: skip
        try:
            info = await js.stream_info(config.name or "")
        except NotFoundError:
            await js.add_stream(config)
            continue
        config.num_replicas = max(replicas, info.config.num_replicas or 1)
        await js.update_stream(config)


async def ensure_all(js: JetStreamContext, replicas: int = 1) -> Buckets:
    """The request, usage and audit streams and every bucket, each with `replicas` copies (`replicas_for`)."""
    await ensure_request_stream(js, replicas)
    await ensure_record_streams(js, replicas)
    return Buckets(
        fleet=await ensure_fleet_bucket(js, replicas), responses=await ensure_responses_bucket(js, replicas),
        placement=await ensure_placement_bucket(js, replicas), alive=await ensure_alive_bucket(js, replicas),
        keys=await ensure_keys_bucket(js, replicas), limits=await ensure_limits_bucket(js, replicas),
        catalogues=await ensure_catalogue_bucket(js, replicas),
    )  # fmt: skip
