"""Catalogues out of the advert: written once under their digest, named by it, filled in by every reader.

Real nats-server (the session's), real `Bus` connections and the product's
`Advertiser`; the process's catalogue cache is cleared where a test stands for
a reader that has never read the catalogue (another process).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable

import msgspec
import pytest
import torch

from cortex.broker import bus as bus_module
from cortex.broker.bus import Bus
from cortex.broker.server import EmbeddedNats
from cortex.broker.watch import OWN_TIME_CAP_S, _within_own_time
from cortex.protocol import ModelCard, ModelState, WorkerAdvert, catalogues, codec, names
from cortex.protocol.heartbeat import Heartbeat
from cortex.protocol.liveness import LiveFleet
from cortex.worker import advert as advert_module
from cortex.worker.advert import CATALOGUE_INLINE, Advertiser, WorkerMetrics
from cortex.worker.device import DeviceInfo
from cortex.worker.placements import Placements
from tests.conftest import TINY_MODEL, Gateway, until

SEEN_WITHIN_S = 10.0
CARDS = [ModelCard(id=f"m{i}", aliases=[f"alias-{i}"], memory=i << 20, context_length=4096) for i in range(50)]


def advertiser(bus: Bus, worker_id: str, cards: list[ModelCard], mode: str = "digest",
               older_readers: Callable[[], bool] = lambda: False) -> Advertiser:  # fmt: skip
    cpu = torch.device("cpu")
    return Advertiser(bus=bus, worker_id=worker_id, device=DeviceInfo(cpu, "test", [cpu]), slots=4,
                      memory_budget=1 << 30, eviction="lru", cards=cards, metrics=WorkerMetrics(),
                      draining=asyncio.Event(), busy=lambda: 0, started_at=time.time(),
                      catalogue_mode=mode, older_readers=older_readers)  # fmt: skip


class Reader:
    """A fleet watch into a `LiveFleet`, as gateways and workers keep it."""

    def __init__(self) -> None:
        self.fleet = LiveFleet()

    def on_change(self, key: str, value: bytes | None) -> None:
        self.fleet.on_change(key, value, time.monotonic())

    async def until(self, worker_id: str, check: Callable[[WorkerAdvert], bool]) -> WorkerAdvert:
        deadline = time.monotonic() + SEEN_WITHIN_S
        while True:
            advert = self.fleet.advert(worker_id)
            if advert is not None and check(advert):
                return advert
            assert time.monotonic() < deadline, f"the reader never saw the advert of {worker_id} it waited for"
            await asyncio.sleep(0.02)


def scenario(url: str, body: Callable[[Bus, Bus], Awaitable[None]]) -> None:
    """`body(writer, reader)` on two connections of their own, as a worker and a gateway have."""

    async def run() -> None:
        writer = await Bus.open(url, name="test-catalogue-writer")
        reader = await Bus.open(url, name="test-catalogue-reader")
        try:
            await body(writer, reader)
        finally:
            await reader.close()
            await writer.close()

    asyncio.run(run())


# -- the protocol -----------------------------------------------------------------------


def test_an_advert_names_its_catalogue_by_digest_and_decodes_with_it_filled_in() -> None:
    encoded = catalogues.encode_catalogue(CARDS)
    digest = catalogues.digest(encoded)
    assert digest == catalogues.digest(catalogues.encode_catalogue(list(CARDS)))  # content-addressed
    assert names.catalogue_key(digest) == f"catalogues.{digest}"
    advert = WorkerAdvert(worker_id="w", host="h", device="cpu", catalogue=CARDS, catalogue_digest=digest)
    wire = codec.encode(catalogues.on_the_wire(advert))
    assert b'"catalogue"' not in wire and len(wire) < 200 < len(encoded)
    assert catalogues.digest_of_advert(wire) == digest
    catalogues.CACHE.clear()
    assert codec.decode_advert(wire).catalogue == []  # not read yet: empty, never an error
    catalogues.CACHE.put(digest, catalogues.decode_catalogue(encoded))
    assert codec.decode_advert(wire) == advert


def test_an_inline_advert_decodes_as_before() -> None:
    advert = WorkerAdvert(worker_id="w", host="h", device="cpu", catalogue=CARDS[:3])
    wire = codec.encode(advert)
    assert b"catalogue_digest" not in wire and catalogues.digest_of_advert(wire) == ""
    assert codec.decode_advert(wire) == advert
    older = msgspec.json.decode(wire)  # an advert from a worker older than digests (no such field at all)
    assert codec.decode_advert(msgspec.json.encode(older)).catalogue == CARDS[:3]


def test_a_probe_waits_out_its_own_event_loop_being_late() -> None:
    async def run() -> None:
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        loop.call_later(0.3, time.sleep, 1.0)  # this process's loop blocked for 1 s: not the broker's fault
        loop.call_later(1.5, answer.set_result, "here")
        assert await _within_own_time(answer, 0.8) == "here"
        never = loop.create_future()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await _within_own_time(never, 0.5)
        assert never.cancelled()
        # It gave up by its own timeout, not by the cap on every wait (generous: a loaded machine's loop runs late).
        assert time.monotonic() - started < OWN_TIME_CAP_S / 2

    asyncio.run(run())


# -- through the broker ---------------------------------------------------------------------


def test_a_workers_advert_carries_the_digest_and_readers_see_its_catalogue(nats_server: EmbeddedNats) -> None:
    worker_id = f"cat-{uuid.uuid4().hex[:8]}"

    async def body(writer: Bus, reader: Bus) -> None:
        ad = advertiser(writer, worker_id, list(CARDS))
        catalogues.CACHE.clear()  # the reader has never read this catalogue
        seen = Reader()
        await reader.watch_fleet(seen.on_change)
        await ad.publish([ModelState(id="m1", state="ready")])
        catalogues.CACHE.clear()  # nor has cortexctl
        raw = (await reader.read_fleet())[names.worker_key(worker_id)]
        assert b'"catalogue"' not in raw and len(raw) < 1000
        digest = catalogues.digest_of_advert(raw)
        assert digest and codec.decode_advert(raw).catalogue == CARDS  # read_fleet fetched it
        stored = await reader._catalogue_bucket.get(names.catalogue_key(digest))
        assert stored.value == catalogues.encode_catalogue(CARDS)
        live = await seen.until(worker_id, lambda a: bool(a.catalogue))
        assert live.catalogue == CARDS and live.card("m7") == CARDS[7]

        # a changed catalogue: a new digest, written before the advert naming it
        changed = [*CARDS[:10], ModelCard(id="new-model", memory=1 << 20)]
        ad.cards = changed
        await ad.publish([])
        live = await seen.until(worker_id, lambda a: a.card("new-model") is not None)
        assert live.catalogue == changed and live.catalogue_digest != digest
        await ad.withdraw()

    scenario(nats_server.url, body)


def test_an_advert_whose_catalogue_is_not_there_yet_waits_for_it(nats_server: EmbeddedNats) -> None:
    worker_id = f"cat-{uuid.uuid4().hex[:8]}"
    cards = [ModelCard(id=f"late-{uuid.uuid4().hex[:6]}")]

    async def body(writer: Bus, reader: Bus) -> None:
        encoded = catalogues.encode_catalogue(cards)
        digest = catalogues.digest(encoded)
        advert = WorkerAdvert(worker_id=worker_id, host="h", device="cpu", catalogue_digest=digest)
        catalogues.CACHE.clear()
        seen, other = Reader(), f"cat-{uuid.uuid4().hex[:8]}"
        await reader.watch_fleet(seen.on_change)
        await writer.put_advert(names.worker_key(worker_id), codec.encode(advert))
        await writer.put_advert(names.worker_key(other), codec.encode(WorkerAdvert(worker_id=other, host="h",
                                                                                  device="cpu")))  # fmt: skip
        await seen.until(other, lambda a: True)  # other workers' adverts are not held up
        # Written before the other's, on the same stream: its advert has come, and is held, never shown as a
        # worker with no models.
        assert seen.fleet.advert(worker_id) is None
        await writer.put_catalogue(names.catalogue_key(digest), encoded)
        assert (await seen.until(worker_id, lambda a: True)).catalogue == cards
        for key in (names.worker_key(worker_id), names.worker_key(other)):
            await writer.delete_advert(key)

    scenario(nats_server.url, body)


def test_an_inline_worker_and_an_old_style_advert_still_work(nats_server: EmbeddedNats) -> None:
    worker_id, old = f"cat-{uuid.uuid4().hex[:8]}", f"cat-{uuid.uuid4().hex[:8]}"

    async def body(writer: Bus, reader: Bus) -> None:
        catalogues.CACHE.clear()
        seen = Reader()
        await reader.watch_fleet(seen.on_change)
        await advertiser(writer, worker_id, CARDS[:5], CATALOGUE_INLINE).publish([])
        legacy = msgspec.json.decode(codec.encode(WorkerAdvert(worker_id=old, host="h", device="cpu",
                                                               catalogue=CARDS[5:8])))  # fmt: skip
        await writer.put_advert(names.worker_key(old), msgspec.json.encode(legacy))
        await writer.put_heartbeat(names.alive_key(old), codec.encode(Heartbeat(worker_id=old)))
        assert (await seen.until(worker_id, lambda a: True)).catalogue == CARDS[:5]
        assert (await seen.until(old, lambda a: True)).catalogue == CARDS[5:8]
        raw = (await reader.read_fleet())[names.worker_key(worker_id)]
        assert catalogues.digest_of_advert(raw) == "" and codec.decode_advert(raw).catalogue == CARDS[:5]
        for key in (names.worker_key(worker_id), names.worker_key(old)):
            await writer.delete_advert(key)
        await writer.withdraw_heartbeat(names.alive_key(old))  # no older worker left for the next tests' keeper

    scenario(nats_server.url, body)


def test_a_new_worker_goes_inline_while_an_older_worker_reads_adverts(nats_server: EmbeddedNats) -> None:
    """A rolling upgrade in any order: an older worker takes a digest advert for a worker with no models."""
    worker_id, old = f"cat-{uuid.uuid4().hex[:8]}", f"cat-{uuid.uuid4().hex[:8]}"
    assert not catalogues.reads_digests(WorkerAdvert(worker_id=old, host="h", device="cpu"))  # no field: older

    async def body(writer: Bus, reader: Bus) -> None:
        fleet = Placements(bus=reader, worker_id=worker_id, catalogue=[], draining=asyncio.Event(),
                           slot_freed=asyncio.Event())  # fmt: skip
        await fleet.watch_fleet()  # as the keeper: it sees every advert (the others read its record's flag)
        ad = advertiser(writer, worker_id, CARDS[:5], older_readers=fleet.older_readers)
        assert catalogues.reads_digests(ad.advert([]))
        legacy = msgspec.json.decode(codec.encode(WorkerAdvert(worker_id=old, host="h", device="cpu",
                                                               catalogue=CARDS[5:8])))  # fmt: skip
        await writer.put_advert(names.worker_key(old), msgspec.json.encode(legacy))
        await writer.put_heartbeat(names.alive_key(old), codec.encode(Heartbeat(worker_id=old)))
        try:
            await until(fleet.older_readers, SEEN_WITHIN_S, "the older worker seen")
            await ad.publish([])
            raw = (await reader.read_fleet())[names.worker_key(worker_id)]
            wire = msgspec.json.decode(raw)  # as the older worker reads it: no digest to follow, the cards there
            assert not wire.get("catalogue_digest") and len(wire["catalogue"]) == 5
            await writer.delete_advert(names.worker_key(old))  # the older worker is upgraded (or gone)
            await until(lambda: not fleet.older_readers(), SEEN_WITHIN_S, "no older worker left")
            await ad.publish([])
            raw = (await reader.read_fleet())[names.worker_key(worker_id)]
            assert catalogues.digest_of_advert(raw) and b'"catalogue"' not in raw
        finally:
            await fleet.unwatch_fleet()
            for key in (names.worker_key(worker_id), names.worker_key(old)):
                await writer.delete_advert(key)
            await writer.withdraw_heartbeat(names.alive_key(old))

    scenario(nats_server.url, body)


def test_a_failing_catalogue_write_holds_no_advert_up_and_is_tried_again_later(
    private_nats: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker refuses the catalogue (its bucket, on a server of the test's own, takes no value that large for a
    while); adverts go inline without trying again each time, and the write is retried in the background every
    `CATALOGUE_RETRY_S`."""
    worker_id = f"cat-{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(advert_module, "CATALOGUE_RETRY_S", 0.2)
    stream = f"KV_{names.CATALOGUE_BUCKET}"

    async def body(writer: Bus, reader: Bus) -> None:
        real_put, calls = writer.put_catalogue, []

        async def put_catalogue(key: str, value: bytes) -> None:  # counts the writes tried; the broker answers
            calls.append(key)
            await real_put(key, value)

        monkeypatch.setattr(writer, "put_catalogue", put_catalogue)
        config = (await writer._js.stream_info(stream)).config
        await writer._js.update_stream(dataclasses.replace(config, max_msg_size=64))  # no catalogue fits
        ad = advertiser(writer, worker_id, CARDS[:6])
        try:
            await ad.publish([])
            await ad.publish([])  # within the retry interval: no write tried, the advert inline at once
            assert len(calls) == 1
            raw = (await reader.read_fleet())[names.worker_key(worker_id)]
            assert catalogues.digest_of_advert(raw) == "" and codec.decode_advert(raw).catalogue == CARDS[:6]
            await writer._js.update_stream(config)  # the broker takes catalogues again
            deadline = time.monotonic() + SEEN_WITHIN_S
            while not catalogues.digest_of_advert((await reader.read_fleet())[names.worker_key(worker_id)]):
                assert time.monotonic() < deadline, "the catalogue write was never tried again"
                await ad.publish([])
                await asyncio.sleep(0.05)
            assert len(calls) >= 2
        finally:
            await ad.withdraw()

    scenario(private_nats.url, body)


