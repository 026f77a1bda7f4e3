"""``cortex-gateway``: serve the HTTP API on uvicorn, metrics on their own port.

::

    cortex-gateway --host 0.0.0.0 --port 31313 --metrics-port 31314 --nats nats://127.0.0.1:4222
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import Any

import uvicorn

from cortex.broker.access import CREDS_ENV, use_credentials
from cortex.broker.bus import Bus
from cortex.broker.connection import DEFAULT_URL
from cortex.broker.errors import BrokerError
from cortex.broker.settings import parse_service_args, setup_logging
from cortex.gateway.app import create_app
from cortex.gateway.metrics import Metrics
from cortex.gateway.services import MAX_TOKENS_POLICIES, Settings

log = logging.getLogger("cortex.gateway")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="cortex-gateway", description="OpenAI-compatible HTTP API over NATS.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=31313)
    parser.add_argument("--metrics-host", default=None, help="default: same as --host")
    parser.add_argument("--metrics-port", type=int, default=31314, help="Prometheus /metrics port (-1 disables)")
    parser.add_argument("--nats", default=DEFAULT_URL, help=f"NATS server URL (default {DEFAULT_URL})")
    parser.add_argument("--nats-creds", metavar="FILE", default=None,
                        help=f"NATS user: a USER:PASSWORD file (default ${CREDS_ENV})")  # fmt: skip
    parser.add_argument(
        "--request-timeout", type=float, default=Settings.request_timeout, help="seconds before a request gets a 504"
    )
    parser.add_argument("--stream-headers-within", type=float, default=Settings.stream_headers_within,
                        help="seconds a stream waits for its first token before sending headers")  # fmt: skip
    parser.add_argument("--keepalive-interval", type=float, default=Settings.keepalive_interval,
                        help="seconds between SSE keep-alive comments while no token has come yet")  # fmt: skip
    parser.add_argument("--max-tokens-policy", choices=MAX_TOKENS_POLICIES, default=Settings.max_tokens_policy,
                        help="a max_tokens the context cannot hold after the prompt: clamp it (with a Warning "
                        "header) or reject it with a 400")  # fmt: skip
    parser.add_argument("--failover-attempts", type=int, default=Settings.failover_attempts, metavar="N",
                        help="times an answer whose worker dies mid-answer is continued on another worker "
                        "before it ends with a 502 (0 disables failover)")  # fmt: skip
    parser.add_argument("--no-affinity", action="store_true",
                        help="send every request to its model's shared queue, not first to the worker that likely "
                        "has its conversation cached")  # fmt: skip
    parser.add_argument("--require-keys", action="store_true",
                        help="refuse to start while no API key exists (without it, the gateway then serves "
                        "anyone)")  # fmt: skip
    return parse_service_args(parser, "gateway", argv)


async def _keys_exist(url: str) -> bool:
    """Whether the keys bucket holds a key or ever did (then the gateway is closed, never open)."""
    bus = await Bus.open(url, name="cortex-gateway (key check)")
    try:
        return bool(await bus.read_keys()) or await bus.keys_ever_written()
    finally:
        await bus.close()


def server_settings(log_level: str) -> dict[str, Any]:
    """How the gateway runs uvicorn (bench/gateway_scale.py serves its bare-ASGI reference the same way)."""
    return {
        # uvloop and httptools when installed (they are dependencies on Linux and macOS), else asyncio and h11.
        "loop": "auto",
        "http": "auto",
        "log_level": log_level.lower(),
        "log_config": None,  # uvicorn's loggers go through this process's handler (text or JSON)
        "timeout_graceful_shutdown": 10,
        "access_log": False,
        # Up to this many connections wait to be accepted: a burst of a thousand clients opening at once is not
        # refused (uvicorn's default, made explicit since the scale benchmark relies on it).
        "backlog": 2048,
    }


def _stopped(_sig: int, _frame: object) -> None:
    """The stop was asked for and uvicorn has already shut down: nothing is left to do."""


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    for name in ("request_timeout", "keepalive_interval"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"cortex-gateway: --{name.replace('_', '-')} must be greater than 0")
    if args.failover_attempts < 0:
        raise SystemExit("cortex-gateway: --failover-attempts must be 0 or more")
    setup_logging(args.log_level, args.log_format)
    try:
        use_credentials(args.nats_creds)  # every connection of this process is made as this user
    except BrokerError as exc:
        raise SystemExit(f"cortex-gateway: {exc}") from None
    if args.require_keys:
        try:
            if not asyncio.run(_keys_exist(args.nats)):
                raise SystemExit("cortex-gateway: --require-keys, and no API key exists: create one with "
                                 "`cortexctl keys add NAME` (or start without --require-keys to serve "
                                 "anyone)")  # fmt: skip
        except BrokerError as exc:
            raise SystemExit(f"cortex-gateway: {exc}") from None
    metrics = Metrics()
    if args.metrics_port >= 0:
        port = metrics.serve(args.metrics_host or args.host, args.metrics_port)
        log.info("metrics on http://%s:%d/metrics", args.metrics_host or args.host, port)
    app = create_app(
        Settings(
            nats_url=args.nats,
            request_timeout=args.request_timeout,
            stream_headers_within=args.stream_headers_within,
            keepalive_interval=args.keepalive_interval,
            max_tokens_policy=args.max_tokens_policy,
            failover_attempts=args.failover_attempts,
            require_keys=args.require_keys,
            affinity=not args.no_affinity,
        ),
        metrics,
        freeze_after_start=True,
    )
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then re-raises the signal to whatever handler was
    # there before it: with these, a requested stop ends with status 0 (systemd, `cortexctl up`), no traceback.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _stopped)
    uvicorn.run(app, host=args.host, port=args.port, **server_settings(args.log_level))


if __name__ == "__main__":
    main()
