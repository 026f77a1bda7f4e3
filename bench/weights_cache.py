"""The converted-weights cache: loading a model from its source vs from the cache entry its first load wrote.

python -m bench.weights_cache [--model smollm2-135m-instruct] [--device cpu]

Three loads through the worker's loader, with a fresh temporary cache: the first cached load (the
source, plus writing the entry), one with no cache (the source, as before the cache) and the
second cached load (the entry). Checks the entry gives the same logits, then prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from cortex.worker.catalogue import find_model, load_catalogue
from cortex.worker.loader import LoadedModel, load_model


def _logits(loaded: LoadedModel) -> torch.Tensor:
    ids = torch.tensor([loaded.tokenize("The capital of France is")], device=loaded.device)
    with torch.no_grad():
        return loaded.model(ids).logits.float().cpu()


def measure(model: str = "smollm2-135m-instruct", device: str = "cpu") -> dict[str, object]:
    spec = find_model(load_catalogue(None), model)
    where = torch.device(device)
    root = Path(tempfile.mkdtemp(prefix="cortex-weights-bench-"))
    try:
        started = time.monotonic()
        load_model(spec, where, weights_cache=root)
        first_s = time.monotonic() - started  # also pays the one-off start-up of torch and transformers
        started = time.monotonic()
        reference = _logits(load_model(spec, where))
        source_s = time.monotonic() - started
        started = time.monotonic()
        cached = load_model(spec, where, weights_cache=root)
        cached_s = time.monotonic() - started
        same = torch.equal(_logits(cached), reference)
        size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "model": spec.id,
        "device": device,
        "source_load_s": round(source_s, 2),
        "first_load_with_write_s": round(first_s, 2),
        "cached_load_s": round(cached_s, 2),
        "from_cache": cached.from_cache,
        "same_logits": same,
        "entry_mb": round(size / 1e6),
        "weights_cache_speedup": round(source_s / cached_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    print(json.dumps({"weights_cache": measure(args.model, args.device)}))


if __name__ == "__main__":
    main()
