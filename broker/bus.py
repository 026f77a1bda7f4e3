"""The narrow verbs the gateway, the worker and cortexctl use to talk to NATS.

`Bus` owns one connection and its JetStream context. nats-py exceptions are
translated into `cortex.broker.errors` here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import APIError, KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError, NoStreamResponseError
from nats.js.kv import KeyValue

from cortex.broker import lockdown, provision
from cortex.broker.access import Access
from cortex.broker.catalogues import Catalogues, HeldAdverts
from cortex.broker.connection import Link, connect
from cortex.broker.errors import BrokerUnavailable, NotProvisioned, PayloadTooLarge, QueueFull
from cortex.broker.pull import Delivery as Delivery  # re-exported: the worker's modules take both from here
from cortex.broker.pull import PullQueue
from cortex.broker.watch import KV_DELETE_OPS, FleetHandler, Watch
from cortex.protocol import catalogues, names

log = logging.getLogger("cortex.broker")

# JetStream API error codes (nats-server errors.json) that mean "queue full".
_QUEUE_FULL_CODES = frozenset({10077, 10054, 10026})
# ... and "wrong last sequence" (JSStreamWrongLastSequenceErrF, ...ConstantErr): a compare-and-set lost.
# nats-py's KV raises KeyWrongLastSequenceError for them; a plain APIError carrying one (another nats-py,
# another path) is the same lost race. Matched by code: the description text is no API.
_WRONG_LAST_SEQUENCE_CODES = frozenset({10071, 10164})
_CLUSTER_FORMING_CODES = frozenset({10005, 10008})
"""JSClusterNoPeersErrF ("no suitable peers for placement"), JSClusterNotAvailErr: a cluster still forming."""
PROVISION_PATIENCE_S = 30.0
"""How long a process starting with a cluster that is still forming waits for it to place three copies."""
_NO_MESSAGE_CODE = 10037  # JSNoMessageFoundErr: the sequence asked for is not (or no longer) in the stream

ReplyHandler = Callable[[str, bytes], None]


@dataclass(frozen=True)
class FleetWatch:
    """A watch of the fleet's adverts and heartbeats, as `Bus.watch_fleet` started it (`Bus.unwatch_fleet` stops it)."""

    held: HeldAdverts
    watches: tuple[Watch, ...]

    async def caught_up(self, timeout: float) -> bool:
        """Wait until the watch has brought the fleet as it was when it began, every advert's catalogue read (False
        if that took longer than `timeout`): a view taken earlier is missing workers that are alive."""
        try:
            async with asyncio.timeout(timeout):
                for watch in self.watches:
                    await watch.caught_up.wait()
                await self.held.none_held.wait()
        except TimeoutError:
            return False
        return True


