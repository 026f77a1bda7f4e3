"""The converted-weights cache, through the real loader on a real (tiny) model folder.

The tiny model is saved in float32 and loaded as bfloat16, a conversion, so the cache applies
exactly as it does for a GGUF file (the bundled GGUF takes 10+ s to load: too slow here).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from cortex.worker.catalogue import ModelSpec
from cortex.worker.loader import LoadedModel, load_model
from cortex.worker.weights_cache import MANIFEST, entry_for, parse_root

CPU = torch.device("cpu")
TEXT = "The quick brown fox: naïve café 🙂"


@pytest.fixture
def source(tmp_path: Path, tiny_model_dir: Path) -> Path:
    """A copy of the tiny model each test may change."""
    return Path(shutil.copytree(tiny_model_dir, tmp_path / "source"))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def spec_for(source: Path, dtype: str = "bfloat16") -> ModelSpec:
    return ModelSpec(id="tiny-cached", path=str(source), dtype=dtype)


def entries(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []


def logits(loaded: LoadedModel) -> torch.Tensor:
    ids = torch.tensor([loaded.tokenize(TEXT)])
    with torch.no_grad():
        return loaded.model(ids).logits


def test_first_load_writes_the_entry_and_the_next_maps_it(source: Path, root: Path) -> None:
    spec = spec_for(source)
    plain = load_model(spec, CPU)
    first = load_model(spec, CPU, weights_cache=root)
    assert not plain.from_cache and not first.from_cache
    [entry] = entries(root)
    manifest = json.loads((entry / MANIFEST).read_text())
    assert manifest["dtype"] == "bfloat16" and "model.safetensors" in manifest["files"]

    cached = load_model(spec, CPU, weights_cache=root)
    assert cached.from_cache
    assert next(cached.model.parameters()).dtype == torch.bfloat16
    assert torch.equal(logits(cached), logits(plain))
    assert cached.tokenize(TEXT) == plain.tokenize(TEXT)
    assert cached.tokenizer.chat_template == plain.tokenizer.chat_template
    assert cached.eos_ids == plain.eos_ids
    assert cached.context_length == plain.context_length
    assert entries(root) == [entry]


@pytest.mark.parametrize("damage", ["truncated", "garbled-header"])
def test_a_damaged_entry_is_deleted_loaded_from_source_and_rewritten(source: Path, root: Path, damage: str) -> None:
    spec = spec_for(source)
    reference = logits(load_model(spec, CPU, weights_cache=root))
    [entry] = entries(root)
    weights = entry / "model.safetensors"
    data = weights.read_bytes()
    # Truncated: the manifest's size check catches it. Same size, header garbled: safetensors does.
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 64 + data[64:])

    fallback = load_model(spec, CPU, weights_cache=root)
    assert not fallback.from_cache
    assert torch.equal(logits(fallback), reference)
    assert weights.read_bytes() == data  # written again, whole

    again = load_model(spec, CPU, weights_cache=root)
    assert again.from_cache
    assert torch.equal(logits(again), reference)


def test_a_changed_source_gets_a_new_key_and_supersedes_the_old_entry(source: Path, root: Path) -> None:
    spec = spec_for(source)
    load_model(spec, CPU, weights_cache=root)
    [old] = entries(root)
    key = old.name
    weights = source / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    touched = entry_for(root, spec, str(source), torch.bfloat16)
    assert touched is not None and touched.key != key
    config = source / "config.json"
    config.write_text(config.read_text() + "\n")  # same JSON, another size
    resized = entry_for(root, spec, str(source), torch.bfloat16)
    assert resized is not None and resized.key not in (key, touched.key)

    reloaded = load_model(spec, CPU, weights_cache=root)
    assert not reloaded.from_cache
    assert [e.name for e in entries(root)] == [resized.key]  # the superseded entry is gone


def test_weights_already_in_the_dtype_they_run_in_are_not_cached(source: Path, root: Path) -> None:
    spec = spec_for(source, dtype="float32")
    assert entry_for(root, spec, str(source), torch.float32) is None
    assert not load_model(spec, CPU, weights_cache=root).from_cache
    assert entries(root) == []


def test_the_option_turns_the_cache_off_with_none_or_nothing() -> None:
    assert parse_root("") is None and parse_root("none") is None and parse_root("None") is None
    assert parse_root("~/w") == Path.home() / "w"
