"""Request bodies, prompts and keys never reach the logs at INFO: not the gateway's, not the worker's."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cortex.broker.server import EmbeddedNats
from tests.conftest import STARTUP_TIMEOUT_S, TINY_MODEL, Gateway, ready_models, start_gateway, stop_process, wait_for

MARKER = f"marker{uuid.uuid4().hex}"
KEY = f"sk-{MARKER}"
PROMPT = f"Please repeat {MARKER} back to me."


@pytest.fixture(scope="module")
def info_gateway(nats_server: EmbeddedNats, worker: subprocess.Popen[bytes], logs_dir: Path) -> Iterator[Gateway]:
    gw = start_gateway(nats_server.url, logs_dir, "--log-level", "INFO")
    wait_for(lambda: TINY_MODEL in ready_models(gw.base_url), timeout=STARTUP_TIMEOUT_S, what="tiny model ready")
    yield gw
    stop_process(gw.proc)


def requests_carrying_the_marker() -> tuple[list[tuple[str, object]], list[tuple[str, object]]]:
    """Answered (plain, streamed, stored) and refused requests, each with the marker in its body."""
    chat = {"model": TINY_MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": PROMPT}]}
    messages = {
        "model": TINY_MODEL,
        "max_tokens": 4,
        "system": PROMPT,
        "messages": [{"role": "user", "content": PROMPT}],
    }
    tool = {
        "type": "function",
        "function": {"name": "f", "description": PROMPT, "parameters": {"type": "object", "required": {MARKER: True}}},
    }
    answered = [
        ("/v1/chat/completions", chat),
        ("/v1/chat/completions", {**chat, "stream": True}),
        ("/v1/completions", {"model": TINY_MODEL, "max_tokens": 4, "prompt": PROMPT}),
        ("/v1/responses", {"model": TINY_MODEL, "max_output_tokens": 4, "input": PROMPT, "instructions": PROMPT}),
        ("/v1/responses", {"model": TINY_MODEL, "max_output_tokens": 4, "input": PROMPT, "stream": True}),
        ("/v1/messages", messages),
        ("/v1/messages", {**messages, "stream": True}),
        ("/v1/messages/count_tokens", messages),
    ]
    refused = [  # the marker is the wrong thing, or stands where it does not belong
        ("/v1/chat/completions", {**chat, "model": MARKER}),
        ("/v1/chat/completions", {**chat, "messages": [{"role": MARKER, "content": PROMPT}]}),
        ("/v1/chat/completions", {**chat, "tools": [tool]}),
        ("/v1/chat/completions", {**chat, "messages": [{"role": "user", "content": PROMPT * 2000}]}),  # too long
        ("/v1/responses", {"model": TINY_MODEL, "input": PROMPT, "previous_response_id": MARKER}),
        ("/v1/messages", {**messages, "max_tokens": MARKER}),
        ("/v1/messages", f'{{"model": "{TINY_MODEL}", "messages": [{PROMPT}'),  # not JSON
    ]
    return answered, refused


def test_prompts_bodies_and_keys_stay_out_of_the_logs(info_gateway: Gateway, logs_dir: Path) -> None:
    headers = {"Authorization": f"Bearer {KEY}", "x-api-key": KEY, "Content-Type": "application/json"}
    answered, refused = requests_carrying_the_marker()
    with httpx.Client(base_url=info_gateway.root_url, headers=headers, timeout=60) as client:
        for path, body in answered + refused:
            kwargs = {"content": body} if isinstance(body, str) else {"json": body}
            response = client.post(path, **kwargs)  # type: ignore[arg-type]
            expected = 200 if (path, body) in answered else 400
            assert response.status_code // 100 == expected // 100, (path, response.status_code, response.text)
        stored = client.post("/v1/responses", json={"model": TINY_MODEL, "max_output_tokens": 4, "input": PROMPT})
        assert client.get(f"/v1/responses/{stored.json()['id']}").status_code == 200
        assert client.get(f"/v1/models/{MARKER}").status_code == 404
    for log in (logs_dir / f"gateway-{info_gateway.port}.log", logs_dir / "worker.log"):
        text = log.read_text(errors="replace")
        assert " INFO " in text, f"{log.name} is not the log of a process logging at INFO"
        assert MARKER not in text, f"{log.name} holds a prompt or key: {text[text.index(MARKER) - 300 :][:600]}"