class Bus:
    """A NATS connection with Cortex's objects provisioned.

    ::

        bus = await Bus.open("nats://127.0.0.1:4222", name="cortex-gateway")
        await bus.publish_request("m", b"...", msg_id="req-1")
        await bus.close()
    """

    def __init__(self, nc: NATS, js: JetStreamContext, buckets: provision.Buckets, link: Link | None = None) -> None:
        self._nc = nc
        self._js = js
        self._link = link or Link()
        self._fleet = buckets.fleet
        self._responses = buckets.responses
        self._placement = buckets.placement
        self._alive = buckets.alive
        self._keys = buckets.keys
        self._limits = buckets.limits
        self.catalogues = Catalogues(buckets.catalogues)
        """The catalogues adverts name by digest, read into `cortex.protocol.catalogues.CACHE` (`read_fleet`,
        `watch_fleet`)."""
        self._catalogue_bucket = buckets.catalogues
        self._watches: list[Watch] = []
        self._held: list[HeldAdverts] = []

    @classmethod
    async def open(cls, url: str, *, name: str, access: Access | None = None) -> Bus:
        """Connect as `access` (default: `Access.from_env`) and provision; as a user, on a locked-down broker, only
        find what the admin provisioned (`cortex.broker.lockdown`)."""
        access = access if access is not None else Access.from_env()
        link = Link()
        nc = await connect(url, name=name, link=link, access=access)
        js = nc.jetstream(timeout=5.0)
        try:
            if access.user is not None:
                buckets = await lockdown.attach(nc, js)
            else:
                buckets = await _provision_patiently(js, provision.replicas_for(nc))
        except NotProvisioned:
            await nc.close()
            raise
        except Exception as exc:
            await nc.close()
            raise BrokerUnavailable(f"cannot provision JetStream at {url} (is JetStream enabled?): {exc}") from exc
        return cls(nc, js, buckets, link)

    @property
    def connected(self) -> bool:
        return bool(self._nc.is_connected)

    @property
    def reconnects(self) -> int:
        """How many times the connection has come back after a break."""
        return self._link.reconnects

    def settling(self) -> bool:
        """Whether this process's view of the fleet may be stale: the connection is down, or a watch is being made
        again or was, less than `watch.SETTLE_S` ago (after a reconnect, or its consumer lost; `cortex.broker.watch`).

        While cut off, a process hears no heartbeats, though the workers go on
        writing them (or cannot write them either): every worker seems gone. Until
        this is False again, no worker should be judged dead by its silence, nor any
        placement decided from the view. Not after the first connection: what the
        watches bring then is all there is to know.
        """
        if not self.connected:
            return True
        now = time.monotonic()
        return any(watch.settling(now) for watch in self._watches)

    def cut_off(self) -> bool:
        """Whether this process has no view of the fleet to answer from: the connection is down, or a watch is being
        made again or was, less than `watch.SETTLE_S` ago.

        Narrower than `settling`: a watch whose probe was merely slow (this process's own event loop lagging
        under load, as often as a slow broker) keeps its view, so requests may still be routed by it.
        """
        if not self.connected:
            return True
        now = time.monotonic()
        return any(watch.lost(now) for watch in self._watches)

    @property
    def max_payload(self) -> int:
        return int(self._nc.max_payload)

    async def close(self) -> None:
        for held in self._held:
            held.stop()
        for watch in self._watches:
            await watch.stop()
        try:
            await self._nc.drain()
        except Exception as exc:
            log.debug("drain: %s", exc)
            await self._nc.close()

    # -- requests -----------------------------------------------------------

    async def publish_request(self, model: str, payload: bytes, *, msg_id: str, worker: str = "") -> int:
        """Queue a request durably and return its sequence in the stream; raises QueueFull, PayloadTooLarge or
        BrokerUnavailable. With `worker`, on that worker's affine subject of `model` (it takes it first)."""
        if len(payload) > self.max_payload:
            raise PayloadTooLarge(f"request is {len(payload)} bytes; the broker accepts at most {self.max_payload}")
        subject = names.affine_subject(model, worker) if worker else names.request_subject(model)
        try:
            ack = await self._js.publish(subject, payload, headers={"Nats-Msg-Id": msg_id})
        except APIError as exc:
            if exc.err_code in _QUEUE_FULL_CODES:
                raise QueueFull(f"the request queue for {model} is full") from exc
            raise BrokerUnavailable(f"JetStream refused the request: {exc.description}") from exc
        except NoStreamResponseError as exc:
            raise NotProvisioned(f"stream {names.REQUEST_STREAM} is missing") from exc
        except nats.errors.MaxPayloadError as exc:
            raise PayloadTooLarge(str(exc)) from exc
        except (nats.errors.Error, TimeoutError) as exc:  # timeout, closed, draining, buffer full...
            raise BrokerUnavailable(f"broker did not accept the request: {exc!r}") from exc
        return int(ack.seq)

    async def request_settled(self, seq: int) -> bool:
        """Whether the request at `seq` has left the stream: a worker acked it (its final chunk is out) or termed it.

        The request stream is a work queue: a message stays there, delivered or not,
        until a worker settles it for good; a nak leaves it.
        """
        try:
            await self._js.get_msg(names.REQUEST_STREAM, seq)
        except APIError as exc:
            if exc.err_code == _NO_MESSAGE_CODE:
                return True
            raise BrokerUnavailable(f"cannot look up request {seq}: {exc.description}") from exc
        except (nats.errors.Error, TimeoutError) as exc:
            raise BrokerUnavailable(f"cannot look up request {seq}: {exc!r}") from exc
        return False

    async def drop_request(self, seq: int) -> None:
        """Delete the request at `seq` from the stream, if it is still there (an affine request its gateway sent
        elsewhere: its worker left). Best effort: a copy left behind is cancelled, and never answered twice."""
        try:
            await self._js.delete_msg(names.REQUEST_STREAM, seq)
        except APIError as exc:
            if exc.err_code != _NO_MESSAGE_CODE:
                log.info("request %d not deleted: %s", seq, exc.description)
        except (nats.errors.Error, TimeoutError) as exc:
            log.info("request %d not deleted: %r", seq, exc)

    async def queued_seqs(self, model: str, limit: int) -> list[int]:
        """The stream sequences of the first `limit` requests for `model` still in the stream, waiting or running (a
        work queue keeps a request until it is settled), on its shared subject and on every worker's affine one,
        oldest first: one lookup each (a lookup brings the message whole: `queued_requests`, its bodies left)."""
        return [seq for seq, _ in await self.queued_requests(model, limit)]

    async def pull_queue(self, model: str, worker_id: str = "") -> PullQueue:
        """The model's shared consumer, and with `worker_id` that worker's affine consumer of it too if it can be
        made now (else the pull loop tries again: `PullQueue.ensure_affine`)."""
        try:
            durable = await provision.ensure_model_consumer(self._js, model)
            pull = await PullQueue.bind(self._nc, self._js, model, durable, worker_id, lambda: self.reconnects)
        except Exception as exc:
            raise BrokerUnavailable(f"cannot bind the consumer for {model}: {exc!r}") from exc
        await pull.ensure_affine()
        return pull

    # -- core messages ------------------------------------------------------

    async def publish(self, subject: str, payload: bytes) -> None:
        try:
            await self._nc.publish(subject, payload)
        except nats.errors.Error as exc:  # closed, draining, buffer full, bad subject...
            raise BrokerUnavailable(f"publish to {subject!r} failed: {exc!r}") from exc

    async def subscribe(self, subject: str, handler: ReplyHandler) -> Subscription:
        """Subscribe with a synchronous handler of (subject, payload)."""

        async def on_msg(msg: Msg) -> None:
            handler(msg.subject, msg.data)

        return await self._nc.subscribe(subject, cb=on_msg, pending_msgs_limit=1_000_000, pending_bytes_limit=-1)

    # -- fleet bucket -------------------------------------------------------

    async def put_advert(self, key: str, value: bytes) -> None:
        try:
            await self._fleet.put(key, value)
        except Exception as exc:
            raise BrokerUnavailable(f"cannot write {key}: {exc}") from exc

    async def delete_advert(self, key: str) -> None:
        try:
            await self._fleet.delete(key)
        except Exception as exc:
            raise BrokerUnavailable(f"cannot delete {key}: {exc}") from exc

    async def put_catalogue(self, key: str, value: bytes) -> None:
        """Write a catalogue under its digest's key (`names.catalogue_key`) in the catalogue bucket."""
        try:
            await self._catalogue_bucket.put(key, value)
        except Exception as exc:
            raise BrokerUnavailable(f"cannot write {key}: {exc}") from exc

    # -- heartbeat bucket ---------------------------------------------------

    async def put_heartbeat(self, key: str, value: bytes) -> None:
        """Rewrite a heartbeat; it expires by itself `names.HEARTBEAT_TTL_S` later, leaving a marker."""
        try:
            await self._js.publish(f"$KV.{names.ALIVE_BUCKET}.{key}", value, timeout=names.HEARTBEAT_TTL_S,
                                   msg_ttl=names.HEARTBEAT_TTL_S)  # fmt: skip
        except (nats.errors.Error, TimeoutError) as exc:
            raise BrokerUnavailable(f"cannot write {key}: {exc!r}") from exc

    async def withdraw_heartbeat(self, key: str) -> None:
        """Purge a heartbeat now (a clean stop); the purge marker says "gone" for `names.HEARTBEAT_GONE_S`."""
        try:
            await self._alive.purge(key, msg_ttl=names.HEARTBEAT_GONE_S)
        except Exception as exc:
            raise BrokerUnavailable(f"cannot withdraw {key}: {exc}") from exc

    async def read_heartbeats(self) -> dict[str, bytes | None]:
        """Every key of the heartbeat bucket: its value, or None while the marker of a gone heartbeat stands."""
        return await self._read_all(self._alive, names.ALIVE_BUCKET)

    # -- responses bucket ---------------------------------------------------

    async def put_stored(self, key: str, value: bytes) -> None:
        """Keep a stored response (``cortex-responses`` bucket, expires by TTL)."""
        try:
            await self._responses.put(key, value)
        except Exception as exc:
            raise BrokerUnavailable(f"cannot store {key}: {exc}") from exc

    async def get_stored(self, key: str) -> bytes | None:
        """A stored response, or None if there is none (never stored, deleted, expired)."""
        try:
            entry = await self._responses.get(key)
        except (KeyNotFoundError, KeyDeletedError):
            return None
        except Exception as exc:
            raise BrokerUnavailable(f"cannot read {key}: {exc}") from exc
        return entry.value

    async def delete_stored(self, key: str) -> None:
        try:
            await self._responses.delete(key)
        except Exception as exc:
            raise BrokerUnavailable(f"cannot delete {key}: {exc}") from exc

    # -- placement bucket ---------------------------------------------------

    async def read_decision(self, key: str) -> tuple[bytes | None, int]:
        """A placement-bucket value and its revision (None and 0 when absent)."""
        return await _read_revision(self._placement, key)

    async def put_decision(self, key: str, value: bytes) -> None:
        """Write a decision whatever it was (a pin or a drain flag does not depend on the old value)."""
        try:
            await self._placement.put(key, value)
        except Exception as exc:
            raise BrokerUnavailable(f"cannot write {key}: {exc}") from exc

    async def write_decision(self, key: str, value: bytes, revision: int) -> bool:
        """Compare-and-set: write only if the key is still at `revision` (0: absent); False if someone else won."""
        return bool(await _compare_and_set(self._placement, key, value, revision))

    async def swap_decision(self, key: str, value: bytes, revision: int) -> int:
        """`write_decision`, returning the revision written (0 if someone else won), for a writer that goes on
        rewriting its own key (the keeper's lease)."""
        return await _compare_and_set(self._placement, key, value, revision)

    async def delete_decision(self, key: str, *, revision: int = 0) -> bool:
        """Delete a decision; with `revision`, only while the key is still at it (False: someone else wrote it)."""
        try:
            await self._placement.delete(key, last=revision or None)
        except Exception as exc:
            if _lost_race(exc):
                return False
            raise BrokerUnavailable(f"cannot delete {key}: {exc}") from exc
        return True

    async def read_decisions(self) -> dict[str, bytes]:
        """Every key of the placement bucket and its value."""
        return _present(await self._read_all(self._placement, names.PLACEMENT_BUCKET))

    async def watch_decisions(self, handler: FleetHandler) -> None:
        """Start calling `handler` for every change of the placement bucket, in the background."""
        await self._watch(names.PLACEMENT_BUCKET, self._placement, handler)

    # -- keys, limits, usage and audit ----------------------------------------

    async def read_keys(self) -> dict[str, bytes]:
        """Every API key (``keys.<name>`` -> an encoded `ApiKey`)."""
        return _present(await self._read_all(self._keys, names.KEYS_BUCKET))

    async def keys_ever_written(self) -> bool:
        """Whether the keys bucket holds a key or the marker of a revoked one (a purge of its stream clears both)."""
        try:
            info = await self._js.stream_info(f"KV_{names.KEYS_BUCKET}")
        except (nats.errors.Error, TimeoutError, APIError) as exc:
            raise BrokerUnavailable(f"cannot read the {names.KEYS_BUCKET} bucket: {exc!r}") from exc
        return bool(info.state.messages)

    async def watch_keys(self, handler: FleetHandler) -> None:
        """Start calling `handler` for every change of the keys bucket (a revoked key comes as (key, None))."""
        await self._watch(names.KEYS_BUCKET, self._keys, handler)

    async def read_key(self, key: str) -> tuple[bytes | None, int]:
        return await _read_revision(self._keys, key)

    async def write_key(self, key: str, value: bytes, revision: int) -> bool:
        """Compare-and-set an API key (0: only if there is none by that name)."""
        return bool(await _compare_and_set(self._keys, key, value, revision))

    async def delete_key(self, key: str) -> None:
        try:
            await self._keys.delete(key)
        except Exception as exc:
            raise BrokerUnavailable(f"cannot delete {key}: {exc}") from exc

    async def read_limit(self, key: str) -> tuple[bytes | None, int]:
        """A key's rate-limit window and its revision (None and 0 when it has none)."""
        return await _read_revision(self._limits, key)

    async def write_limit(self, key: str, value: bytes, revision: int) -> bool:
        """Compare-and-set a key's rate-limit window; False if another gateway wrote it first."""
        return bool(await _compare_and_set(self._limits, key, value, revision))

    async def append_record(self, subject: str, payload: bytes) -> None:
        """Append a usage record or an audit event to its stream (durably: JetStream acknowledges it)."""
        try:
            await self._js.publish(subject, payload)
        except (nats.errors.Error, TimeoutError, APIError) as exc:
            raise BrokerUnavailable(f"cannot append to {subject}: {exc!r}") from exc

    async def read_records(self, stream: str, subject: str, since: float) -> list[bytes]:
        """Every record of `stream` on `subject` (wildcards allowed) stored at or after `since` (Unix seconds)."""
        start = datetime.fromtimestamp(max(since, 0.0), UTC)
        config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=start,
                                ack_policy=AckPolicy.NONE, inactive_threshold=30.0)  # fmt: skip
        out: list[bytes] = []
        try:
            sub = await self._js.pull_subscribe(subject, stream=stream, config=config)
            try:
                while True:
                    try:
                        batch = await sub.fetch(1000, timeout=1.0)
                    except TimeoutError:
                        break  # nothing (more) since `since`
                    out += [msg.data for msg in batch]
                    if batch[-1].metadata.num_pending == 0:
                        break
            finally:
                await sub.unsubscribe()
        except (nats.errors.Error, APIError) as exc:
            raise BrokerUnavailable(f"cannot read {stream}: {exc!r}") from exc
        return out

    async def read_fleet(self) -> dict[str, bytes]:
        """Every live key of the fleet bucket and its value, with the catalogues its adverts name read into
        `cortex.protocol.catalogues.CACHE` (so `codec.decode_advert` fills them in; one that cannot be read is
        logged, and its adverts decode with an empty catalogue)."""
        fleet = _present(await self._read_all(self._fleet, names.FLEET_BUCKET))
        digests = [catalogues.digest_of_advert(v) for k, v in fleet.items() if names.is_worker_key(k)]
        for digest, why in (await self.catalogues.fetch_all(digests)).items():
            log.warning("catalogue %s %s: the adverts naming it show no catalogue", digest, why)
        return fleet

    async def _read_all(self, bucket: KeyValue, bucket_name: str) -> dict[str, bytes | None]:
        """A snapshot of a bucket: the stream's subjects, then every key's latest value in one pass.

        The pass is a KV watch (an ordered consumer delivering the last value per key) read up to its "initial
        values done" mark. That mark can come early while keys are being rewritten (adverts are, every few seconds):
        a key the subjects listed and the pass did not bring is then read by itself. A key whose latest entry is a
        delete, purge or expiry marker reads as None.
        """
        prefix = f"$KV.{bucket_name}."
        try:
            info = await self._js.stream_info(f"KV_{bucket_name}", subjects_filter=f"{prefix}>")
            listed = [subject[len(prefix) :] for subject in info.state.subjects or {}]
            out = await _last_values(bucket, len(listed)) if listed else {}
            missed = [key for key in listed if key not in out]
            values = await asyncio.gather(*(_latest_value(bucket, key) for key in missed))
        except (nats.errors.Error, TimeoutError) as exc:
            raise BrokerUnavailable(f"cannot read the {bucket_name} bucket: {exc!r}") from exc
        out.update(zip(missed, values, strict=True))
        return out

    async def watch_fleet(self, handler: FleetHandler) -> FleetWatch:
        """Start calling `handler` for every change of the fleet, in the background: its adverts and heartbeats.

        Advert keys (``workers.*``, bucket ``cortex-fleet``) and heartbeat keys
        (``alive.*``, bucket ``cortex-alive``) come to the same handler; a
        heartbeat that expired or was withdrawn comes as (key, None).
        `cortex.protocol.liveness.LiveFleet` takes both.

        Adverts that name a catalogue this process has not read yet are held until it is
        (`cortex.broker.catalogues.HeldAdverts`), so `codec.decode_advert` always fills in a catalogue.
        """
        held = HeldAdverts(self.catalogues, handler)
        self._held.append(held)
        made: list[Watch] = []
        try:
            made.append(await self._watch(names.FLEET_BUCKET, self._fleet, held.on_change))
            made.append(await self._watch(names.ALIVE_BUCKET, self._alive, handler))
        except BaseException:
            await self.unwatch_fleet(FleetWatch(held, tuple(made)))  # all or nothing
            raise
        return FleetWatch(held, tuple(made))

    async def unwatch_fleet(self, watch: FleetWatch) -> None:
        """Stop a watch `watch_fleet` started: its handler is called no more."""
        # The watches first: one still feeding the held adverts could start a catalogue read after they stopped.
        for one in watch.watches:
            self._watches.remove(one)
            await one.stop()
        watch.held.stop()
        self._held.remove(watch.held)

    async def _watch(self, bucket_name: str, bucket: KeyValue, handler: FleetHandler) -> Watch:
        watch = Watch(self._js, bucket_name, bucket, handler, f"{bucket_name}-watch", self._link)
        await watch.start()
        self._watches.append(watch)
        return watch

    async def queued_requests(self, model: str, limit: int) -> list[tuple[int, bytes]]:
        """The first `limit` requests for `model` still in the stream, as `queued_seqs` finds them, with their bodies:
        (sequence, payload), oldest first.

        Direct gets, which no consumer sees: looking never counts as a delivery. A
        worker loading the model asks this way whether anyone still waits for it
        (`cortex.worker.load_watch`).
        """
        shared = await self._subject_requests(model, names.request_subject(model), limit)
        affine = await self._subject_requests(model, names.affine_wildcard(model), limit)
        return sorted(shared + affine, key=lambda queued: queued[0])[:limit]

    async def _subject_requests(self, model: str, subject: str, limit: int) -> list[tuple[int, bytes]]:
        cursor, found = 1, list[tuple[int, bytes]]()
        while len(found) < limit:
            try:
                msg = await self._js.get_msg(names.REQUEST_STREAM, seq=cursor, subject=subject, next=True)
            except APIError as exc:
                if exc.err_code == _NO_MESSAGE_CODE:
                    break
                raise BrokerUnavailable(f"cannot look up the queue of {model}: {exc.description}") from exc
            except (nats.errors.Error, TimeoutError) as exc:
                raise BrokerUnavailable(f"cannot look up the queue of {model}: {exc!r}") from exc
            if msg.seq is None:
                break
            found.append((msg.seq, msg.data or b""))
            cursor = msg.seq + 1
        return found


