"""The host tier: its LRU and byte bound on its own, then a worker swapping two models through it.

The worker has room for one of its two models (100 MiB each by the catalogue,
150 MiB of budget) and a host tier (``--host-cache 64MiB``, the tiny model
taking well under 1 MiB): asking for the other model parks the first in host
memory, and asking for the first again brings it back from there.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec
import openai
import pytest
import torch

from cortex.broker.bus import Bus
from cortex.broker.ctl import _print_status
from cortex.broker.server import EmbeddedNats
from cortex.protocol import WorkerAdvert, codec, names
from cortex.worker.catalogue import ModelSpec
from cortex.worker.host_tier import HostTier, _pinned_size, model_bytes, restore
from cortex.worker.loader import LoadedModel
from tests.conftest import Gateway, get_json, on_bus, start_worker, stop_process, wait_for, write_catalogue

WORKER = "host-tier-w"
PROMPT = [{"role": "user", "content": "The quick brown fox"}]


def parked_model(model_id: str, floats: int) -> LoadedModel:
    """A `LoadedModel` around a module of `floats` float32 parameters (4 bytes each)."""
    module = torch.nn.Linear(floats, 1, bias=False)
    return LoadedModel(spec=ModelSpec(id=model_id, path="-"), model=module, tokenizer=None, device=torch.device("cpu"),
                       context_length=16, eos_ids=frozenset())  # fmt: skip


def test_the_tier_keeps_the_most_recently_parked_within_its_bytes() -> None:
    tier = HostTier(capacity=1000)
    a, b, c = parked_model("a", 100), parked_model("b", 100), parked_model("c", 60)
    assert model_bytes(a.model) == 400
    assert tier.park(a) == [] and tier.park(b) == []
    assert tier.models() == ["b", "a"] and tier.used() == 800
    assert tier.park(c) == ["a"]  # 1,000 bytes would not hold a, b and c: the least recently parked goes
    assert tier.models() == ["c", "b"] and tier.used() == 640 and "a" not in tier
    assert tier.park(parked_model("huge", 300)) == ["huge"]  # larger than the whole tier: never kept
    assert tier.models() == ["c", "b"]
    taken = tier.take("b")
    assert taken is b and tier.models() == ["c"] and tier.used() == 240 and tier.take("b") is None
    back = restore(taken)
    assert back.from_host and back.model is b.model and back.spec == b.spec


def test_what_the_tier_cannot_hold_is_known_before_it_is_taken_out_of_the_engine() -> None:
    tier = HostTier(capacity=1000)
    assert tier.size_if_parked(parked_model("fits", 250)) == 1000
    assert tier.size_if_parked(parked_model("huge", 251)) is None
    spread = parked_model("spread", 10)
    spread.model.hf_device_map = {"model.layers.0": 0, "lm_head": 1}  # as accelerate marks a model over two GPUs
    assert tier.size_if_parked(spread) is None and tier.park(spread) == ["spread"] and tier.used() == 0
    # From a GPU, torch's caching host allocator rounds each pinned block up to a power of two: so does the count.
    assert [_pinned_size(n) for n in (0, 1, 3, 4096, 4097)] == [0, 1, 4, 4096, 8192]


@pytest.fixture(scope="module")
def host_tier_log(
    nats_server: EmbeddedNats, gateway: Gateway, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory,
    logs_dir: Path,
) -> Iterator[Path]:  # fmt: skip
    catalogue = write_catalogue(tmp_path_factory.mktemp("host-tier") / "models.toml", tiny_model_dir,
                                ("ht-a", "ht-b"), dtype="float32", memory="100MiB")  # fmt: skip
    log = logs_dir / "host-tier.log"
    proc = start_worker(nats_server.url, catalogue, log, "--device", "cpu", "--slots", "2", "--worker-id", WORKER,
                        "--memory-budget", "150MiB", "--host-cache", "64MiB")  # fmt: skip
    wait_for(lambda: "ht-a" in {m["id"] for m in get_json(f"{gateway.base_url}/models")["data"]}, timeout=60,  # type: ignore[index]
             what="host-tier worker", proc=proc)  # fmt: skip
    yield log
    stop_process(proc)


def advert(nats_server: EmbeddedNats) -> WorkerAdvert:
    return codec.decode_advert(on_bus(nats_server.url, Bus.read_fleet)[names.worker_key(WORKER)])


def answer(gateway: Gateway, model: str) -> str:
    client = openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0, timeout=60)
    reply = client.chat.completions.create(model=model, messages=PROMPT, max_tokens=12, temperature=0)  # type: ignore[arg-type]
    return reply.choices[0].message.content or ""


def test_a_model_back_from_the_host_tier_answers_as_before(
    nats_server: EmbeddedNats, gateway: Gateway, host_tier_log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = answer(gateway, "ht-a")
    assert before
    answer(gateway, "ht-b")  # no room for both: ht-a goes to the host tier
    wait_for(lambda: advert(nats_server).host_cached == ["ht-a"], timeout=15, what="ht-a parked in the advert")
    parked = advert(nats_server)
    assert parked.state_of("ht-a") is None and parked.memory_used == 100 * 2**20  # only ht-b counts on the device
    assert parked.host_cache_bytes == 64 * 2**20 and 0 < parked.host_cache_used < 2**20
    _print_status([msgspec.to_builtins(parked)])  # what `cortexctl status` prints for it
    assert "ht-b (ready, 0 running, 0 queued); host tier: ht-a (0.0/0.1 GiB)" in capsys.readouterr().out

    assert answer(gateway, "ht-a") == before  # the same weights, tokenizer and chat template
    log = host_tier_log.read_text()
    assert "loaded ht-a on cpu in" in log and "from the host tier" in log
    assert "parked in the host tier" in log
    wait_for(lambda: advert(nats_server).host_cached == ["ht-b"], timeout=15, what="ht-b parked in its turn")
    lifecycle = advert(nats_server).lifecycle
    assert lifecycle is not None and lifecycle.host_tier_loads == {"ht-a": 1}
    assert lifecycle.cold_starts == {"ht-a": 2, "ht-b": 1}
