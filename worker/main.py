"""``cortex-worker``: one process per GPU (or one on the CPU).

::

    cortex-worker --gpu 0 --nats nats://10.0.0.5:4222 --models /etc/cortex/models.toml
    cortex-worker --device cpu --model smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
import threading
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cortex.broker.access import CREDS_ENV, use_credentials
from cortex.broker.connection import DEFAULT_URL
from cortex.broker.errors import CredentialsError
from cortex.broker.settings import parse_service_args, setup_logging
from cortex.protocol.choice import EVICTION_POLICIES

if TYPE_CHECKING:
    from cortex.worker.catalogue import ModelSpec
    from cortex.worker.loading import Loader

log = logging.getLogger("cortex.worker")


def _summary(policy: object) -> str:
    """A policy's docstring, first line, as `--help` shows it (argparse formats help with %)."""
    doc = (getattr(policy, "__doc__", None) or "").strip().splitlines()
    return (doc[0].rstrip(".").lower() if doc else "").replace("%", "%%")


def parse_load_delay(text: str) -> dict[str, float]:
    """``--load-delay``: ``4`` (every model) or ``m1=30,m2=5`` (those models only) into seconds by model ("": every
    other model)."""
    delays: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if part:
            model, _, seconds = part.rpartition("=")
            delays[model.strip()] = float(seconds)
    return delays


def _load_slowly(load: Loader, delays: dict[str, float], spec: ModelSpec, abort: threading.Event) -> Any:
    """`load`, after the delay set for `spec` (on a loader thread); the wait ends at once if the load is called off."""
    delay = delays.get(spec.id, delays.get("", 0.0))
    if delay > 0:
        log.info("holding the load of %s for %gs (--load-delay)", spec.id, delay)
        if abort.wait(delay):
            from cortex.worker.loader import LoadAborted

            raise LoadAborted(f"the load of {spec.id} was called off while --load-delay held it")
    return load(spec, abort)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cortex-worker", description="Serve models from the Cortex request stream.")
    parser.add_argument("--gpu", default="0",
                        help="CUDA device index, or several (0,1) to spread models over")  # fmt: skip
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default=None, help="force a device (default: cuda if present)"
    )
    parser.add_argument("--nats", default=DEFAULT_URL, help=f"NATS server URL (default {DEFAULT_URL})")
    parser.add_argument("--nats-creds", metavar="FILE", default=None,
                        help=f"NATS user: a USER:PASSWORD file (default ${CREDS_ENV})")  # fmt: skip
    parser.add_argument("--models", type=Path, default=None, help="models.toml catalogue (default: the bundled one)")
    parser.add_argument(
        "--model", action="append", default=None,
        help="a catalogue id or alias to load at start (repeatable; default: none, models load on demand)",
    )  # fmt: skip
    parser.add_argument("--memory-budget", default=None,
                        help="memory models may take, e.g. 2GiB (default: the device's memory)")  # fmt: skip
    policies = "; ".join(f"{name}, {_summary(policy)}" for name, policy in EVICTION_POLICIES.items())
    parser.add_argument("--eviction", choices=sorted(EVICTION_POLICIES), default="lru",
                        help=f"which models make room: {policies}")  # fmt: skip
    parser.add_argument("--slots", type=int, default=8, help="requests run at once (default 8)")
    parser.add_argument("--max-prefill-tokens", type=int, default=2048, help="prompt tokens per prefill round")
    parser.add_argument("--prefill-chunk", type=int, default=512, help="longer prompts are prefilled in chunks")
    parser.add_argument("--kv-budget-tokens", type=int, default=0, help="KV cells per model batch (0: from memory)")
    parser.add_argument("--prefix-cache-tokens", type=int, default=16384, help="tokens kept for prefix reuse")
    parser.add_argument("--step-delay", type=float, default=0.0, metavar="SECONDS",
                        help="tests and demos: pause after every decode step, as a slow device would")  # fmt: skip
    parser.add_argument("--load-delay", type=parse_load_delay, default={}, metavar="SECONDS|MODEL=SECONDS,...",
                        help="tests and demos: take this much longer over every model load, or those named (a slow "
                        "disk)")  # fmt: skip
    parser.add_argument(
        "--synthetic-engine", type=float, default=None, metavar="SECONDS",
        help="benchmarks and relay tests only: no model, emit one token every SECONDS",
    )  # fmt: skip
    parser.add_argument("--synthetic-prefill", type=float, default=0.0, metavar="SECONDS",
                        help="with --synthetic-engine: wait this long before the first token")  # fmt: skip
    parser.add_argument("--host-cache", default="0", metavar="SIZE",
                        help="keep models that leave the device (evicted, idle, unplaced) in this much host memory, "
                        "least recently used out first, so loading one again is a copy back (e.g. 16GiB; pinned "
                        "memory on CUDA; default 0: off)")  # fmt: skip
    parser.add_argument("--weights-cache", default="~/.cache/cortex/weights", metavar="DIR",
                        help="converted weights (GGUF, another dtype) are kept here so later loads map them "
                        "(default ~/.cache/cortex/weights; '' or none: no cache)")  # fmt: skip
    parser.add_argument("--worker-id", default=None, help="name in the fleet bucket (default HOST-gpuN or HOST-cpu)")
    parser.add_argument("--advert-catalogue", choices=["digest", "inline"], default="digest",
                        help="digest (default): write the catalogue once under its digest and name it in each "
                        "advert; inline: put it in every advert, for gateways and cortexctl older than digests "
                        "(during a rolling upgrade; upgrade gateways and cortexctl first)")  # fmt: skip
    parser.add_argument("--affinity-window", type=float, default=None, metavar="SECONDS",
                        help="how long a request sent to this worker first (it has the conversation cached) waits "
                        "for a free slot here before any worker may take it (default 0.3)")  # fmt: skip
    return parse_service_args(parser, "worker", argv)