async def _provision_patiently(js: JetStreamContext, replicas: int) -> provision.Buckets:
    """`provision.ensure_all`, tried again for a while when a cluster that is still forming cannot place copies."""
    give_up = time.monotonic() + PROVISION_PATIENCE_S
    while True:
        try:
            return await provision.ensure_all(js, replicas)
        except APIError as exc:
            if exc.err_code not in _CLUSTER_FORMING_CODES or time.monotonic() >= give_up:
                raise
            log.info("JetStream cannot place %d copies yet (%s); trying again", replicas, exc.description)
            await asyncio.sleep(0.5)


async def _compare_and_set(bucket: KeyValue, key: str, value: bytes, revision: int) -> int:
    """Write `key` only if it is still at `revision` (0: absent): the new revision, 0 if someone else wrote first."""
    try:
        if revision:
            return int(await bucket.update(key, value, last=revision))
        return int(await bucket.create(key, value))
    except Exception as exc:
        if _lost_race(exc):
            return 0
        raise BrokerUnavailable(f"cannot write {key}: {exc}") from exc


def _lost_race(exc: Exception) -> bool:
    """Whether a write or delete at a revision failed because someone else wrote the key first."""
    if isinstance(exc, KeyWrongLastSequenceError):
        return True
    # nats-py's other KV errors (KeyDeletedError...) are APIErrors that never set err_code.
    return isinstance(exc, APIError) and getattr(exc, "err_code", None) in _WRONG_LAST_SEQUENCE_CODES


