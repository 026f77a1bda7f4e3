"""Requests that outlive their deadline get a 504; clients that leave free their slot."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from cortex.broker.server import EmbeddedNats
from tests.conftest import TINY_MODEL, Gateway, start_gateway, stop_process, wait_for

LONG = 2000  # tokens: seconds of work for the tiny model on a CPU


@pytest.fixture(scope="module")
def impatient_gateway(nats_server: EmbeddedNats, gateway: Gateway, logs_dir: Path) -> Iterator[Gateway]:
    gw = start_gateway(nats_server.url, logs_dir, "--request-timeout", "0.5")
    wait_for(lambda: httpx.get(f"{gw.root_url}/health").json()["workers"] >= 1, timeout=30, what="fleet view")
    yield gw
    stop_process(gw.proc)


def test_deadline_passed_is_504(impatient_gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=impatient_gateway.base_url, api_key="x", max_retries=0, timeout=60,
                           _strict_response_validation=True)  # fmt: skip
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model=TINY_MODEL, messages=[{"role": "user", "content": "go on"}], temperature=0, max_tokens=LONG
        )
    assert info.value.status_code == 504
    assert info.value.code == "deadline_exceeded"


def test_client_disconnect_cancels_generation(
    gateway: Gateway, logs_dir: Path, worker: subprocess.Popen[bytes]
) -> None:
    marker = f"leave-{uuid.uuid4().hex[:8]}"
    body = {"model": TINY_MODEL, "messages": [{"role": "user", "content": marker}], "max_tokens": LONG, "stream": True,
            "temperature": 0}  # fmt: skip
    with httpx.stream("POST", f"{gateway.base_url}/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        next(lines)  # the first event arrived: generation is running; now hang up
    worker_log = logs_dir / "worker.log"
    wait_for(lambda: "cancelled " in worker_log.read_text(), timeout=30, what="the worker to cancel", proc=worker)
    line = next(ln for ln in worker_log.read_text().splitlines() if "cancelled " in ln)
    generated = int(line.split(" after ")[1].split()[0])
    assert generated < LONG
