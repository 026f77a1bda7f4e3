"""The keeper: one worker watches the whole fleet for the others, by a lease in the placement bucket.

The lease is tested in-process on the session's nats-server (short renew and
lease times, so a death is noticed in a few seconds); the fleet's side with
real worker processes: of three workers, only one holds a watch of the
heartbeats, and when it is killed another takes the watch over.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats

from cortex.broker.bus import Bus
from cortex.broker.server import EmbeddedNats
from cortex.protocol import Keeper, codec, names
from cortex.worker.keeper import KeeperLease
from cortex.worker.tasks import cancel_and_wait
from tests.conftest import start_worker, stop_process, until, wait_for, write_catalogue

RENEW_S = 0.2
LEASE_S = 3.0
TAKEN_WITHIN_S = 15.0
"""Deadline for a lease to be taken (a lease, a random pause, a round trip; generous for a loaded machine)."""
STARTUP_S = 120.0


class Candidate:
    """A `KeeperLease` on a connection of its own, fed by its own watch of the placement bucket, as a worker runs it."""

    def __init__(self, bus: Bus, worker_id: str, *, fail_first_gain: bool = False) -> None:
        self.bus = bus
        self.gained = 0
        self.lost = 0
        self.fail_first_gain = fail_first_gain
        self.lease = KeeperLease(bus=bus, worker_id=worker_id, instance="i1", inline_catalogues=lambda: False,
                                 gained=self._gained, lost=self._lost, renew_s=RENEW_S, lease_s=LEASE_S)  # fmt: skip
        self.task: asyncio.Task[None] | None = None
        self.records: list[bytes | None] = []
        """Every value of the keeper's record this candidate's watch brought (None: deleted)."""

    async def _gained(self) -> None:
        self.gained += 1
        if self.fail_first_gain and self.gained == 1:
            raise RuntimeError("the fleet cannot be watched (as a JetStream timeout would say)")

    async def _lost(self) -> None:
        self.lost += 1

    async def start(self) -> None:
        await self.bus.watch_decisions(self._on_decision)
        self.task = asyncio.create_task(self.lease.run())

    def _on_decision(self, key: str, value: bytes | None) -> None:
        if key == names.KEEPER_KEY:
            self.records.append(value)
            self.lease.on_record(value)

    async def die(self) -> None:
        """Stop without a word, as a killed process does: its record stays until it is judged stale."""
        assert self.task is not None
        await cancel_and_wait([self.task])


async def record(bus: Bus) -> Keeper | None:
    value, _ = await bus.read_decision(names.KEEPER_KEY)
    return codec.decode_keeper(value) if value is not None else None


def test_one_worker_holds_the_lease_and_another_takes_it_when_it_dies_or_leaves(private_nats: EmbeddedNats) -> None:
    async def run() -> None:
        buses = [await Bus.open(private_nats.url, name=f"keeper-test-{i}") for i in range(3)]
        candidates = [Candidate(bus, f"keeper-w{i}") for i, bus in enumerate(buses)]
        try:
            for candidate in candidates:
                await candidate.start()
            await until(
                lambda: sum(c.lease.held for c in candidates) == 1, TAKEN_WITHIN_S, "nobody took the free lease"
            )
            first = next(c for c in candidates if c.lease.held)
            standing = await record(buses[0])
            assert standing is not None and standing.worker_id == first.lease.worker_id
            for _ in range(2):  # renewed, not taken over: still one keeper, the same, after several leases' time
                await asyncio.sleep(LEASE_S)
                assert [c for c in candidates if c.lease.held] == [first] and first.lost == 0
            assert first.gained == 1

            await first.die()
            alive = [c for c in candidates if c is not first]
            await until(
                lambda: sum(c.lease.held for c in alive) == 1, TAKEN_WITHIN_S, "nobody took over from a dead keeper"
            )
            second = next(c for c in alive if c.lease.held)
            standing = await record(buses[0])
            assert standing is not None and standing.worker_id == second.lease.worker_id

            await second.die()  # a worker that stops gives the lease up once its tasks end: the last one takes it
            await second.lease.release()
            assert second.lost == 1 and not second.lease.held
            third = next(c for c in alive if c is not second)
            await until(lambda: third.lease.held, TAKEN_WITHIN_S, "the lease given up was not taken")
            assert third.records[-2:-1] == [None]  # deleted by the release, then written by the taker: not waited out
        finally:
            for candidate in candidates:
                if candidate.task is not None and not candidate.task.done():
                    await candidate.die()
                    await candidate.lease.release()
            await buses[0].delete_decision(names.KEEPER_KEY)  # leaves no stale record to later tests
            for bus in buses:
                await bus.close()

    asyncio.run(run())


def test_a_keeper_whose_record_another_wrote_steps_down(private_nats: EmbeddedNats) -> None:
    async def run() -> None:
        bus = await Bus.open(private_nats.url, name="keeper-test-step-down")
        candidate = Candidate(bus, "keeper-solo")
        try:
            await candidate.start()
            await until(lambda: candidate.lease.held, TAKEN_WITHIN_S, "the free lease was not taken")
            await bus.put_decision(names.KEEPER_KEY, codec.encode(Keeper(worker_id="keeper-other")))
            await until(lambda: candidate.lost == 1, TAKEN_WITHIN_S, "the keeper did not step down")
            # The other's record is never renewed: once stale, the lease is taken back.
            await until(
                lambda: candidate.lease.held and candidate.gained == 2,
                TAKEN_WITHIN_S,
                "the stale lease was not taken back",
            )
        finally:
            await candidate.die()
            await candidate.lease.release()
            await bus.delete_decision(names.KEEPER_KEY)
            await bus.close()

    asyncio.run(run())


def test_a_worker_that_cannot_keep_watch_gives_the_lease_up_and_takes_it_again(private_nats: EmbeddedNats) -> None:
    async def run() -> None:
        bus = await Bus.open(private_nats.url, name="keeper-test-gain-fails")
        candidate = Candidate(bus, "keeper-unlucky", fail_first_gain=True)
        try:
            await candidate.start()
            # Its first watch of the fleet failed: the record went at once (no lease to wait out), then came back.
            await until(
                lambda: candidate.lease.held and candidate.gained == 2, TAKEN_WITHIN_S, "the lease was not taken again"
            )
            assert candidate.lost == 1
            assert None in candidate.records  # the record was deleted, not left to go stale
            standing = await record(bus)
            assert standing is not None and standing.worker_id == "keeper-unlucky"
        finally:
            await candidate.die()
            await candidate.lease.release()
            await bus.close()

    asyncio.run(run())


# -- the fleet's side, with worker processes -----------------------------------------------------------------------


async def _heartbeat_watches(url: str) -> int:
    """How many watches of the heartbeat bucket have a live reader: one consumer of its stream each, bound to a
    subscriber (a killed process's consumer stays a while, unbound)."""
    nc = await nats.connect(url)
    try:
        consumers = await nc.jetstream().consumers_info(f"KV_{names.ALIVE_BUCKET}")
        return sum(1 for consumer in consumers if consumer.push_bound)
    finally:
        await nc.close()


def heartbeat_watches(url: str) -> int:
    return asyncio.run(_heartbeat_watches(url))


def beating(url: str) -> set[str]:
    """The keys of the heartbeats standing now."""

    async def read() -> set[str]:
        bus = await Bus.open(url, name="keeper-test-beats")
        try:
            return {key for key, value in (await bus.read_heartbeats()).items() if value is not None}
        finally:
            await bus.close()

    return asyncio.run(read())


def keeper_of(url: str) -> str:
    async def read() -> str:
        bus = await Bus.open(url, name="keeper-test-read")
        try:
            standing = await record(bus)
            return standing.worker_id if standing is not None else ""
        finally:
            await bus.close()

    return asyncio.run(read())


def test_only_the_keeper_watches_the_fleet_and_another_takes_over_when_it_is_killed(
    private_nats: EmbeddedNats, logs_dir: Path, tmp_path: Path, tiny_model_dir: Path
) -> None:
    url = private_nats.url
    catalogue = write_catalogue(tmp_path / "catalogue.toml", tiny_model_dir, ["kp"])
    names_ = ("keep-a", "keep-b", "keep-c")
    procs = {name: start_worker(url, catalogue, logs_dir / f"{name}.log", "--device", "cpu", "--worker-id", name)
             for name in names_}  # fmt: skip
    try:
        wait_for(lambda: keeper_of(url) in procs, timeout=STARTUP_S, what="one of the workers keeping watch")
        keeper = keeper_of(url)
        # Every worker started (each would have made its watch by now, before the keeper's design), then counted.
        wait_for(lambda: {names.alive_key(name) for name in names_} <= beating(url), timeout=STARTUP_S,
                 what="all three workers beating")  # fmt: skip
        # Three workers, no gateway on this server: one watch of the heartbeats, the keeper's (three before it).
        wait_for(lambda: heartbeat_watches(url) == 1, timeout=TAKEN_WITHIN_S, what="one watch of the heartbeats")
        procs[keeper].kill()  # SIGKILL: its record stays until judged stale by the others
        wait_for(lambda: keeper_of(url) not in ("", keeper), timeout=TAKEN_WITHIN_S * 2,
                 what="another worker taking over")  # fmt: skip
        # The dead keeper's watch lost its reader with its connection: again exactly one, the new keeper's.
        wait_for(lambda: heartbeat_watches(url) == 1, timeout=TAKEN_WITHIN_S * 2, what="one watch again")
        assert keeper_of(url) in procs and keeper_of(url) != keeper
        assert heartbeat_watches(url) == 1
    finally:
        for proc in procs.values():
            stop_process(proc)
