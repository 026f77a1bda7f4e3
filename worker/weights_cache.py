"""A converted-weights cache: a model's weights as they run, so the next load maps them instead of converting.

Loading the bundled SmolLM2 GGUF takes seconds, nearly all of it dequantising (and parsing its
tokenizer out of the GGUF); the same model saved once as a transformers folder in the dtype it
runs in loads memory-mapped in a fraction of that. The first load of a model whose weights need
converting writes such a folder (``model.safetensors``, ``config.json``, the tokenizer files) to
``<root>/<key>/``; later loads build the model and tokenizer from it.

Which loads are cached: GGUF sources always (they are always converted); folder sources only
when the folder's stated dtype (``config.json``) is not the dtype the model runs in, since a
safetensors folder already in that dtype maps as fast as a cache entry would.

The key is the sha256 of the source files' identity (absolute path, size, ``mtime_ns`` and a
sha256 of the first and last MiB of each), the dtype, the transformers version and this module's
format number. A full content hash would be exact but reads the whole file on every load: 0.07 s
for the 98 MB SmolLM2 GGUF (from the page cache), tens of seconds for a cold 15 GB model, which
is what the cache is there to save. Size and mtime catch a file replaced in the ordinary ways; the
edge hashes catch a copy that kept the mtime (``cp -p``) of different content with the same size.

An entry is written in a temporary folder beside it and renamed into place, so a reader sees a
whole entry or none; it records each file's size in ``cortex-weights.json``, written last. An entry
that fails to load (missing manifest, a size that differs, a file transformers cannot read, a
missing or unexpected tensor) is logged, deleted and the model is loaded from its source, which
writes the entry again. Bytes flipped inside a tensor of the right size are not detected: hashing
the entry on every load would cost what the cache saves.

Disk use: an entry is as large as the model in its dtype (SmolLM2-135M: 540 MB in float32, 270 MB
in bfloat16). Writing an entry deletes the entries it supersedes (same source paths and dtype,
another key: the source changed or transformers was upgraded) and temporary folders left by a
crash more than an hour ago, so the cache holds at most one entry per model file and dtype.
There is no size cap; delete the folder to empty it (``--weights-cache none`` turns it off).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cortex.worker.catalogue import ModelSpec

log = logging.getLogger("cortex.worker")

FORMAT = 1
"""Changes when an entry's layout does: older entries get other keys and are superseded."""
MANIFEST = "cortex-weights.json"
_EDGE = 1 << 20
_STALE_TEMP_S = 3600.0


class CacheError(Exception):
    """A cache entry is incomplete or unreadable (it is deleted and the model loaded from its source)."""


def parse_root(value: str | None) -> Path | None:
    """The ``--weights-cache`` option: a folder, or ``''`` / ``none`` for no cache."""
    if value is None or value.strip().lower() in ("", "none"):
        return None
    return Path(value).expanduser()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _local_folder(spec: ModelSpec, folder: str) -> Path | None:
    """The folder on disk holding the source (a hub id is looked up in the local hub cache only)."""
    if not spec.hf:
        return Path(folder)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec.hf, local_files_only=True))
    except Exception:  # not in the local cache, or no hub library: no cache entry either
        return None


def _source_dtype(folder: Path) -> str | None:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    value = (config.get("dtype") or config.get("torch_dtype")) if isinstance(config, dict) else None
    return value if isinstance(value, str) else None


def source_files(spec: ModelSpec, folder: str, dtype: torch.dtype) -> list[Path] | None:
    """The files a load of `spec` in `dtype` reads, or None where caching it gains nothing (or cannot be keyed)."""
    local = _local_folder(spec, folder)
    if local is None or not local.is_dir():
        return None
    if not spec.gguf_file and _source_dtype(local) in (None, dtype_name(dtype)):
        return None  # already in the dtype it runs in (or unknown): it maps as fast as an entry would
    # Everything at the top of the folder (config and tokenizer files too), but other GGUF files.
    files = [p for p in local.iterdir() if p.is_file() and (p.suffix != ".gguf" or p.name == spec.gguf_file)]
    return sorted(files) or None


def _identity(path: Path) -> list[object]:
    stat = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        digest.update(fh.read(_EDGE))
        if stat.st_size > 2 * _EDGE:
            fh.seek(-_EDGE, os.SEEK_END)
            digest.update(fh.read(_EDGE))
        elif stat.st_size > _EDGE:
            digest.update(fh.read())
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns, digest.hexdigest()]


