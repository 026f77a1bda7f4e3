"""Model swaps: loads from the converted-weights cache and the host tier against a first load, and a swap end to end.

python -m bench.swap [--model smollm2-135m-instruct] [--device cpu]

Prints one JSON object. With a fresh temporary weights cache, in this process:
the first load of the default model (the GGUF converted, and the cache entry
written), then loads from the entry, then the model parked in a host tier and
brought back, each checked to give the first load's logits. Then through the
whole stack (nats-server, a gateway, one worker with ``--host-cache`` and a
``--memory-budget`` that holds one copy of the model; the same weights cache):
two catalogue ids for the same GGUF file take turns, and the figure is the time
from sending a request for the model just parked to its first streamed token,
next to the same request sent again at once (nothing to load; the prefix cache
is off, since a model back from the host tier starts with an empty one). Ratios
compare things measured in this one run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import torch

from bench.common import machine
from cortex.broker.bus import Bus
from cortex.broker.server import EmbeddedNats, stop_processes
from cortex.protocol import WorkerAdvert, codec, names
from cortex.worker.catalogue import ModelSpec, find_model, load_catalogue
from cortex.worker.device import pick_device
from cortex.worker.host_tier import HostTier, restore
from cortex.worker.loader import LoadedModel, load_model

MODELS = ("swap-a", "swap-b")
WORKER = "swap-bench"
SWAPS = 3
"""Swaps back from the host tier timed each way."""
FIRST_TOKEN = re.compile(rb'"content":"[^"]')


def _logits(loaded: LoadedModel) -> torch.Tensor:
    ids = torch.tensor([loaded.tokenize("The capital of France is")], device=loaded.device)
    with torch.no_grad():
        return loaded.model(ids).logits.float().cpu()


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def measure_loads(spec: ModelSpec, device: torch.device, root: Path) -> dict[str, Any]:
    """First load (conversion and entry written), loads from the entry, reloads from the host tier."""
    first_s, first = _timed(lambda: load_model(spec, device, weights_cache=root))  # also pays torch's start-up
    reference = _logits(first)
    del first
    cached_times, loaded = [], None
    for _ in range(3):
        loaded = None  # the previous copy goes first: memory for one
        seconds, loaded = _timed(lambda: load_model(spec, device, weights_cache=root))
        cached_times.append(seconds)
    assert loaded is not None
    same_cached = loaded.from_cache and torch.equal(_logits(loaded), reference)
    tier = HostTier(capacity=1 << 40)
    park_times, reload_times = [], []
    for _ in range(3):
        seconds, _dropped = _timed(lambda loaded=loaded: tier.park(loaded))
        park_times.append(seconds)
        parked = tier.take(spec.id)
        assert parked is not None
        seconds, loaded = _timed(lambda parked=parked: restore(parked))
        reload_times.append(seconds)
    same_host = loaded.from_host and torch.equal(_logits(loaded), reference)
    return {
        "first_load_s": round(first_s, 3),
        "cached_load_s": round(statistics.median(cached_times), 3),
        "host_tier_park_s": round(statistics.median(park_times), 4),
        "host_tier_reload_s": round(statistics.median(reload_times), 4),
        "same_logits": bool(same_cached and same_host),
        "entry_mb": round(sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 1e6),
    }


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _catalogue(spec: ModelSpec, path: Path) -> None:
    """Two ids for the same weights (the default model's catalogue entry under two names)."""
    fields = {"package": spec.package, "path": spec.path, "gguf_file": spec.gguf_file, "dtype": spec.dtype,
              "context_length": spec.context_length}  # fmt: skip
    entry = "".join(f"{key} = {json.dumps(value)}\n" for key, value in fields.items() if value)
    path.write_text("\n".join(f'[[models]]\nid = "{model}"\n{entry}' for model in MODELS))


def _listed(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/models", timeout=2) as resp:
            return set(MODELS) <= {m["id"] for m in json.load(resp)["data"]}
    except OSError:
        return False


async def _advert(url: str) -> WorkerAdvert | None:
    bus = await Bus.open(url, name="bench-swap")
    try:
        raw = (await bus.read_fleet()).get(names.worker_key(WORKER))
    finally:
        await bus.close()
    return codec.decode_advert(raw) if raw else None


def _wait_parked(url: str, model: str, timeout: float = 60.0) -> None:
    """Until the worker's advert shows `model` in its host tier (the next request for it is a swap back)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        advert = asyncio.run(_advert(url))
        if advert is not None and model in advert.host_cached and advert.state_of(model) is None:
            return
        time.sleep(0.05)
    raise RuntimeError(f"{model} never showed in the host tier")


def _ttft(client: httpx.Client, base: str, model: str) -> float:
    """Seconds from sending a streamed request to its first token."""
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0,
            "stream": True}  # fmt: skip
    started = time.perf_counter()
    first = 0.0
    with client.stream("POST", f"{base}/chat/completions", json=body) as response:
        response.raise_for_status()
        for data in response.iter_bytes():
            if not first and FIRST_TOKEN.search(data):
                first = time.perf_counter() - started
    if not first:
        raise RuntimeError(f"no token from {model}")
    return first


def measure_stack(spec: ModelSpec, device: str, root: Path, tmp: Path) -> dict[str, Any]:
    """Swaps through nats-server, a gateway and one worker with room for one copy and a host tier."""
    need = spec.memory_needed("float32" if device == "cpu" else "bfloat16")
    catalogue = tmp / "models.toml"
    _catalogue(spec, catalogue)
    nats = EmbeddedNats(store_dir=tmp / "nats", port=0, log_file=tmp / "nats.log")
    nats.start()
    port, py = _free_port(), sys.executable
    with open(tmp / "worker.log", "wb") as worker_log, open(tmp / "gateway.log", "wb") as gateway_log:
        procs = [
            subprocess.Popen([py, "-m", "cortex.worker", "--nats", nats.url, "--models", str(catalogue), "--device",
                              device, "--worker-id", WORKER, "--memory-budget", str(need * 3 // 2), "--host-cache",
                              str(need * 3), "--weights-cache", str(root), "--slots", "2",
                              # A model back from the host tier starts with an empty prefix cache: without one,
                              # the warm yardstick prefills the same prompt in full too.
                              "--prefix-cache-tokens", "0"],
                             stdout=worker_log, stderr=subprocess.STDOUT),
            subprocess.Popen([py, "-m", "cortex.gateway", "--nats", nats.url, "--port", str(port), "--metrics-port",
                              "-1", "--log-level", "WARNING"], stdout=gateway_log, stderr=subprocess.STDOUT),
        ]  # fmt: skip
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while not _listed(base):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"the swap stack did not come up (logs in {tmp})")
            time.sleep(0.2)
        a, b = MODELS
        with httpx.Client(timeout=120) as client:
            cold = _ttft(client, base, a)  # nothing to evict: a load from the weights cache entry
            from_cache = _ttft(client, base, b)  # a to the host tier, b from the weights cache entry
            swaps, warm = [], []
            for model in [a, b] * SWAPS:
                _wait_parked(nats.url, model)
                swaps.append(_ttft(client, base, model))  # the other model to the host tier, this one back from it
                warm.append(_ttft(client, base, model))  # the yardstick: the same request, nothing to load
    finally:
        stop_processes(procs, 20)
        nats.stop()
    return {
        "swap_ttft_s_host_tier": round(statistics.median(swaps), 3),
        "swap_ttft_s_host_tier_max": round(max(swaps), 3),
        "warm_ttft_s": round(statistics.median(warm), 3),
        "swap_added_s": round(statistics.median(swaps) - statistics.median(warm), 3),
        "swap_ttft_s_weights_cache": round(from_cache, 3),
        "cold_ttft_s_weights_cache": round(cold, 3),
        "memory_budget_mb": round(need * 3 // 2 / 1e6),
    }


def measure(model: str = "smollm2-135m-instruct", device: str | None = None) -> dict[str, object]:
    spec = find_model(load_catalogue(None), model)
    where = pick_device([0], device).device
    tmp = Path(tempfile.mkdtemp(prefix="cortex-swap-bench-"))
    (tmp / "stack").mkdir()
    try:
        loads = measure_loads(spec, where, tmp / "weights")  # a fresh cache: the first load converts
        stack = measure_stack(spec, where.type, tmp / "weights", tmp / "stack")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "cached_load_vs_first_load": round(loads["cached_load_s"] / loads["first_load_s"], 4),
        "host_tier_reload_vs_first_load": round(loads["host_tier_reload_s"] / loads["first_load_s"], 5),
        "swap_ttft_s_host_tier": stack["swap_ttft_s_host_tier"],
        "model": spec.id,
        **loads,
        **{k: v for k, v in stack.items() if k != "swap_ttft_s_host_tier"},
        "machine": machine(where.type),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    args = parser.parse_args()
    print(json.dumps({"swap": measure(args.model, args.device)}))


if __name__ == "__main__":
    main()
