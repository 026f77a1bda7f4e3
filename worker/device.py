"""Which torch device a worker runs on, how much memory it has, and how much of it is in use."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class DeviceInfo:
    device: torch.device
    """Where inputs go (the first GPU of several)."""
    name: str
    devices: list[torch.device] = field(default_factory=list)
    """Every device the worker owns: one, or the GPUs of ``--gpu 0,1`` that large models spread over."""

    @property
    def label(self) -> str:
        return ",".join(str(d) for d in self.devices) if len(self.devices) > 1 else str(self.device)

    def memory(self) -> tuple[int, int]:
        """(total, free) bytes of the devices together (host RAM for the CPU)."""
        if self.device.type == "cuda":
            total = free = 0
            for device in self.devices or [self.device]:
                device_free, device_total = torch.cuda.mem_get_info(device)
                total, free = total + int(device_total), free + int(device_free)
            return total, free
        try:
            page = os.sysconf("SC_PAGE_SIZE")
            return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError):
            return 0, 0


def parse_gpus(text: str) -> list[int]:
    """``0`` or ``0,1`` into device indexes."""
    try:
        gpus = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--gpu {text!r}: give device indexes, e.g. 0 or 0,1") from None
    if not gpus or len(set(gpus)) != len(gpus) or min(gpus) < 0:
        raise ValueError(f"--gpu {text!r}: give distinct device indexes, e.g. 0 or 0,1")
    return gpus


def pick_device(gpus: list[int], requested: str | None) -> DeviceInfo:
    """CUDA devices `gpus` when CUDA is present (and not overridden), else the CPU."""
    if requested == "cpu" or (requested is None and not torch.cuda.is_available()):
        cpu = torch.device("cpu")
        return DeviceInfo(cpu, "cpu", [cpu])
    if not torch.cuda.is_available():
        raise RuntimeError(f"--device {requested} asked for, but CUDA is not available")
    present = torch.cuda.device_count()
    if max(gpus) >= present:
        raise RuntimeError(f"--gpu {','.join(map(str, gpus))}: only {present} CUDA device(s) present")
    devices = [torch.device("cuda", gpu) for gpu in gpus]
    return DeviceInfo(devices[0], torch.cuda.get_device_name(devices[0]), devices)


def memory_in_use(device: torch.device) -> int:
    """Bytes in use: allocated by torch on a GPU, the process's resident memory on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def release_memory(device: torch.device) -> int:
    """Hand freed memory back (garbage, the CUDA cache, glibc's free lists); the bytes in use afterwards."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
    return memory_in_use(device)