def test_a_bucket_read_is_one_pass_and_sees_every_key(
    private_nats: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a server of its own, so no other writer (the session's worker) rewrites keys during the pass. nats-py's
    watch can put its "initial values done" mark before the first entry (about one pass in 60 here): the read
    goes on past it, else all 300 keys would be read one by one (seen here before the mend)."""
    prefix = f"snapshot-{uuid.uuid4().hex[:6]}"
    per_key: list[str] = []
    read_one = bus_module._latest_value

    async def counted(bucket: object, key: str) -> bytes | None:
        per_key.append(key)
        return await read_one(bucket, key)  # type: ignore[arg-type]

    monkeypatch.setattr(bus_module, "_latest_value", counted)

    async def body(writer: Bus, reader: Bus) -> None:
        keys = [f"{prefix}.k{i}" for i in range(300)]
        try:
            await asyncio.gather(*(writer.put_advert(key, key.encode()) for key in keys))
            await writer.delete_advert(keys[0])
            snapshot = await reader.read_fleet()
            assert all(snapshot.get(key) == key.encode() for key in keys[1:]) and keys[0] not in snapshot
            # One pass brings them: a key read by itself only when the pass's end mark came early (other keys
            # rewritten meanwhile), never key after key.
            mine = [key for key in per_key if key.startswith(prefix)]
            assert len(mine) < len(keys) // 2, f"{len(mine)} of {len(keys)} keys were read one by one"
        finally:
            await asyncio.gather(*(writer.delete_advert(key) for key in keys), return_exceptions=True)

    scenario(private_nats.url, body)


def cortexctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cortex.broker", *args], capture_output=True, text=True, timeout=60)


def test_cortexctl_shows_the_real_workers_catalogue(nats_server: EmbeddedNats, gateway: Gateway) -> None:
    catalogues.CACHE.clear()
    raw = asyncio.run(_read_worker(nats_server.url))
    assert catalogues.digest_of_advert(raw) and b'"catalogue"' not in raw  # the real worker writes by digest
    status = cortexctl("status", "--nats", nats_server.url, "--json", "--catalogue")
    assert status.returncode == 0, status.stderr
    worker = {w["worker_id"]: w for w in json.loads(status.stdout)["workers"]}["test-worker"]
    assert TINY_MODEL in [card["id"] for card in worker["catalogue"]]
    models = cortexctl("models", "--nats", nats_server.url)
    assert models.returncode == 0, models.stderr
    assert TINY_MODEL in models.stdout


async def _read_worker(url: str) -> bytes:
    """The real worker's advert once it names its catalogue by digest (it goes inline while an older-format advert,
    such as another test's hand-written one, lives in the fleet: up to the fleet bucket's TTL)."""
    bus = await Bus.open(url, name="test-catalogue-ctl")
    deadline = time.monotonic() + names.ADVERT_TTL_S + SEEN_WITHIN_S
    try:
        while True:
            raw = (await bus.read_fleet()).get(names.worker_key("test-worker"), b"")
            if catalogues.digest_of_advert(raw) or time.monotonic() > deadline:
                return raw
            await asyncio.sleep(0.2)
    finally:
        await bus.close()
