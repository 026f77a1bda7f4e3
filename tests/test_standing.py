"""A standing pull request (`cortex.broker.standing`) against a real nats-server: nothing it was brought is stranded.

Each test has a stream and a consumer of its own (uuid-named), so the shared
server's Cortex stream and the session's worker are never touched.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable

import nats
import pytest
from nats.js.api import AckPolicy, ConsumerConfig

from cortex.broker.server import EmbeddedNats
from cortex.broker.standing import StandingPull
from cortex.protocol import names


def scenario(url: str, body: Callable[[nats.NATS, str, str, str], Awaitable[None]], *, max_waiting: int = 512) -> None:
    """`body(nc, stream, durable, subject)` on a stream and a pull consumer of its own, deleted afterwards."""

    async def run() -> None:
        nc = await nats.connect(url, name="test-standing")
        js = nc.jetstream()
        token = uuid.uuid4().hex[:8]
        stream, durable, subject = f"STANDING_{token}", f"pull_{token}", f"standing.{token}"
        await js.add_stream(name=stream, subjects=[subject])
        await js.add_consumer(stream, ConsumerConfig(durable_name=durable, ack_policy=AckPolicy.EXPLICIT,
                                                     ack_wait=30.0, max_waiting=max_waiting))  # fmt: skip
        try:
            await body(nc, stream, durable, subject)
        finally:
            await js.delete_stream(stream)
            await nc.close()

    asyncio.run(run())


def _pull(nc: nats.NATS, stream: str, durable: str) -> StandingPull:
    return StandingPull(nc, names.pull_next_subject(stream, durable), lambda: 0, durable)


def test_wind_down_hands_over_what_came_until_the_requests_ended(nats_server: EmbeddedNats) -> None:
    async def body(nc: nats.NATS, stream: str, durable: str, subject: str) -> None:
        js = nc.jetstream()
        pull = await _pull(nc, stream, durable).open()
        await js.publish(subject, b"first")
        taken = await pull.fetch(4, timeout=1.0)  # asks for 4: three more may still come
        assert [m.data for m in taken] == [b"first"] and pull.outstanding() == 3
        winding = asyncio.create_task(pull.wind_down(3.0))
        for data in (b"second", b"third"):  # brought while it winds down: handed over, never stranded
            await js.publish(subject, data)
        returned = await winding
        assert [m.data for m in returned] == [b"second", b"third"]
        await js.publish(subject, b"fourth")  # queued before the fetch: one that asked would get it
        assert await pull.fetch(1, timeout=0.2) == []  # wound down: it asks for nothing more
        info = await js.consumer_info(stream, durable)
        # Held by this side: exactly what it took and what it handed over; the fourth is still queued for anyone.
        assert info.num_ack_pending == 3 and info.num_pending == 1
        for msg in returned:
            await msg.nak()
        await pull.close()

    scenario(nats_server.url, body)


def test_requests_put_back_come_first_and_are_handed_over(nats_server: EmbeddedNats) -> None:
    async def body(nc: nats.NATS, stream: str, durable: str, subject: str) -> None:
        js = nc.jetstream()
        pull = await _pull(nc, stream, durable).open()
        for data in (b"a", b"b", b"c"):
            await js.publish(subject, data)
        first = await pull.fetch(1, timeout=1.0)
        rest: list[bytes] = []
        while len(rest) < 2:  # a fetch brings what the open request has brought so far
            rest += [m.data for m in await pull.fetch(2, timeout=1.0)]
        pull.put_back(first)  # a fetch cut short after it took it (`LeavingPull`): first in line again
        assert [m.data for m in await pull.fetch(1, timeout=1.0)] == [b"a"]
        pull.put_back(first)
        returned = await pull.wind_down(2.0)
        assert [m.data for m in returned] == [b"a"] and rest == [b"b", b"c"]
        for msg in returned:
            await msg.nak()
        await pull.close()

    scenario(nats_server.url, body)


def test_a_409_is_warned_of_once(nats_server: EmbeddedNats, caplog: pytest.LogCaptureFixture) -> None:
    async def body(nc: nats.NATS, stream: str, durable: str, subject: str) -> None:
        first = await _pull(nc, stream, durable).open()
        second = await _pull(nc, stream, durable).open()
        waiting = asyncio.create_task(first.fetch(1, timeout=2.0))  # holds the consumer's only waiting slot
        await nc.flush()  # its request has reached the server
        assert first.outstanding() == 1
        with caplog.at_level(logging.WARNING, logger="cortex.broker"):
            for _ in range(3):
                assert await second.fetch(1, timeout=0.3) == []  # refused: "Exceeded MaxWaiting", no error raised
        warnings = [r for r in caplog.records if "409" in r.getMessage()]
        assert len(warnings) == 1 and durable in warnings[0].getMessage()  # the consumer named, not the server's text
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await first.close()
        await second.close()

    scenario(nats_server.url, body, max_waiting=1)