async def _serve(args: argparse.Namespace) -> int:
    # Heavy imports after argument parsing, so --help is instant.
    from cortex.broker.bus import Bus
    from cortex.broker.errors import BrokerError
    from cortex.worker.catalogue import CatalogueError, find_model, load_catalogue
    from cortex.worker.device import parse_gpus, pick_device
    from cortex.worker.engine import Engine, EngineLimits
    from cortex.worker.inflight import AFFINITY_WINDOW_S
    from cortex.worker.loader import load_model
    from cortex.worker.memory import parse_size
    from cortex.worker.service import WorkerService
    from cortex.worker.synthetic import SyntheticEngine, load_synthetic
    from cortex.worker.weights_cache import parse_root

    try:
        catalogue = load_catalogue(args.models)
        serve = [find_model(catalogue, name) for name in args.model or []]
        budget = parse_size(args.memory_budget) if args.memory_budget else 0
        host_cache = parse_size(args.host_cache or "0")
    except (CatalogueError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    if not catalogue:
        log.error("nothing to serve: the catalogue is empty")
        return 2
    try:
        device = pick_device(parse_gpus(args.gpu), args.device)
    except (RuntimeError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    gpu_name = "gpu" + "-".join(str(d.index) for d in device.devices)
    worker_id = args.worker_id or f"{socket.gethostname()}-{'cpu' if device.device.type == 'cpu' else gpu_name}"
    try:
        bus = await Bus.open(args.nats, name=f"cortex-worker {worker_id}")
    except BrokerError as exc:
        log.error("%s", exc)
        return 1
    engine: Engine | SyntheticEngine
    loader: Loader
    if args.synthetic_engine is not None:
        engine, loader = (
            SyntheticEngine(worker_id=worker_id, interval=args.synthetic_engine, prefill=args.synthetic_prefill),
            lambda spec, _abort: load_synthetic(spec),
        )
    else:
        limits = EngineLimits(
            max_prefill_tokens=args.max_prefill_tokens, prefill_chunk=args.prefill_chunk,
            kv_budget_tokens=args.kv_budget_tokens, prefix_cache_tokens=args.prefix_cache_tokens,
            step_delay=args.step_delay,
        )  # fmt: skip
        engine = Engine(worker_id=worker_id, limits=limits)
        weights_cache = parse_root(args.weights_cache)

        def loader(spec: ModelSpec, abort: threading.Event) -> Any:
            return load_model(spec, device.device, device.devices, weights_cache, abort=abort)

    if args.load_delay:
        loader = partial(_load_slowly, loader, args.load_delay)
    engine.start()
    auto_dtype = "float32" if device.device.type == "cpu" else "bfloat16"
    service = WorkerService(
        bus=bus, engine=engine, device=device, catalogue=catalogue, serve=serve, worker_id=worker_id,
        slots=max(1, args.slots), loader=loader, memory_budget=budget, eviction=args.eviction, dtype=auto_dtype,
        host_cache=host_cache, advert_catalogue=args.advert_catalogue,
        affinity_window=AFFINITY_WINDOW_S if args.affinity_window is None else max(0.0, args.affinity_window),
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, service.stop)
    log.info("worker %s on %s: catalogue %s; loading at start: %s", worker_id, device.label,
             ", ".join(s.id for s in catalogue), ", ".join(s.id for s in serve) or "nothing")  # fmt: skip
    try:
        await service.run()
    finally:
        engine.stop()
        await bus.close()
    log.info("worker %s stopped", worker_id)
    return 0


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    try:
        use_credentials(args.nats_creds)  # every connection of this process is made as this user
    except CredentialsError as exc:
        sys.exit(f"cortex-worker: {exc}")
    try:
        import uvloop
    except ImportError:
        sys.exit(asyncio.run(_serve(args)))
    sys.exit(uvloop.run(_serve(args)))


if __name__ == "__main__":
    main()
