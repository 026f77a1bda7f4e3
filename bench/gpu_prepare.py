"""Prepare `.gpu/` for bench/gpu.sh: the default model's config and tokenizer, and the wheels the GPU image lacks.

The default model's GGUF (98 MB) is larger than what travels to a GPU machine,
so the GPU run uses the same architecture and tokenizer with random weights,
built there: throughput and latency do not depend on the weights' values (the
benchmark ignores the end token).
"""

from __future__ import annotations

import sys
from pathlib import Path

from cortex.worker.catalogue import find_model, load_catalogue


def main(out: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    spec = find_model(load_catalogue(None), "smollm2-135m-instruct")
    folder = spec.resolve_folder()
    target = out / "smollm2-random"
    target.mkdir(parents=True, exist_ok=True)
    AutoTokenizer.from_pretrained(folder, gguf_file=spec.gguf_file).save_pretrained(target)
    AutoConfig.from_pretrained(folder, gguf_file=spec.gguf_file).save_pretrained(target)
    (out / "models.toml").write_text(
        '[[models]]\nid = "smollm2-random"\npath = "/tmp/cortex-gpu/smollm2-random"\ndtype = "auto"\n'
        "context_length = 8192\n"
    )
    print(target)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
