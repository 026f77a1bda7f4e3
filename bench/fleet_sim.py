"""The fleet at scale: N simulated workers, M catalogue models, G gateways, and what keeping the fleet costs.

python -m bench.fleet_sim                                 # small: 20 workers x 100 models (make bench)
python -m bench.fleet_sim --workers 200 --models 500      # one size
python -m bench.fleet_sim --sizes 50,200,500 --models 500  # several, with growth exponents

Everything runs on 127.0.0.1: nats-server (with its monitoring port), G real
``cortex-gateway`` processes, and simulated workers (`bench.fleet_sim_worker`:
many per process, each its own NATS client writing the real advert every 2 s
and the real heartbeat every 0.5 s, loading and evicting as the placement
bucket says, with simulated load times). Phases, each bounded:

1. idle (`--window` s): no requests, only the fleet keeping itself. Each
   gateway's CPU share (``/proc/<pid>/stat``: what watching the fleet costs
   it), the broker's traffic (``/varz`` deltas) and, counted on subscriptions,
   the advert and heartbeat writes (messages/s, bytes/s).
2. reads: ``GET /v1/models`` on a gateway, ``cortexctl status --json`` (the
   real CLI, a process each time), their latency.
3. requests (`--window` s): chat requests at `--rate` per second over the
   gateways, models drawn Zipf(`ZIPF_S`) from the catalogue; a request for a
   model with no worker placed is cold, and its time to placement is from
   sending it to the placement (naming a worker) arriving on a watch of the
   placement bucket. Nothing answers them (the simulated workers do not
   generate): each is dropped after `REQUEST_TIMEOUT_S`.
4. probes (`bench.fleet_sim_probe`): a gateway's fleet view and a worker's,
   each alone in a process with a real watch: CPU share, a cProfile of it, and
   the placement decision timed over the live fleet.

Machine contention matters: every process here shares the machine's cores, so
CPU seconds (per process) are the figures to trust over wall time. One JSON
line per size; with ``--sizes``, a last line with the exponent of each figure's
growth (the slope of log(figure) over log(workers)).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench.common import free_port, p50, percentile, raise_fd_limit

ZIPF_S = 1.1
REQUEST_TIMEOUT_S = 3.0
WORKERS_PER_PROCESS = 50
SMALL = {"workers": 20, "models": 100, "gateways": 3, "window": 6.0, "rate": 8.0}
TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far; its children are not counted."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / TICK


def varz(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/varz", timeout=5) as resp:
        data: dict[str, Any] = json.load(resp)
    return data


def get_json(url: str, timeout: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.load(resp)


class Stack:
    """nats-server, gateways and simulated workers for one size; `stop` ends them all."""

    def __init__(self, tmp: Path, workers: int, models: int, gateways: int, worker_watch: bool) -> None:
        self.tmp, self.workers, self.models, self.n_gateways = tmp, workers, models, gateways
        self.worker_watch = worker_watch
        self.gateways: list[tuple[subprocess.Popen[bytes], int]] = []
        self.sims: list[subprocess.Popen[str]] = []
        self.nats: Any = None
        self.monitor = free_port()

    @property
    def url(self) -> str:
        return str(self.nats.url)

    def start_broker_and_gateways(self) -> None:
        from cortex.broker.server import EmbeddedNats

        self.nats = EmbeddedNats(store_dir=self.tmp / "nats", port=0, log_file=self.tmp / "nats.log",
                                 monitor_port=self.monitor)  # fmt: skip
        self.nats.start()
        for _ in range(self.n_gateways):
            port = free_port()
            cmd = [sys.executable, "-m", "cortex.gateway", "--nats", self.url, "--port", str(port), "--metrics-port",
                   "-1", "--log-level", "WARNING", "--request-timeout", "30"]  # fmt: skip
            with open(self.tmp / f"gateway-{port}.log", "wb") as log:
                proc = subprocess.Popen(cmd, stderr=log)
            self.gateways.append((proc, port))
        deadline = time.monotonic() + 60
        for _, port in self.gateways:
            while True:
                try:
                    get_json(f"http://127.0.0.1:{port}/health", timeout=2)
                    break
                except OSError as exc:
                    if isinstance(exc, urllib.error.HTTPError):  # 503: up, with no workers yet
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError("gateway did not come up") from exc
                    time.sleep(0.2)

    def start_workers(self, load_s: float) -> float:
        """Start the simulated workers; seconds until every gateway counts them all."""
        t0 = time.monotonic()
        per = WORKERS_PER_PROCESS if not self.worker_watch else 25
        for first in range(0, self.workers, per):
            count = min(per, self.workers - first)
            cmd = [sys.executable, "-m", "bench.fleet_sim_worker", "--nats", self.url, "--first", str(first),
                   "--count", str(count), "--models", str(self.models), "--load-s", str(load_s)]  # fmt: skip
            if self.worker_watch:
                cmd.append("--worker-watch")
            with open(self.tmp / f"sim-{first}.log", "wb") as log:
                self.sims.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True))
        for sim in self.sims:
            assert sim.stdout is not None
            line = sim.stdout.readline()
            if not line.startswith("ready"):
                raise RuntimeError(f"a simulated worker process did not start: {line!r}")
        deadline = time.monotonic() + 60 + 0.2 * self.workers
        for _, port in self.gateways:
            while self.counted(port) < self.workers:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gateway on {port} counts {self.counted(port)} of {self.workers} workers")
                time.sleep(0.5)
        return time.monotonic() - t0

    @staticmethod
    def counted(port: int) -> int:
        try:
            return int(get_json(f"http://127.0.0.1:{port}/health", timeout=10)["workers"])
        except (OSError, KeyError, ValueError) as exc:
            body = getattr(exc, "read", None)
            if body is not None:
                try:
                    return int(json.loads(body())["workers"])
                except (ValueError, KeyError):
                    return 0
            return 0

    def late_heartbeats(self) -> int:
        """Heartbeats the simulated workers wrote late (their processes' event loops held up: this machine's limit)."""
        return sum(log.read_text(errors="replace").count("heartbeat") for log in self.tmp.glob("sim-*.log"))

    def pids(self) -> dict[str, int]:
        out = {f"gateway{i}": proc.pid for i, (proc, _) in enumerate(self.gateways)}
        out["nats"] = int(self.nats.pid)
        out.update({f"sim{i}": sim.pid for i, sim in enumerate(self.sims)})
        return out

    def stop(self) -> None:
        from cortex.broker.server import stop_processes

        if logs := os.environ.get("FLEET_SIM_LOGS"):  # keep the gateways' and the broker's logs for a look afterwards
            target = Path(logs) / f"w{self.workers}"
            target.mkdir(parents=True, exist_ok=True)
            for log in self.tmp.glob("*.log"):
                (target / log.name).write_bytes(log.read_bytes())

        stop_processes([*self.sims, *(proc for proc, _ in self.gateways)], 20)  # type: ignore[list-item]
        if self.nats is not None:
            self.nats.stop()


async def count_writes(url: str, seconds: float) -> dict[str, float]:
    """Advert and heartbeat writes over `seconds`, per second: messages and bytes (payload + subject)."""
    import nats

    nc = await nats.connect(url, name="fleet-sim-counter")
    counts = {"advert_msgs": 0, "advert_bytes": 0, "heartbeat_msgs": 0, "heartbeat_bytes": 0}

    async def on_advert(msg: Any) -> None:
        counts["advert_msgs"] += 1
        counts["advert_bytes"] += len(msg.data) + len(msg.subject)

    async def on_beat(msg: Any) -> None:
        counts["heartbeat_msgs"] += 1
        counts["heartbeat_bytes"] += len(msg.data) + len(msg.subject)

    await nc.subscribe("$KV.cortex-fleet.>", cb=on_advert, pending_bytes_limit=-1)
    await nc.subscribe("$KV.cortex-alive.>", cb=on_beat, pending_bytes_limit=-1)
    await asyncio.sleep(seconds)
    await nc.close()
    return {f"{key}_per_s": round(value / seconds, 1) for key, value in counts.items()}


def idle_phase(stack: Stack, window: float) -> dict[str, Any]:
    pids = stack.pids()
    cpu0, v0, t0 = {k: proc_cpu(p) for k, p in pids.items()}, varz(stack.monitor), time.monotonic()
    writes = asyncio.run(count_writes(stack.url, window))
    cpu1, v1, t1 = {k: proc_cpu(p) for k, p in pids.items()}, varz(stack.monitor), time.monotonic()
    wall = t1 - t0
    share = {k: round((cpu1[k] - cpu0[k]) / wall, 4) for k in pids}
    gateways = [share[k] for k in share if k.startswith("gateway")]
    sims = sum(share[k] for k in share if k.startswith("sim"))
    broker = {key: round((v1[key] - v0[key]) / wall, 1) for key in ("in_msgs", "in_bytes", "out_msgs", "out_bytes")}
    return {
        "gateway_fleet_cpu_share": round(max(gateways), 4),
        "gateway_fleet_cpu_share_mean": round(sum(gateways) / len(gateways), 4),
        "nats_cpu_share": share["nats"],
        "sim_cpu_share_per_worker": round(sims / stack.workers, 5),
        "broker_per_s": broker,
        **writes,
        "window_s": round(wall, 1),
    }


def read_phase(stack: Stack, runs: int) -> dict[str, Any]:
    port = stack.gateways[0][1]
    models_ms, size, refused = [], 0, []
    for _ in range(runs):
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as resp:
                size = len(resp.read())
        except urllib.error.HTTPError as exc:  # a 503: the gateway is cut off (its watch lost, being made again)
            refused.append(f"{exc.code}: {exc.read()[:200]!r}")
        else:
            models_ms.append((time.perf_counter() - t0) * 1000)
        time.sleep(0.2)
    status_ms, status_cpu = [], []
    ctl = [sys.executable, "-m", "cortex.broker.ctl", "status", "--json", "--nats", stack.url]
    for _ in range(3):
        before = os.times()
        t0 = time.perf_counter()
        done = subprocess.run(ctl, capture_output=True, timeout=60, check=True)
        status_ms.append((time.perf_counter() - t0) * 1000)
        after = os.times()
        status_cpu.append((after.children_user + after.children_system - before.children_user
                           - before.children_system) * 1000)  # fmt: skip
    workers = len(json.loads(done.stdout)["workers"])
    return {
        "v1_models_p50_ms": round(p50(models_ms), 1),
        "v1_models_p99_ms": round(percentile(models_ms, 99), 1),
        "v1_models_bytes": size,
        "v1_models_refused": len(refused),
        "v1_models_refusals": refused[:2],
        "cortexctl_status_p50_ms": round(p50(status_ms), 1),
        "cortexctl_status_max_ms": round(max(status_ms), 1),
        "cortexctl_status_cpu_ms": round(p50(status_cpu), 1),
        "cortexctl_status_workers": workers,
    }


async def request_phase(stack: Stack, window: float, rate: float) -> dict[str, Any]:
    import httpx

    from bench.fleet_sim_catalogue import catalogue, open_bus
    from cortex.protocol import codec, names

    ids = [c.id for c in catalogue(stack.models)]
    weights = [1 / (rank + 1) ** ZIPF_S for rank in range(len(ids))]
    rng = random.Random(11)
    placed: dict[str, bool] = {}
    waiting: dict[str, list[float]] = {}
    to_placement: list[float] = []

    def on_decision(key: str, value: bytes | None) -> None:
        parsed = names.parse_placement_key(key)
        if parsed is None or parsed[0] != "placement":
            return
        model = parsed[1]
        has = value is not None and bool(codec.decode_placement(value).workers)
        placed[model] = has
        if has:
            now = time.monotonic()
            to_placement.extend((now - t) * 1000 for t in waiting.pop(model, []))

    bus = await open_bus(stack.url, "fleet-sim-driver")
    await bus.watch_decisions(on_decision)
    await asyncio.sleep(0.5)
    ports = [port for _, port in stack.gateways]
    sent = cold = failed = 0
    statuses: dict[str, int] = {}
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=64)
    pids = stack.pids()
    cpu0, t0 = {k: proc_cpu(p) for k, p in pids.items()}, time.monotonic()
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_S, limits=limits) as client:

        async def one(model: str, port: int) -> None:
            nonlocal failed
            body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
            try:
                resp = await client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body)
                statuses[str(resp.status_code)] = statuses.get(str(resp.status_code), 0) + 1
            except httpx.TimeoutException:
                statuses["timeout"] = statuses.get("timeout", 0) + 1
            except httpx.HTTPError:
                failed += 1

        tasks = []
        start = time.monotonic()
        while (now := time.monotonic()) - start < window:
            model = rng.choices(ids, weights)[0]
            if not placed.get(model):
                cold += 1
                waiting.setdefault(model, []).append(now)
            tasks.append(asyncio.create_task(one(model, ports[sent % len(ports)])))
            sent += 1
            await asyncio.sleep(rng.expovariate(rate))
        cpu1, t1 = {k: proc_cpu(p) for k, p in pids.items()}, time.monotonic()
        await asyncio.gather(*tasks)
    await asyncio.sleep(1.0)  # the last placements' watch
    await bus.close()
    gateways = [(cpu1[k] - cpu0[k]) / (t1 - t0) for k in pids if k.startswith("gateway")]
    return {
        "requests": sent,
        "cold_requests": cold,
        "cold_placed": len(to_placement),
        "cold_to_placement_p50_ms": round(p50(to_placement), 1),
        "cold_to_placement_p99_ms": round(percentile(to_placement, 99), 1),
        "placements_total": sum(placed.values()),
        "gateway_cpu_share_with_requests": round(max(gateways), 4),
        "statuses": statuses,
        "client_errors": failed,
    }


def probes(stack: Stack, window: float) -> dict[str, dict[str, Any]]:
    """The gateway probe and the worker probe, side by side (each measures its own process's CPU)."""
    running = {}
    for role in ("gateway", "worker"):
        cmd = [sys.executable, "-m", "bench.fleet_sim_probe", "--nats", stack.url, "--role", role, "--models",
               str(stack.models), "--window", str(window), "--profile", str(max(3.0, window / 2))]  # fmt: skip
        running[role] = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    out = {}
    for role, proc in running.items():
        stdout, _ = proc.communicate(timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"the {role} probe failed ({proc.returncode})")
        out[role] = json.loads(stdout.strip().splitlines()[-1])
    return out


def measure(workers: int = SMALL["workers"], models: int = SMALL["models"], gateways: int = SMALL["gateways"],
            window: float = SMALL["window"], rate: float = SMALL["rate"], load_s: float = 2.0,
            worker_watch: bool = False) -> dict[str, Any]:  # fmt: skip
    """One size, every phase; the figures as one dict (``fleet_sim_*`` keys at the top for `bench.all`)."""
    raise_fd_limit()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cortex-fleet-sim-") as tmp:
        stack = Stack(Path(tmp), workers, models, gateways, worker_watch)
        try:
            stack.start_broker_and_gateways()
            base: dict[str, float] = {}
            pids = stack.pids()
            c0 = {k: proc_cpu(p) for k, p in pids.items()}
            time.sleep(2.0)
            base = {k: round((proc_cpu(p) - c0[k]) / 2.0, 4) for k, p in pids.items() if k.startswith("gateway")}
            up_s = stack.start_workers(load_s)
            time.sleep(2.0)  # every advert rewritten at least once since the gateways counted the last worker
            idle = idle_phase(stack, window)
            reads = read_phase(stack, 8)
            requests = asyncio.run(request_phase(stack, window, rate))
            probed = probes(stack, window)
            late = stack.late_heartbeats()
            gateway_probe, worker_probe = probed["gateway"], probed["worker"]
        finally:
            stack.stop()
    decisions = gateway_probe
    return {
        "fleet_sim_workers": workers,
        "fleet_sim_models": models,
        "fleet_sim_gateways": gateways,
        "fleet_sim_gateway_cpu_share": idle["gateway_fleet_cpu_share"],
        "fleet_sim_gateway_idle_baseline_cpu_share": max(base.values()) if base else 0.0,
        "fleet_sim_advert_bytes_per_s": idle["advert_bytes_per_s"],
        "fleet_sim_advert_msgs_per_s": idle["advert_msgs_per_s"],
        "fleet_sim_heartbeat_msgs_per_s": idle["heartbeat_msgs_per_s"],
        "fleet_sim_broker_in_bytes_per_s": idle["broker_per_s"]["in_bytes"],
        "fleet_sim_broker_out_bytes_per_s": idle["broker_per_s"]["out_bytes"],
        "fleet_sim_nats_cpu_share": idle["nats_cpu_share"],
        "fleet_sim_advert_bytes": decisions.get("advert_bytes", 0),
        "fleet_sim_place_p50_ms": decisions["place_on_demand"]["p50_ms"],
        "fleet_sim_place_p99_ms": decisions["place_on_demand"]["p99_ms"],
        "fleet_sim_compute_models_p50_ms": decisions["compute_models"]["p50_ms"],
        "fleet_sim_models_call_p50_ms": decisions.get("models_call", {}).get("p50_ms", 0.0),
        "fleet_sim_cold_to_placement_p50_ms": requests["cold_to_placement_p50_ms"],
        "fleet_sim_cold_to_placement_p99_ms": requests["cold_to_placement_p99_ms"],
        "fleet_sim_v1_models_p50_ms": reads["v1_models_p50_ms"],
        "fleet_sim_v1_models_p99_ms": reads["v1_models_p99_ms"],
        "fleet_sim_cortexctl_status_p50_ms": reads["cortexctl_status_p50_ms"],
        "fleet_sim_cortexctl_status_max_ms": reads["cortexctl_status_max_ms"],
        "fleet_sim_worker_view_cpu_share": worker_probe["cpu_share"],
        "fleet_sim_gateway_view_cpu_share": gateway_probe["cpu_share"],
        "fleet_sim_seconds": round(time.monotonic() - started, 1),
        "fleet_sim_startup_s": round(up_s, 1),
        "fleet_sim_late_heartbeat_warnings": late,
        "idle": idle,
        "reads": reads,
        "requests": requests,
        "gateway_probe": gateway_probe,
        "worker_probe": worker_probe,
        "fleet_sim_cores": os.cpu_count(),
    }


GROWTH_KEYS = (
    "fleet_sim_gateway_cpu_share", "fleet_sim_gateway_view_cpu_share", "fleet_sim_worker_view_cpu_share",
    "fleet_sim_advert_bytes_per_s", "fleet_sim_advert_msgs_per_s", "fleet_sim_broker_in_bytes_per_s",
    "fleet_sim_broker_out_bytes_per_s", "fleet_sim_nats_cpu_share", "fleet_sim_place_p50_ms",
    "fleet_sim_place_p99_ms", "fleet_sim_compute_models_p50_ms",
    "fleet_sim_cold_to_placement_p50_ms", "fleet_sim_cold_to_placement_p99_ms", "fleet_sim_v1_models_p50_ms",
    "fleet_sim_cortexctl_status_p50_ms",
)  # fmt: skip


def exponents(results: list[dict[str, Any]]) -> dict[str, float]:
    """Each figure's growth with the worker count: the least-squares slope of log(figure) over log(workers)."""
    out = {}
    for key in GROWTH_KEYS:
        points = [(math.log(r["fleet_sim_workers"]), math.log(r[key])) for r in results
                  if isinstance(r.get(key), int | float) and r[key] > 0]  # fmt: skip
        if len(points) < 2:
            continue
        mx, my = sum(x for x, _ in points) / len(points), sum(y for _, y in points) / len(points)
        sxx = sum((x - mx) ** 2 for x, _ in points)
        out[key] = round(sum((x - mx) * (y - my) for x, y in points) / sxx, 2) if sxx else float("nan")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=SMALL["workers"])
    parser.add_argument("--sizes", default="", help="worker counts to run one after the other, e.g. 50,200,500")
    parser.add_argument("--models", type=int, default=SMALL["models"])
    parser.add_argument("--gateways", type=int, default=SMALL["gateways"])
    parser.add_argument("--window", type=float, default=SMALL["window"], help="seconds of each measured phase")
    parser.add_argument("--rate", type=float, default=SMALL["rate"], help="requests per second in the request phase")
    parser.add_argument("--load-s", type=float, default=2.0, help="mean simulated load time")
    parser.add_argument(
        "--worker-watch",
        action="store_true",
        help="every simulated worker keeps its own view of the fleet, as real ones do (N^2 traffic)",
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s] or [args.workers]
    results = []
    for workers in sizes:
        result = measure(workers, args.models, args.gateways, args.window, args.rate, args.load_s, args.worker_watch)
        results.append(result)
        print(json.dumps({"fleet_sim": result}), flush=True)
    if len(results) > 1:
        print(json.dumps({"fleet_sim_growth_exponents": exponents(results),
                          "sizes": sizes, "models": args.models}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
