"""The simulated fleet's catalogue and connections, shared by `bench.fleet_sim` and its processes (no torch here)."""

from __future__ import annotations

import asyncio
import logging
import random

from cortex.broker.bus import Bus
from cortex.broker.errors import BrokerError
from cortex.protocol import messages as m
from cortex.worker.catalogue import ModelSpec

log = logging.getLogger("bench.fleet_sim")

GIB = 2**30
BUDGET = 80 * GIB
"""Each simulated worker's memory budget: an 80 GB accelerator."""
FAMILIES = ("llama-3.1", "qwen2.5", "mistral", "gemma-2", "phi-3.5", "deepseek-r1-distill", "granite-3", "olmo-2")
SIZES = ((1.5, 2), (3, 4), (7, 8), (8, 9), (14, 16), (32, 36))
"""(billions of parameters, GiB the model needs as a 4-bit quant with its KV reserve)."""
QUANTS = ("q4_k_m", "q5_k_m", "q8_0", "fp16")


def catalogue(models: int) -> list[m.ModelCard]:
    """`models` cards shaped like a real catalogue's (ids, aliases, source, memory), the same in every process."""
    rng = random.Random(1234)
    cards = []
    for i in range(models):
        family, (params, need), quant = rng.choice(FAMILIES), rng.choice(SIZES), rng.choice(QUANTS)
        base = f"{family}-{params}b-instruct"
        model_id = f"org{i % 17}/{base}-{quant}-v{i}"
        cards.append(m.ModelCard(
            id=model_id,
            aliases=[f"{base}-{i}"],
            context_length=rng.choice((8192, 32768, 131072)),
            source=f"hf:org{i % 17}/{base}-{quant.upper()}-GGUF/{base}-{quant}.gguf",
            memory=need * GIB,
            priority=rng.choice((0, 0, 0, 1, 2)),
            keep_alive=rng.choice((300.0, 300.0, 600.0, 1800.0)),
            max_replicas=rng.choice((1, 1, 2, 4)),
        ))  # fmt: skip
    return cards


def specs(cards: list[m.ModelCard]) -> list[ModelSpec]:
    """The catalogue as a worker reads it (`Placements.keep_placed` walks it on every upkeep tick)."""
    return [ModelSpec(id=c.id, hf=c.source, aliases=c.aliases, context_length=c.context_length, memory=c.memory,
                      priority=c.priority, max_replicas=c.max_replicas) for c in cards]  # fmt: skip


async def open_bus(url: str, name: str) -> Bus:
    delay = 0.2
    while True:
        try:
            return await Bus.open(url, name=name)
        except BrokerError as exc:  # a burst of connections: the broker's API may be slow to answer for a moment
            log.warning("%s: %s, again", name, exc)
            await asyncio.sleep(delay)
            delay = min(2 * delay, 2.0)
