"""A finished request leaves nothing behind for the garbage collector.

Each request's objects (its ASGI cycle, its reply stream, its disconnect watch)
must be freed by reference counting the moment it ends. Objects caught in a
reference cycle wait for the collector, whose passes walk every object alive
and stall the gateway's event loop for all streams at once (tens of ms under
hundreds of streams). The gateway runs in this process here, on real uvicorn,
NATS and the session's tiny-model worker, so its garbage can be looked at.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from subprocess import Popen

import anthropic
import openai
import pytest
import uvicorn

from cortex.broker.server import EmbeddedNats
from cortex.gateway.app import create_app
from cortex.gateway.main import server_settings
from cortex.gateway.services import Settings
from tests.conftest import STARTUP_TIMEOUT_S, TINY_MODEL, free_port, ready_models, wait_for

REQUEST_TYPES = {"RequestResponseCycle", "DisconnectWatch", "ReplyStream", "Inbox", "Request"}
"""What one request makes and must free at its end (and nothing else makes: the gateway's own background tasks
may leave a cycle now and then without harm)."""
SERVER_MODULES = ("cortex.", "uvicorn.", "starlette.")
"""Where those types live: the SDK clients in this process have their own `Request` (httpx's)."""


@pytest.fixture
def server_here(nats_server: EmbeddedNats, worker: Popen[bytes]) -> Iterator[tuple[uvicorn.Server, str]]:
    """The gateway's app on uvicorn, in a thread of this process; its server and its base URL."""
    port = free_port()
    config = uvicorn.Config(create_app(Settings(nats_url=nats_server.url)), host="127.0.0.1", port=port,
                            **server_settings("WARNING"))  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="gateway-here", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}/v1"
    try:
        wait_for(lambda: TINY_MODEL in ready_models(base), timeout=STARTUP_TIMEOUT_S, what="gateway in this process")
        yield server, base
    finally:
        server.should_exit = True
        thread.join(30)


def test_a_finished_request_leaves_no_reference_cycle(server_here: tuple[uvicorn.Server, str]) -> None:
    server, base = server_here
    chat = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
    messages = anthropic.Anthropic(base_url=base.removesuffix("/v1"), api_key="unused", max_retries=0)
    prompt = [{"role": "user", "content": "hello"}]

    def requests() -> None:
        chat.chat.completions.create(model=TINY_MODEL, messages=prompt, max_tokens=3)  # type: ignore[arg-type]
        for _ in chat.chat.completions.create(model=TINY_MODEL, messages=prompt, max_tokens=3,  # type: ignore[arg-type]
                                              stream=True):  # fmt: skip
            pass
        messages.messages.create(model=TINY_MODEL, messages=prompt, max_tokens=3)  # type: ignore[arg-type]
        with messages.messages.stream(model=TINY_MODEL, messages=prompt, max_tokens=3) as events:  # type: ignore[arg-type]
            events.get_final_message()

    requests()  # first uses of each path made what lives on (caches, pools): not the requests' own
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a pass finds unreachable is kept in gc.garbage instead of freed
    try:
        for _ in range(3):
            requests()
        # Every request's task has ended once uvicorn holds none (each watch's cancellation ran before its end).
        wait_for(lambda: not server.server_state.tasks, timeout=10, what="the requests' tasks to end")
        gc.collect()
        ours = [o for o in gc.garbage if type(o).__module__.startswith(SERVER_MODULES)]  # not the SDKs' own
        left = sorted({type(o).__name__ for o in ours} & REQUEST_TYPES)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert left == [], f"objects of finished requests left in reference cycles: {left}"