async def _read_revision(bucket: KeyValue, key: str) -> tuple[bytes | None, int]:
    """A key's value and revision (None and 0 when absent)."""
    try:
        entry = await bucket.get(key)
    except (KeyNotFoundError, KeyDeletedError):
        return None, 0
    except Exception as exc:
        raise BrokerUnavailable(f"cannot read {key}: {exc}") from exc
    return entry.value, int(entry.revision or 0)


def _present(snapshot: dict[str, bytes | None]) -> dict[str, bytes]:
    """The keys of a snapshot that have a value."""
    return {key: value for key, value in snapshot.items() if value}


SNAPSHOT_TIMEOUT_S = 10.0
"""A one-pass read of a bucket that has not reached its "initial values done" mark by then keeps what it has (and
reads the keys it is missing one by one)."""


async def _last_values(bucket: KeyValue, listed: int) -> dict[str, bytes | None]:
    """Every key's latest value as one KV watch delivers them, up to its "initial values done" mark (the bucket's
    subjects listed `listed` keys just before)."""
    out: dict[str, bytes | None] = {}
    marked_early = False
    watcher = await bucket.watchall()
    try:
        async with asyncio.timeout(SNAPSHOT_TIMEOUT_S):
            async for entry in watcher:
                if entry is None:
                    if out:
                        break
                    # nats-py marks the end at once when its consumer info says nothing is pending and nothing has
                    # been received yet, which the first deliveries can race (about one pass in 60 here): every
                    # key would then be read by itself. The pass goes on until the keys listed are in.
                    marked_early = True
                    continue
                out[entry.key] = None if entry.operation in KV_DELETE_OPS else (entry.value or None)
                if marked_early and len(out) >= listed:
                    break
    except TimeoutError:
        log.info("a read of bucket %s did not finish in one pass; reading the rest key by key", bucket._name)
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()  # type: ignore[no-untyped-call]  # nats-py leaves it unannotated
    return out


async def _latest_value(bucket: KeyValue, key: str) -> bytes | None:
    """The key's value; None once deleted, purged or expired (a marker has no value)."""
    try:
        entry = await bucket.get(key, validate_keys=False)
    except KeyNotFoundError:  # deleted or purged since the subjects were listed, too
        return None
    return entry.value or None
