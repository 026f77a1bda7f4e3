"""`make bench`: every benchmark in one run; the last line is one JSON object with every key.

python -m bench.all [--device cuda]

Each part prints its own JSON line as it finishes (engine, the broker hop, model
swaps, conversation affinity, the gateway at scale, the fleet at
scale: `bench.fleet_sim`'s small size); the summary last holds each
part's top-level figures, so a ratio's two sides always come from this run.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from bench import affinity, engine, fleet_sim, gateway_scale, overhead, swap


def _top_level(result: dict[str, object]) -> dict[str, object]:
    """A part's figures without its detail (nested objects stay in the part's own line)."""
    return {key: value for key, value in result.items() if not isinstance(value, dict | list) and key != "machine"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    engine_result = engine.measure(args.device, args.tokens)
    print(json.dumps({"engine": engine_result}), flush=True)
    parts: list[tuple[str, Callable[[], dict[str, object]]]] = [
        ("overhead", overhead.measure),
        ("swap", lambda: swap.measure(device=args.device)),
        ("affinity", affinity.measure),
        ("gateway_scale", gateway_scale.measure),
        ("fleet_sim", fleet_sim.measure),  # the small size: 20 workers x 100 models, 3 gateways
    ]
    summary = _top_level(engine_result)
    results: dict[str, dict[str, object]] = {}
    for name, measure in parts:
        results[name] = measure()
        print(json.dumps({name: results[name]}), flush=True)
        summary.update(_top_level(results[name]))
    summary["machine"] = engine_result["machine"]
    summary["engine_levels"] = engine_result["engine"]
    summary["engine_reference"] = engine_result["reference"]
    summary["hop_added_ttft_ms"] = results["overhead"]["hop_added_ttft_ms"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
