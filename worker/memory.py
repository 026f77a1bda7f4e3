"""How much memory a model needs before it is loaded, and sizes and durations as people write them.

The estimate is what placement and eviction plan with: the weights (their
parameter count, from the safetensors headers or the GGUF tensor table, times
the bytes per parameter of the dtype they load in; GGUF files are dequantised
by transformers) plus a KV-cache reserve. A catalogue's ``memory`` overrides it.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

from cortex.protocol.messages import KEEP_FOREVER

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", re.IGNORECASE)
_DURATION = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*")
_SECONDS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
KV_RESERVE_SHARE = 0.25
"""KV-cache reserve as a share of the weights, at least `KV_RESERVE_MIN`."""
KV_RESERVE_MIN = 64 * 2**20
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def parse_size(value: str | int) -> int:
    """Bytes from ``2GiB``, ``512MB``, ``1.5G`` or a plain number of bytes."""
    if isinstance(value, int):
        return value
    match = _SIZE.fullmatch(value)
    if match is None:
        raise ValueError(f"not a size: {value!r} (write e.g. 2GiB or 512MiB)")
    number, unit, binary = float(match.group(1)), match.group(2).upper(), bool(match.group(3))
    power = " KMGT".index(unit or " ")
    return int(number * (1024 if binary or not unit else 1000) ** power)


def parse_duration(value: str | float) -> float:
    """Seconds from ``5m``, ``30s``, ``1h``, a number of seconds, ``0`` (at once) or ``-1`` (forever)."""
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.fullmatch(value)
        if match is None:
            raise ValueError(f"not a duration: {value!r} (write e.g. 5m, 30s, 0 or -1)")
        seconds = float(match.group(1)) * _SECONDS[match.group(2)]
    return KEEP_FOREVER if seconds < 0 else seconds


def _safetensors_params(path: Path) -> int:
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    total = 0
    for name, tensor in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for dim in tensor["shape"]:
            count *= int(dim)
        total += count
    return total


def _gguf_params(path: Path) -> int:
    from gguf import GGUFReader

    return sum(int(t.n_elements) for t in GGUFReader(str(path)).tensors)


def parameter_count(folder: Path, gguf_file: str | None) -> int:
    """Parameters of the weights in `folder` (0 if they cannot be read without loading them)."""
    try:
        if gguf_file:
            return _gguf_params(folder / gguf_file)
        return sum(_safetensors_params(p) for p in sorted(folder.glob("*.safetensors")))
    except (OSError, ValueError, KeyError, struct.error):
        return 0


def estimate(folder: Path, gguf_file: str | None, dtype: str) -> int:
    """Bytes to load the model in `dtype` (``float32``, ``bfloat16``...) with its KV reserve; 0 if unknown."""
    weights = parameter_count(folder, gguf_file) * DTYPE_BYTES.get(dtype, 4)
    if not weights:
        return 0
    return weights + max(int(weights * KV_RESERVE_SHARE), KV_RESERVE_MIN)
