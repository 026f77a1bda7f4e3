"""Single-stream speed of a running Cortex stack, printed as one JSON object.

::

    make run &                       # or cortexctl up
    .venv/bin/python bench/single_stream.py --base-url http://127.0.0.1:31313/v1

Sends `--requests` streamed chat completions one after another (greedy, a fixed
prompt; the model may end before `--max-tokens`)
and reports time to first token and generation speed measured at the client.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import httpx


def one(client: httpx.Client, url: str, model: str, max_tokens: int) -> tuple[float, float, int]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper and the sea."}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first: float | None = None
    tokens = 0
    with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
    end = time.perf_counter()
    first = first or end
    return first - start, end - first, tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", default="http://127.0.0.1:31313/v1")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    url = f"{args.base_url}/chat/completions"
    ttfts, rates, counts = [], [], []
    with httpx.Client(timeout=300) as client:
        one(client, url, args.model, 8)  # warm-up
        for _ in range(args.requests):
            ttft, gen, tokens = one(client, url, args.model, args.max_tokens)
            ttfts.append(ttft)
            counts.append(tokens)
            if tokens > 1 and gen > 0:
                rates.append((tokens - 1) / gen)
    print(
        json.dumps(
            {
                "model": args.model,
                "requests": args.requests,
                "completion_tokens_mean": statistics.mean(counts),
                "ttft_ms_p50": round(statistics.median(ttfts) * 1000, 1),
                "tokens_per_s_p50": round(statistics.median(rates), 1) if rates else None,
                "machine": {"platform": platform.platform(), "python": platform.python_version()},
            }
        )
    )


if __name__ == "__main__":
    main()
