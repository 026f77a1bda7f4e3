"""Helpers shared by the benchmarks: percentiles, the default model, machine facts."""

from __future__ import annotations

import os
import platform
import statistics

import torch

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain how a refrigerator works.",
    "What are the three primary colours?",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
    "Tell me a joke about computers.",
    "Summarise the plot of Hamlet.",
    "How do airplanes stay in the air?",
    "List five animals that live in the desert.",
    "What is the capital of Australia and why?",
    "Describe a sunset in two sentences.",
    "How do I make a cup of tea?",
    "What does a compiler do?",
    "Name three famous painters.",
    "Why do cats purr?",
    "Explain photosynthesis simply.",
]


def prompts(n: int) -> list[str]:
    return [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" (variant {i})") for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def p50(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine(device: str) -> dict[str, object]:
    return {
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
        "python": platform.python_version(),
    }
