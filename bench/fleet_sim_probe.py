"""One reader of the fleet, measured and profiled: a gateway's fleet view, or a worker's, for `bench.fleet_sim`.

python -m bench.fleet_sim_probe --nats URL --role gateway|worker --models 500 --window 10 --profile 6

Runs the product's own reader over a real `cortex.broker.bus.Bus` watch of a
running fleet: ``gateway`` is `cortex.gateway.fleet.FleetView` fed by the
fleet, heartbeat and decision buckets, as `cortex.gateway.app` wires it;
``worker`` is `cortex.worker.placements.Placements` watching the fleet with
`keep_placed` on every upkeep tick, as the keeper runs it (`cortex.worker.keeper`;
the other workers watch only decisions). It takes this process's CPU seconds
(``getrusage``) over `--window` seconds with nothing else to do, then profiles
another `--profile` seconds with cProfile, and (gateway) times the decisions a
gateway makes from that view: `place_on_demand` for a cold model, over the
live map built as `gateway.placing.ensure_placed` builds it,
the model list behind ``/v1/models`` and every request's model resolution
(`FleetView._compute_models`, a recompute with the merged catalogues kept;
`models_call`: what a request pays, the list kept until what it shows changes),
and decoding one advert. cProfile counts CPU
time (`time.process_time`), so other processes on the cores do not inflate it. One JSON line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import random
import resource
import time
from typing import Any

from bench.common import install_uvloop, p50, percentile
from bench.fleet_sim_catalogue import catalogue, open_bus, specs
from cortex.gateway.fleet import FleetView
from cortex.protocol import catalogues, codec, names
from cortex.protocol.placement import place_on_demand
from cortex.worker.placements import Placements

TOP = 14


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def top_functions(profile: cProfile.Profile, busy: float) -> list[dict[str, Any]]:
    """The functions with the most time of their own, as shares of the profiled CPU time (cumulative beside)."""
    stats = pstats.Stats(profile, stream=io.StringIO())
    rows = []
    for (file, line, func), (_cc, calls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = file.split("/site-packages/")[-1].split("/work/main/")[-1]
        rows.append({"function": f"{where}:{line}({func})", "calls": calls, "own_share": round(tottime / busy, 3),
                     "cum_share": round(cumtime / busy, 3)})  # fmt: skip
    rows.sort(key=lambda r: r["own_share"], reverse=True)
    return rows[:TOP]


def cumulative(profile: cProfile.Profile, busy: float, wanted: tuple[str, ...]) -> dict[str, float]:
    """The cumulative share of chosen functions (by name), whatever file they are in."""
    stats = pstats.Stats(profile, stream=io.StringIO())
    out: dict[str, float] = {}
    for (_file, _line, func), (_cc, _calls, _tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if func in wanted:
            out[func] = round(max(out.get(func, 0.0), cumtime / busy), 3)
    return out


async def timed(fn: Any, runs: int, budget_s: float = 8.0) -> dict[str, float]:
    """`fn`'s wall time per call, in ms; the event loop runs between calls (heartbeats keep the view live)."""
    samples: list[float] = []
    until = time.monotonic() + budget_s
    while len(samples) < runs and (len(samples) < 5 or time.monotonic() < until):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
        await asyncio.sleep(0.02)
    return {"p50_ms": round(p50(samples), 3), "p99_ms": round(percentile(samples, 99), 3), "runs": len(samples)}


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    bus = await open_bus(args.nats, f"fleet-sim-probe-{args.role}")
    upkeep: asyncio.Task[None] | None = None
    view: FleetView | Placements
    if args.role == "gateway":
        view = FleetView()
        await bus.watch_fleet(view.on_change)
        await bus.watch_decisions(view.on_decision)
    else:
        view = Placements(bus=bus, worker_id="fleet-sim-probe", catalogue=specs(catalogue(args.models)),
                          draining=asyncio.Event(), slot_freed=asyncio.Event())  # fmt: skip
        await bus.watch_decisions(view.on_decision)
        await view.watch_fleet()  # as the keeper does once it holds the lease

        async def tick(placements: Placements) -> None:
            while True:
                await asyncio.sleep(names.ADVERT_INTERVAL_S)
                await placements.keep_placed()

        upkeep = asyncio.create_task(tick(view))
    await asyncio.sleep(args.settle)
    cpu0, wall0 = cpu_seconds(), time.monotonic()
    await asyncio.sleep(args.window)
    cpu1, wall1 = cpu_seconds(), time.monotonic()
    result: dict[str, Any] = {"role": args.role, "cpu_share": round((cpu1 - cpu0) / (wall1 - wall0), 4)}
    profile = cProfile.Profile(time.process_time)  # CPU time: the machine's cores are shared
    p_cpu0 = cpu_seconds()
    profile.enable()
    await asyncio.sleep(args.profile)
    profile.disable()
    busy = max(cpu_seconds() - p_cpu0, 1e-6)
    result["profile_cpu_share"] = round(busy / args.profile, 4)
    result["profile_top"] = top_functions(profile, busy)
    result["profile_cum"] = cumulative(profile, busy, (
        "on_change", "on_fleet", "on_decision", "decode_advert", "_feed", "keep_placed", "serving_workers",
        "live", "_process_msg", "_read_next", "parse", "_compute_models", "_notify",
    ))  # fmt: skip
    if isinstance(view, FleetView):
        result.update(await decisions(view, args.models))
    if upkeep is not None:
        upkeep.cancel()
    await bus.close()
    return result


async def decisions(fleet: FleetView, models: int) -> dict[str, Any]:
    """What a gateway computes from its view per request, timed over the fleet as it is now."""
    ids = [c.id for c in catalogue(models)]
    rng = random.Random(7)

    def decide() -> None:  # gateway.placing.ensure_placed's pure part: the live map, then the decision
        live = {a.worker_id: a for a in fleet.workers()}
        place_on_demand(None, model=rng.choice(ids), live=live, pins=fleet.pins.values(),
                        placements=fleet.placements.values(), now=time.time())  # fmt: skip

    live = fleet.workers()
    raw = codec.encode(catalogues.on_the_wire(live[0])) if live else b""  # as `Advertiser.publish` writes it
    out: dict[str, Any] = {
        "live_workers": len(live),
        "placements": len(fleet.placements),
        "advert_bytes": len(raw),
        "compute_models": await timed(fleet._compute_models, 10),
        "models_call": await timed(fleet.models, 50),
        "decode_advert": await timed(lambda: codec.decode_advert(raw), 50) if raw else {},
        "place_on_demand": await timed(decide, 60),
    }
    profile = cProfile.Profile(time.process_time)
    t0 = time.process_time()
    for _ in range(5):
        profile.enable()
        decide()
        profile.disable()
        await asyncio.sleep(0.02)
    busy = max(time.process_time() - t0, 1e-6)
    out["place_on_demand_profile"] = top_functions(profile, busy)[:8]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nats", required=True)
    parser.add_argument("--role", choices=["gateway", "worker"], required=True)
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--profile", type=float, default=6.0)
    args = parser.parse_args()
    install_uvloop()
    print(json.dumps(asyncio.run(measure(args))), flush=True)


if __name__ == "__main__":
    main()
