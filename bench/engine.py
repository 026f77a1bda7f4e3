"""Engine throughput and latency against `model.generate`, on the default model, in one run.

Prints one JSON object. The engine is driven in-process (no HTTP, no NATS):
requests arrive together at each concurrency level and generate exactly
`--tokens` tokens (greedy, end token ignored), so every figure covers the same
work. References on the same prompts: sequential `model.generate` (one request
at a time) and one static padded batch through `model.generate`, the upper
bound of batching on this hardware. Ratios, not absolute times, are the result.

    python -m bench.engine [--device cuda] [--tokens 32] [--levels 1,4,16,32]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.common import machine, p50, percentile, prompts
from cortex.protocol import Chunk, GenerateRequest, Message, Sampling
from cortex.worker.catalogue import find_model, load_catalogue
from cortex.worker.device import pick_device
from cortex.worker.engine import Engine
from cortex.worker.loader import LoadedModel, load_model


@dataclass
class Timing:
    submitted: float
    first: float = 0.0
    end: float = 0.0
    tokens: int = 0
    done: threading.Event = field(default_factory=threading.Event)


def run_level(engine: Engine, model: str, texts: list[str], tokens: int, tag: str) -> dict[str, float]:
    timings: list[Timing] = []
    for i, text in enumerate(texts):
        timing = Timing(submitted=time.perf_counter())
        timings.append(timing)

        def emit(chunk: Chunk, t: Timing = timing) -> None:
            now = time.perf_counter()
            if chunk.tokens and not t.first:
                t.first = now
            if chunk.final:
                t.end, t.tokens = now, chunk.completion_tokens
                t.done.set()

        request = GenerateRequest(
            request_id=f"{tag}-{i}", model=model, messages=[Message(role="user", content=text)],
            sampling=Sampling(temperature=0.0, max_tokens=tokens, ignore_eos=True),
        )  # fmt: skip
        engine.submit(request, emit)
    for timing in timings:
        timing.done.wait(1800)
    start = min(t.submitted for t in timings)
    end = max(t.end for t in timings)
    ttfts = [t.first - t.submitted for t in timings]
    itls = [(t.end - t.first) / (t.tokens - 1) for t in timings if t.tokens > 1]
    total = sum(t.tokens for t in timings)
    return {
        "tokens_per_s": total / (end - start),
        "ttft_p50_s": p50(ttfts),
        "ttft_p99_s": percentile(ttfts, 99),
        "itl_p50_s": p50(itls),
        "requests": len(timings),
    }


def prompt_ids(loaded: LoadedModel, texts: list[str]) -> list[list[int]]:
    return [loaded.render_prompt([Message(role="user", content=t)]) for t in texts]


def padded(loaded: LoadedModel, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(x) for x in ids)
    pad = loaded.tokenizer.pad_token_id
    pad = int(pad if pad is not None else next(iter(loaded.eos_ids)))
    input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return input_ids.to(loaded.device), mask.to(loaded.device)


def sync(loaded: LoadedModel) -> None:
    if loaded.device.type == "cuda":
        torch.cuda.synchronize(loaded.device)


def generate_tps(loaded: LoadedModel, ids: list[list[int]], tokens: int) -> float:
    input_ids, mask = padded(loaded, ids)
    pad = int(input_ids[0, 0]) if (mask[:, 0] == 0).any() else int(next(iter(loaded.eos_ids)))
    sync(loaded)
    start = time.perf_counter()
    with torch.inference_mode():
        out = loaded.model.generate(
            input_ids=input_ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
            do_sample=False, pad_token_id=pad,
        )  # fmt: skip
    sync(loaded)
    elapsed = time.perf_counter() - start
    return (out.shape[1] - input_ids.shape[1]) * len(ids) / elapsed


def batched_prefill_s(loaded: LoadedModel, ids: list[list[int]]) -> float:
    input_ids, mask = padded(loaded, ids)
    times = []
    with torch.inference_mode():
        for _ in range(3):
            sync(loaded)
            start = time.perf_counter()
            loaded.model(input_ids=input_ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
            sync(loaded)
            times.append(time.perf_counter() - start)
    return p50(times)


def measure(device: str | None = None, tokens: int = 32, levels: tuple[int, ...] = (1, 4, 16, 32),
            model: str = "smollm2-135m-instruct", models: Path | None = None) -> dict[str, object]:  # fmt: skip
    info = pick_device([0], device)
    spec = find_model(load_catalogue(models), model)
    loaded = load_model(spec, info.device)
    engine = Engine(worker_id="bench")
    engine.start()
    engine.add_model(loaded)
    try:
        run_level(engine, spec.id, prompts(4), 8, "warmup")
        single = [run_level(engine, spec.id, prompts(1), tokens, f"one{i}") for i in range(3)]
        results = {"1": {k: p50([s[k] for s in single]) for k in single[0]}}
        # The ratios compare 16 streams with one, so both always run whatever --levels says.
        for level in sorted(set(levels) | {16}):
            if level != 1:
                results[str(level)] = run_level(engine, spec.id, prompts(level), tokens, f"c{level}")
    finally:
        engine.stop()
    ids16 = prompt_ids(loaded, prompts(16))
    sequential = sum(generate_tps(loaded, [x], tokens) for x in ids16[:4]) / 4
    static = generate_tps(loaded, ids16, tokens)
    prefill = batched_prefill_s(loaded, ids16)
    at16 = results["16"]
    return {
        "engine_vs_static_at_16": round(at16["tokens_per_s"] / static, 3),
        "engine_vs_sequential_at_16": round(at16["tokens_per_s"] / sequential, 3),
        "ttft_p50_16_vs_batched_prefill": round(at16["ttft_p50_s"] / prefill, 3),
        "itl_p50_ratio_16_vs_1": round(at16["itl_p50_s"] / results["1"]["itl_p50_s"], 3),
        "engine": {level: {k: round(v, 4) for k, v in r.items()} for level, r in results.items()},
        "reference": {
            "sequential_generate_tokens_per_s": round(sequential, 2),
            "static_batch_16_generate_tokens_per_s": round(static, 2),
            "batched_prefill_16_s": round(prefill, 4),
            "tokens_per_request": tokens,
            "model": spec.id,
        },
        "machine": machine(str(info.device)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--levels", default="1,4,16,32")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--models", type=Path, default=None)
    args = parser.parse_args()
    levels = tuple(int(x) for x in args.levels.split(","))
    print(json.dumps(measure(args.device, args.tokens, levels, args.model, args.models)))


if __name__ == "__main__":
    main()
