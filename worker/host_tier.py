"""The host tier: models kept in host memory after they leave the device (``cortex-worker --host-cache 16GiB``).

A model evicted, unloaded for idleness or taken off this worker's placement is
parked here instead of freed, with everything its `LoadedModel` holds
(tokenizer, chat template, grammar caches), so loading it again is a copy back
to the device, a fraction of a second, where a load from disk (let alone a GGUF
conversion) takes seconds to minutes. On CUDA the weights move to pinned host
memory, which the copy back reads at full bus speed without staging; on a CPU
worker they already live in RAM and stay where they are. What the engine kept
for the model (its batch, its prefix cache) is not parked: a model back from
here starts afresh there, as after any load.

The tier is bounded by bytes: a model's parameters and buffers, and on CUDA
each tensor rounded up to a power of two, as torch's caching host allocator
rounds every pinned allocation; the least recently parked model is dropped
first. A park reserves its bytes before it copies, so two models parked at
once never both count on room only one of them can have. Freed pinned blocks
stay in torch's host cache until it is emptied, which the tier does after each
drop and each copy back (`_release_pinned`). It is thread-safe: models are
parked and taken on worker threads, listed from the event loop.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import time
from collections import OrderedDict
from typing import Any

import torch

from cortex.worker.loader import LoadedModel

log = logging.getLogger("cortex.worker")


def model_bytes(model: Any) -> int:
    """Bytes of a module's parameters and buffers (a tensor shared by two names counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total


def _spread(model: Any) -> bool:
    """Whether accelerate spread the model over several devices (``--gpu 0,1``): its hooks forbid moving it whole."""
    device_map = getattr(model, "hf_device_map", None) or {}
    return len(set(device_map.values())) > 1


def host_bytes(loaded: LoadedModel) -> int:
    """Bytes `loaded` takes parked: its tensors' own on a CPU worker; from a GPU, what the pinned copies take, each
    rounded up to a power of two by torch's caching host allocator (a 2.2 GB tensor takes 4 GiB there)."""
    if loaded.device.type != "cuda":
        return model_bytes(loaded.model)
    seen: set[int] = set()
    total = 0
    for tensor in (*loaded.model.parameters(), *loaded.model.buffers()):
        if id(tensor) not in seen and tensor.device.type != "cpu":
            seen.add(id(tensor))
            total += _pinned_size(tensor.numel() * tensor.element_size())
    return total


def _pinned_size(nbytes: int) -> int:
    return 1 << max(0, nbytes - 1).bit_length() if nbytes > 0 else 0


def _to_host(model: Any) -> None:
    """Move a CUDA model's tensors into pinned host memory, in place."""
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.device.type != "cpu":
                pinned = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
                pinned.copy_(tensor.data)
                tensor.data = pinned


def _release_pinned() -> None:
    """Hand the pinned blocks nothing uses any more back to the system: torch's host allocator keeps them cached
    (for the next pinned allocation of their size) until told otherwise. A no-op before CUDA is initialized, or with
    a torch without ``torch.accelerator.empty_host_cache``."""
    empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
    if empty is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        return
    gc.collect()  # a dropped model held in a reference cycle still holds its blocks
    empty()


class HostTier:
    """An LRU of parked `LoadedModel`s keyed by model id, holding at most `capacity` bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._room = threading.Condition()
        """Guards what follows; notified whenever bytes come free or a park's copy ends."""
        self._parked: OrderedDict[str, tuple[LoadedModel, int]] = OrderedDict()
        """Least recently parked first."""
        self._copying: dict[str, int] = {}
        """The bytes reserved by the parks under way, by model."""

    def models(self) -> list[str]:
        """The models parked, most recently parked first."""
        with self._room:
            return list(reversed(self._parked))

    def used(self) -> int:
        """Bytes held, and reserved by the parks under way."""
        with self._room:
            return self._used()

    def _used(self) -> int:
        return sum(size for _, size in self._parked.values()) + sum(self._copying.values())

    def __contains__(self, model: str) -> bool:
        with self._room:
            return model in self._parked

    def size_if_parked(self, loaded: LoadedModel) -> int | None:
        """The bytes `loaded` would take here; None if it cannot be parked at all (larger than the tier, or spread
        over several devices, whose accelerate hooks forbid moving it whole)."""
        if _spread(loaded.model):
            return None
        size = host_bytes(loaded)
        return size if size <= self.capacity else None

    def park(self, loaded: LoadedModel) -> list[str]:
        """Keep `loaded`, its weights moved to host memory; the models dropped to make room (its own id when it
        cannot be parked: `size_if_parked`).

        The room is made, and reserved, before the copy: host memory never holds
        more than the tier's size, even while two parks copy. A park that finds
        the room taken by another park's copy waits for that copy to end, then
        drops what it must. Blocks: call it on a worker thread.
        """
        model_id = loaded.spec.id
        size = self.size_if_parked(loaded)
        if size is None:
            return [model_id]
        dropped = []
        with self._room:
            self._parked.pop(model_id, None)
            while True:
                while self._parked and self._used() + size > self.capacity:
                    dropped.append(self._parked.popitem(last=False)[0])
                if self._used() + size <= self.capacity:
                    break
                self._room.wait()  # only other parks' reservations are left: their entries can go once parked
            self._copying[model_id] = size
        if dropped and loaded.device.type == "cuda":
            _release_pinned()
        try:
            if loaded.device.type == "cuda":
                _to_host(loaded.model)
        except BaseException:
            with self._room:
                del self._copying[model_id]
                self._room.notify_all()
            raise
        with self._room:
            del self._copying[model_id]
            self._parked[model_id] = (loaded, size)
            self._room.notify_all()
        return dropped

    def take(self, model: str) -> LoadedModel | None:
        """The parked model (out of the tier: it is the caller's now), or None."""
        with self._room:
            entry = self._parked.pop(model, None)
            self._room.notify_all()
        return entry[0] if entry is not None else None

    def clear(self) -> None:
        with self._room:
            self._parked.clear()
            self._room.notify_all()


def restore(loaded: LoadedModel) -> LoadedModel:
    """A parked model back on its device, ready to add to the engine (a fresh `LoadedModel`, same tokenizer).

    From pinned memory the copy is asynchronous; it is waited for here, so the
    engine never runs the model before its weights have arrived. The pinned
    blocks it leaves go back to the system at once.
    """
    started = time.monotonic()
    if loaded.device.type == "cuda":
        loaded.model.to(loaded.device, non_blocking=True)
        torch.cuda.synchronize(loaded.device)
        _release_pinned()
    seconds = time.monotonic() - started
    log.info("loaded %s on %s in %.2fs from the host tier", loaded.spec.id, loaded.device, seconds)
    return dataclasses.replace(loaded, load_seconds=seconds, from_host=True)
