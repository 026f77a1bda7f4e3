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
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cortex.broker.access import CREDS_ENV, use_credentials
from cortex.broker.connection import DEFAULT_URL
from cortex.broker.errors import CredentialsError
from cortex.broker.settings import ConfigError, add_log_options, apply_defaults, setup_logging
from cortex.protocol.placement import EVICTION_POLICIES

if TYPE_CHECKING:
    from cortex.worker.catalogue import ModelSpec

log = logging.getLogger("cortex.worker")


def _summary(policy: object) -> str:
    """A policy's docstring, first line, as `--help` shows it (argparse formats help with %)."""
    doc = (getattr(policy, "__doc__", None) or "").strip().splitlines()
    return (doc[0].rstrip(".").lower() if doc else "").replace("%", "%%")


def _load_slowly(load: Callable[[ModelSpec], Any], delay: float, spec: ModelSpec) -> Any:
    """`load`, after `delay` seconds (on the engine thread, where loads run: the asyncio side stays live)."""
    time.sleep(delay)
    return load(spec)


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
    parser.add_argument("--load-delay", type=float, default=0.0, metavar="SECONDS",
                        help="tests and demos: take this much longer over every model load (a slow disk)")  # fmt: skip
    parser.add_argument(
        "--synthetic-engine", type=float, default=None, metavar="SECONDS",
        help="benchmarks and relay tests only: no model, emit one token every SECONDS",
    )  # fmt: skip
    parser.add_argument("--synthetic-prefill", type=float, default=0.0, metavar="SECONDS",
                        help="with --synthetic-engine: wait this long before the first token")  # fmt: skip
    parser.add_argument("--weights-cache", default="~/.cache/cortex/weights", metavar="DIR",
                        help="converted weights (GGUF, another dtype) are kept here so later loads map them "
                        "(default ~/.cache/cortex/weights; '' or none: no cache)")  # fmt: skip
    parser.add_argument("--worker-id", default=None, help="name in the fleet bucket (default HOST-gpuN or HOST-cpu)")
    add_log_options(parser)
    try:
        apply_defaults(parser, "worker")
    except ConfigError as exc:
        raise SystemExit(f"cortex-worker: {exc}") from None
    return parser.parse_args(argv)


async def _serve(args: argparse.Namespace) -> int:
    # Heavy imports after argument parsing, so --help is instant.
    from cortex.broker.bus import Bus
    from cortex.broker.errors import BrokerError
    from cortex.worker.catalogue import CatalogueError, find_model, load_catalogue
    from cortex.worker.device import parse_gpus, pick_device
    from cortex.worker.engine import Engine, EngineLimits
    from cortex.worker.loader import load_model
    from cortex.worker.memory import parse_size
    from cortex.worker.service import WorkerService
    from cortex.worker.synthetic import SyntheticEngine, load_synthetic
    from cortex.worker.weights_cache import parse_root

    try:
        catalogue = load_catalogue(args.models)
        serve = [find_model(catalogue, name) for name in args.model or []]
        budget = parse_size(args.memory_budget) if args.memory_budget else 0
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
    loader: Callable[[ModelSpec], Any]
    if args.synthetic_engine is not None:
        engine, loader = (
            SyntheticEngine(worker_id=worker_id, interval=args.synthetic_engine, prefill=args.synthetic_prefill),
            load_synthetic,
        )
    else:
        limits = EngineLimits(
            max_prefill_tokens=args.max_prefill_tokens, prefill_chunk=args.prefill_chunk,
            kv_budget_tokens=args.kv_budget_tokens, prefix_cache_tokens=args.prefix_cache_tokens,
            step_delay=args.step_delay,
        )  # fmt: skip
        engine = Engine(worker_id=worker_id, limits=limits)
        loader = partial(load_model, device=device.device, spread_over=device.devices,
                         weights_cache=parse_root(args.weights_cache))  # fmt: skip
    if args.load_delay > 0:
        loader = partial(_load_slowly, loader, args.load_delay)
    engine.start()
    auto_dtype = "float32" if device.device.type == "cpu" else "bfloat16"
    service = WorkerService(
        bus=bus, engine=engine, device=device, catalogue=catalogue, serve=serve, worker_id=worker_id,
        slots=max(1, args.slots), loader=loader, memory_budget=budget, eviction=args.eviction, dtype=auto_dtype,
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
