"""Reading a whole bucket while its keys are being rewritten, as cortexctl does beside live workers."""

from __future__ import annotations

import asyncio

from cortex.broker.bus import Bus
from cortex.broker.server import EmbeddedNats

KEYS = [f"snapshot-test.k{i}" for i in range(4)]  # not worker keys: gateways and workers ignore them


def test_a_bucket_read_sees_every_key_while_they_are_rewritten(nats_server: EmbeddedNats) -> None:
    async def scenario() -> list[int]:
        reader = await Bus.open(nats_server.url, name="test-reader")
        writer = await Bus.open(nats_server.url, name="test-writer")
        done = asyncio.Event()

        async def rewrite(key: str) -> None:
            while not done.is_set():
                await writer.put_advert(key, b"x" * 2000)
                await asyncio.sleep(0.005)

        for key in KEYS:
            await writer.put_advert(key, b"first")
        rewriters = [asyncio.create_task(rewrite(key)) for key in KEYS]
        try:
            # A watcher-based read came back short ~2% of the time under this churn.
            snapshots = [await reader.read_fleet() for _ in range(200)]
            return [sum(key in snapshot for key in KEYS) for snapshot in snapshots]
        finally:
            done.set()
            await asyncio.gather(*rewriters)
            for key in KEYS:
                await writer.delete_advert(key)
            await reader.close()
            await writer.close()

    seen = asyncio.run(scenario())
    assert seen == [len(KEYS)] * len(seen)


def test_a_deleted_key_is_not_in_a_bucket_read(nats_server: EmbeddedNats) -> None:
    async def scenario() -> dict[str, bytes]:
        bus = await Bus.open(nats_server.url, name="test-delete")
        try:
            await bus.put_advert("snapshot-test.gone", b"here")
            await bus.put_advert("snapshot-test.kept", b"here")
            await bus.delete_advert("snapshot-test.gone")
            return await bus.read_fleet()
        finally:
            await bus.delete_advert("snapshot-test.kept")
            await bus.close()

    snapshot = asyncio.run(scenario())
    assert snapshot.get("snapshot-test.kept") == b"here" and "snapshot-test.gone" not in snapshot
