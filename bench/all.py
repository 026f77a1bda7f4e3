"""`make bench`: the engine and the broker-hop benchmarks in one run; the last line is one JSON object.

python -m bench.all [--device cuda]
"""

from __future__ import annotations

import argparse
import json

from bench import engine, overhead


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    engine_result = engine.measure(args.device, args.tokens)
    print(json.dumps({"engine": engine_result}), flush=True)
    hop_result = overhead.measure()
    print(json.dumps({"overhead": hop_result}), flush=True)
    summary = {key: value for key, value in engine_result.items() if not isinstance(value, dict)}
    summary.update({key: value for key, value in hop_result.items() if not isinstance(value, dict)})
    summary["machine"] = engine_result["machine"]
    summary["engine_levels"] = engine_result["engine"]
    summary["engine_reference"] = engine_result["reference"]
    summary["hop_added_ttft_ms"] = hop_result["hop_added_ttft_ms"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
