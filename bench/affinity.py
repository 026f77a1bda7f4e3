"""Conversation affinity: how much of each turn's prompt a worker finds in its cache, with three workers as with one.

Twelve conversations of six turns each (every turn appends the answer and a new
question; answers are 16 greedy tokens), six at a time, through the gateway's
OpenAI chat endpoint. Each conversation starts from a context of its own (a
"document" of about 800 tokens), so only its own earlier turns can be reused.
One run, one stack (nats-server, three workers, two gateways), three copies of
a tiny random-weight model under three ids, so that no case finds another's
cache:

- ``affine``: served by the three workers, through a gateway with affinity;
- ``free``: served by the three workers, through a gateway with ``--no-affinity``;
- ``solo``: served by one worker alone (every turn finds its conversation there).

``affinity_cached_share`` is the cached prompt tokens summed over all turns of
``affine`` over the same for ``solo``; ``no_affinity_cached_share`` the same for
``free``. ``--windows 0,0.3,1`` instead measures the worker's window under
overload (two slots per worker, twelve conversations at once): cached share and
turn latency per window.

    python -m bench.affinity [--windows 0,0.1,0.3,0.5,1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai

from bench.common import free_port, p50, percentile, ready
from cortex.broker.server import EmbeddedNats, stop_processes
from tests.tiny_model import CORPUS, build_tiny_model

CONVERSATIONS = 12
TURNS = 6
AT_ONCE = 6
ANSWER_TOKENS = 16
CASES = {"affine": "conv-affine", "free": "conv-free", "solo": "conv-solo"}
WORKERS = ["bench-a", "bench-b", "bench-c"]


def document(rng: random.Random, chars: int = 2400) -> str:
    """A conversation's own context: sentences of the tiny tokenizer's corpus, shuffled (about 800 tokens)."""
    words = " ".join(CORPUS).split()
    out: list[str] = []
    while sum(len(w) + 1 for w in out) < chars:
        out.append(rng.choice(words))
    return " ".join(out)


def conversation(client: openai.OpenAI, model: str, index: int) -> list[tuple[int, int, float]]:
    """Run one conversation; (prompt tokens, cached tokens, seconds) per turn."""
    rng = random.Random(index)
    messages: list[dict[str, str]] = [{"role": "system", "content": f"Conversation {index}. {document(rng)}"}]
    out = []
    for turn in range(TURNS):
        messages.append({"role": "user", "content": f"Question {turn}: {rng.choice(CORPUS)}"})
        started = time.monotonic()
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=ANSWER_TOKENS,  # type: ignore[arg-type]
                                               temperature=0)  # fmt: skip
        seconds = time.monotonic() - started
        usage = reply.usage
        assert usage is not None
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        out.append((usage.prompt_tokens, cached or 0, seconds))
        messages.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
    return out


def run_case(base: str, model: str, at_once: int = AT_ONCE) -> dict[str, Any]:
    client = openai.OpenAI(base_url=base, api_key="x", max_retries=2, timeout=120)
    started = time.monotonic()
    with ThreadPoolExecutor(at_once) as pool:
        turns = [t for conv in pool.map(lambda i: conversation(client, model, i), range(CONVERSATIONS)) for t in conv]
    latencies = [s for _, _, s in turns]
    return {
        "prompt_tokens": sum(p for p, _, _ in turns),
        "cached_tokens": sum(c for _, c, _ in turns),
        "turns_with_a_hit": sum(1 for _, c, _ in turns if c),
        "turns": len(turns),
        "turn_p50_ms": round(p50(latencies) * 1000, 1),
        "turn_p95_ms": round(percentile(latencies, 95) * 1000, 1),
        "seconds": round(time.monotonic() - started, 2),
    }


class Stack:
    """nats-server, the workers and two gateways (with and without affinity), on 127.0.0.1."""

    def __init__(self, tmp: Path, *, slots: int, window: float | None, solo: bool, name: str = "stack") -> None:
        self.tmp, self.slots, self.window, self.solo = tmp, slots, window, solo
        self.procs: list[subprocess.Popen[bytes]] = []
        (tmp / name).mkdir()
        self.nats = EmbeddedNats(store_dir=tmp / name, port=0, log_file=tmp / f"{name}.log")
        self.bases: dict[str, str] = {}

    def start(self) -> Stack:
        model = self.tmp / "model"
        if not (model / "config.json").exists():
            build_tiny_model(model)
        catalogue = self.tmp / "models.toml"
        catalogue.write_text("".join(f'[[models]]\nid = "{m}"\npath = "{model}"\ndtype = "float32"\nkeep_alive = -1\n'
                                     f"max_replicas = 3\n\n" for m in CASES.values()))  # fmt: skip
        self.nats.start()
        py = sys.executable
        for i, worker in enumerate(WORKERS):
            served = [CASES["affine"], CASES["free"]] + ([CASES["solo"]] if self.solo and i == 0 else [])
            args = [py, "-m", "cortex.worker", "--nats", self.nats.url, "--models", str(catalogue), "--device", "cpu",
                    "--slots", str(self.slots), "--worker-id", worker, "--prefix-cache-tokens", "65536",
                    "--log-level", "WARNING"]  # fmt: skip
            if self.window is not None:
                args += ["--affinity-window", str(self.window)]
            for m in served:
                args += ["--model", m]
            self.procs.append(subprocess.Popen(args, env=_env()))
        for case, flags in (("affine", []), ("free", ["--no-affinity"])):
            port = free_port()
            gateway = [py, "-m", "cortex.gateway", "--nats", self.nats.url, "--port", str(port), "--metrics-port", "-1",
                       "--log-level", "WARNING", *flags]  # fmt: skip
            self.procs.append(subprocess.Popen(gateway, env=_env()))
            self.bases[case] = f"http://127.0.0.1:{port}/v1"
        want = {CASES["affine"], CASES["free"]} | ({CASES["solo"]} if self.solo else set())
        deadline = time.monotonic() + 180
        while not all(ready(base, want) and _everywhere(base) for base in self.bases.values()):
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the affinity bench stack did not come up")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        stop_processes(self.procs, 20)
        self.nats.stop()


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}  # five processes share the cores: no thread pools each


def _everywhere(base: str) -> bool:
    """Every worker has the three-worker models ready."""
    try:
        with urllib.request.urlopen(f"{base}/models/{CASES['affine']}", timeout=2) as resp:
            affine = json.load(resp)
        with urllib.request.urlopen(f"{base}/models/{CASES['free']}", timeout=2) as resp:
            free = json.load(resp)
    except OSError:
        return False
    return len(affine.get("loaded_on", [])) == len(WORKERS) == len(free.get("loaded_on", []))


def measure() -> dict[str, object]:
    """The cached share of prompt tokens with three workers (with and without affinity) against one worker."""
    with tempfile.TemporaryDirectory(prefix="cortex-bench-affinity-") as tmp:
        stack = Stack(Path(tmp), slots=4, window=None, solo=True).start()
        try:
            results = {case: run_case(stack.bases["free" if case == "free" else "affine"], model)
                       for case, model in CASES.items()}  # fmt: skip
        finally:
            stack.stop()
    solo = results["solo"]["cached_tokens"] or 1
    return {
        "affinity_cached_share": round(results["affine"]["cached_tokens"] / solo, 3),
        "no_affinity_cached_share": round(results["free"]["cached_tokens"] / solo, 3),
        "affinity_turn_p50_ms": results["affine"]["turn_p50_ms"],
        "no_affinity_turn_p50_ms": results["free"]["turn_p50_ms"],
        "affinity_cases": results,
        "affinity_setup": {
            "workers": len(WORKERS),
            "slots": 4,
            "conversations": CONVERSATIONS,
            "turns": TURNS,
            "at_once": AT_ONCE,
            "answer_tokens": ANSWER_TOKENS,
        },
    }


def measure_windows(windows: list[float]) -> dict[str, object]:
    """Under overload (two slots per worker, every conversation at once): what each window buys and costs."""
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="cortex-bench-affinity-") as tmp:
        for window in windows:
            stack = Stack(Path(tmp), slots=2, window=window, solo=False, name=f"window-{window}").start()
            try:
                out[str(window)] = run_case(stack.bases["affine"], CASES["affine"], at_once=CONVERSATIONS)
            finally:
                stack.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", default="", help="comma-separated --affinity-window values to compare")
    args = parser.parse_args()
    if args.windows:
        print(json.dumps(measure_windows([float(w) for w in args.windows.split(",")])))
    else:
        print(json.dumps(measure()))


if __name__ == "__main__":
    main()