def cache_key(files: list[Path], dtype: torch.dtype) -> str:
    import transformers

    identity = {
        "format": FORMAT,
        "files": [_identity(f) for f in files],
        "dtype": dtype_name(dtype),
        "transformers": transformers.__version__,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Entry:
    """One model's converted weights, tokenizer and config under `root`/`key`, present or not yet."""

    root: Path
    key: str
    model_id: str
    sources: tuple[str, ...]
    dtype: torch.dtype

    @property
    def path(self) -> Path:
        return self.root / self.key

    def present(self) -> bool:
        return self.path.is_dir()

    def load(self, **kwargs: Any) -> tuple[Any, Any]:
        """Tokenizer and model from the entry (`kwargs` for the model's ``from_pretrained``); raises CacheError."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            manifest = json.loads((self.path / MANIFEST).read_text())
            for name, size in manifest["files"].items():
                if (self.path / name).stat().st_size != size:
                    raise CacheError(f"{name} is not the size it was written with")
            tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            loaded: Any = AutoModelForCausalLM.from_pretrained(
                self.path, dtype=self.dtype, local_files_only=True, output_loading_info=True, **kwargs
            )
            model, info = loaded  # with output_loading_info: the model and what did not fit it
        except CacheError:
            raise
        except Exception as exc:  # whatever a damaged folder makes json, safetensors or transformers raise
            raise CacheError(f"{type(exc).__name__}: {exc}") from exc
        wrong = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if wrong:
            raise CacheError(f"the weights do not fit the model: {wrong}")
        return tokenizer, model

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def store(self, model: Any, tokenizer: Any) -> bool:
        """Write the entry from a model just loaded from its source; False (and a warning) if it could not be."""
        started = time.monotonic()
        temp: Path | None = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            temp = Path(tempfile.mkdtemp(prefix=f".tmp-{self.key}-", dir=self.root))
            _write_model(model, temp)
            tokenizer.save_pretrained(temp)
            manifest = {
                "format": FORMAT,
                "model": self.model_id,
                "dtype": dtype_name(self.dtype),
                "sources": list(self.sources),
                "files": {p.name: p.stat().st_size for p in sorted(temp.iterdir()) if p.is_file()},
            }
            (temp / MANIFEST).write_text(json.dumps(manifest, indent=1))
            try:
                temp.rename(self.path)
            except OSError:
                if not self.present():
                    raise
                shutil.rmtree(temp, ignore_errors=True)  # another worker wrote it first
            temp = None
        except Exception as exc:  # a full disk or an unwritable folder costs the cache, never the load
            log.warning("could not write the weights cache for %s in %s: %s", self.model_id, self.root, exc)
            if temp is not None:
                shutil.rmtree(temp, ignore_errors=True)
            return False
        self._prune()
        log.info("wrote the weights cache for %s in %.1fs: %s", self.model_id, time.monotonic() - started, self.path)
        return True

    def _prune(self) -> None:
        """Delete entries this one supersedes, and temporary folders a crashed writer left."""
        for child in self.root.iterdir():
            if child.name == self.key or not child.is_dir():
                continue
            if child.name.startswith(".tmp-"):
                try:
                    if time.time() - child.stat().st_mtime > _STALE_TEMP_S:
                        shutil.rmtree(child, ignore_errors=True)
                except OSError:
                    pass
                continue
            try:
                other = json.loads((child / MANIFEST).read_text())
            except (OSError, ValueError):
                continue
            if other.get("sources") == list(self.sources) and other.get("dtype") == dtype_name(self.dtype):
                log.info("deleting superseded weights cache entry %s", child)
                shutil.rmtree(child, ignore_errors=True)


def _write_model(model: Any, folder: Path) -> None:
    """Config, generation config and weights, as ``save_pretrained`` would write them.

    Not ``save_pretrained`` itself: a model loaded from GGUF carries a GGUF "quantization" config
    (it is dequantized in fact) and transformers refuses to save it.
    """
    from safetensors.torch import save_model

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True))
    model.generation_config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})


def entry_for(root: Path | None, spec: ModelSpec, folder: str, dtype: torch.dtype) -> Entry | None:
    """The cache entry for loading `spec` from `folder` in `dtype`, or None where nothing is cached."""
    if root is None:
        return None
    try:
        files = source_files(spec, folder, dtype)
        if files is None:
            return None
        key = cache_key(files, dtype)
    except OSError as exc:
        log.warning("no weights cache for %s: %s", spec.id, exc)
        return None
    return Entry(root=root, key=key, model_id=spec.id, sources=tuple(str(f.resolve()) for f in files), dtype=dtype)
