"""A lean ``text/event-stream`` response and client-disconnect watching, as pure ASGI.

Starlette's StreamingResponse runs the body in an extra task group under ASGI
2.3 (what uvicorn speaks), which costs a task switch before the first byte.
Here the body runs in the request's own task; a watcher on ``receive`` cancels
it when the client goes away, and the event generator is always closed, so its
cleanup (cancelling the generation, recording metrics) runs at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from typing import Any

from starlette.types import Receive, Scope, Send


async def wait_for_disconnect(receive: Receive) -> None:
    """Return once the client has disconnected (the request body must have been read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def watch_disconnect(receive: Receive, on_gone: Callable[[], Any]) -> asyncio.Task[None]:
    """Call `on_gone` when the client disconnects; cancel the returned task to stop watching."""

    async def watch() -> None:
        await wait_for_disconnect(receive)
        on_gone()

    return asyncio.create_task(watch())


class EventStreamResponse:
    def __init__(self, events: AsyncGenerator[bytes, None], headers: dict[str, str] | None = None) -> None:
        self.events = events
        self.headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
        self.headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        watcher = watch_disconnect(receive, task.cancel)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            async for data in self.events:
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not watcher.done():
                raise  # cancelled from outside: server shutdown
            task.uncancel()  # the client left: a normal end for this response
        finally:
            watcher.cancel()
            await self.events.aclose()
