"""Which torch device a worker runs on, and how much memory it has."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceInfo:
    device: torch.device
    name: str

    @property
    def label(self) -> str:
        return str(self.device)

    def memory(self) -> tuple[int, int]:
        """(total, free) bytes of the device (host RAM for the CPU)."""
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            return int(total), int(free)
        try:
            page = os.sysconf("SC_PAGE_SIZE")
            return page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError):
            return 0, 0


def pick_device(gpu: int, requested: str | None) -> DeviceInfo:
    """CUDA device `gpu` when CUDA is present (and not overridden), else the CPU."""
    if requested == "cpu" or (requested is None and not torch.cuda.is_available()):
        return DeviceInfo(torch.device("cpu"), "cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(f"--device {requested} asked for, but CUDA is not available")
    if gpu >= torch.cuda.device_count():
        raise RuntimeError(f"--gpu {gpu}: only {torch.cuda.device_count()} CUDA device(s) present")
    device = torch.device("cuda", gpu)
    return DeviceInfo(device, torch.cuda.get_device_name(device))
