"""A lean ``text/event-stream`` response and client-disconnect watching, as pure ASGI.

Starlette's StreamingResponse runs the body in an extra task group under ASGI
2.3 (what uvicorn speaks), which costs a task switch before the first byte.
Here the body runs in the request's own task; a watcher on ``receive`` cancels
it when the client goes away, and the event generator is always closed, so its
cleanup (cancelling the generation, recording metrics) runs at once.

Every event of a stream is one ``send``, and a send through Starlette passes
three wrappers (two exception handlers and the error middleware) that only
look for the response's start. The start goes through them, so they know the
response has begun; the body goes straight to the server's own ``send``, which
`cortex.gateway.app.GatewayApp` leaves in the scope under `SERVER_SEND` (the
gateway has no middleware that rewrites a body). The last event goes out with
the end of the body, in one write.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from typing import Any

from starlette.types import Receive, Scope, Send

SERVER_SEND = "cortex.server_send"
"""The scope key of the ASGI server's own ``send`` (set by `cortex.gateway.app.GatewayApp`)."""


class LastEvent(bytes):
    """The last event of a stream: the body ends with it, in the same write (the generator is closed after it)."""


async def wait_for_disconnect(receive: Receive) -> None:
    """Return once the client has disconnected (the request body must have been read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class DisconnectWatch:
    """Calls `on_gone` when the client disconnects; one task for a request's whole life, since what a disconnect
    means changes on the way (a streamed request: give up the wait for its first chunk, then end the response).

    `stop` when the request no longer needs it.
    """

    def __init__(self, receive: Receive, on_gone: Callable[[], Any]) -> None:
        self.on_gone = on_gone
        self.gone = False
        self._task: asyncio.Task[None] | None = asyncio.create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        await wait_for_disconnect(receive)
        self.gone = True
        self.on_gone()

    def stop(self) -> None:
        # The reference goes with the cancel: the cancelled task keeps its CancelledError, whose traceback holds
        # `_watch`'s frame and so this watch; a watch still holding the task would make every request's objects
        # (its stream, its ASGI cycle, the request) a reference cycle, left for the garbage collector's passes.
        task, self._task = self._task, None
        if task is not None:
            task.cancel()


class EventStreamResponse:
    """An SSE response whose body is `events`, each item one write; a `LastEvent` ends it.

    `watch`: the request's disconnect watch, if the handler already has one (it is taken over and stopped here).
    """

    def __init__(
        self,
        events: AsyncGenerator[bytes, None],
        headers: dict[str, str] | None = None,
        watch: DisconnectWatch | None = None,
    ) -> None:
        self.events = events
        self.headers = [(b"content-type", b"text/event-stream; charset=utf-8")]
        self.headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
        self.watch = watch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        watch = self.watch or DisconnectWatch(receive, task.cancel)
        watch.on_gone = task.cancel
        body_send: Send = scope.get(SERVER_SEND, send)
        try:
            # A client gone before this point was seen by the handler's watch: the events end at once, quietly.
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            async for data in self.events:
                last = isinstance(data, LastEvent)
                await body_send({"type": "http.response.body", "body": data, "more_body": not last})
                if last:
                    return
            await body_send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not watch.gone:
                raise  # cancelled from outside: server shutdown
            task.uncancel()  # the client left: a normal end for this response
        finally:
            watch.stop()
            await self.events.aclose()
