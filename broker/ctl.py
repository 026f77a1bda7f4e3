"""``cortexctl``: run the embedded stack and inspect the fleet.

::

    cortexctl up                      # nats-server + gateway :31313 + worker, Ctrl-C stops all
    cortexctl status                  # workers, devices, models, free slots
    cortexctl status --json
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer

from cortex.broker.connection import DEFAULT_URL
from cortex.broker.errors import BrokerError
from cortex.broker.stack import Stack, StackConfig, default_data_dir

app = typer.Typer(help="Operate a Cortex fleet.", no_args_is_help=True, add_completion=False)


@app.command()
def up(
    port: Annotated[int, typer.Option(help="gateway port")] = 31313,
    host: Annotated[str, typer.Option(help="gateway and metrics address")] = "127.0.0.1",
    metrics_port: Annotated[int, typer.Option(help="Prometheus /metrics port")] = 31314,
    nats_port: Annotated[int, typer.Option(help="nats-server port (0: any free port)")] = 4222,
    model: Annotated[str, typer.Option(help="catalogue id the worker loads")] = "smollm2-135m-instruct",
    models: Annotated[Path | None, typer.Option(help="models.toml catalogue (default: bundled)")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda if present)")] = None,
    gpu: Annotated[int, typer.Option(help="CUDA device index")] = 0,
    slots: Annotated[int, typer.Option(help="requests the worker runs at once")] = 8,
    data_dir: Annotated[Path | None, typer.Option(help="JetStream store and logs")] = None,
) -> None:
    """Start nats-server, a gateway and one worker on this machine; Ctrl-C stops them all."""
    config = StackConfig(
        data_dir=data_dir or default_data_dir(), host=host, port=port, metrics_port=metrics_port,
        nats_port=nats_port, model=model, models_file=models, device=device, gpu=gpu, slots=slots,
    )  # fmt: skip
    stack = Stack(config)
    signal.signal(signal.SIGINT, stack.request_stop)
    signal.signal(signal.SIGTERM, stack.request_stop)
    code = 0
    try:
        typer.echo(f"Starting Cortex (data in {config.data_dir}) ...")
        stack.start()
        typer.echo(f"NATS on {stack.nats.url if stack.nats else '?'}; loading {model} ...")
        stack.wait_ready()
        if not stack._stop.is_set():
            typer.echo(
                "\nCortex is up.\n"
                f"  OpenAI base URL  {stack.base_url}   (any API key)\n"
                f"  Metrics          {stack.metrics_url}\n"
                f"  NATS             {stack.nats.url if stack.nats else '?'}\n"
                f"  Model            {model}\n\n"
                f"  curl {stack.base_url}/chat/completions -H 'Content-Type: application/json' \\\n"
                f'    -d \'{{"model": "{model}", "messages": [{{"role": "user", "content": "Hi!"}}]}}\'\n\n'
                "Press Ctrl-C to stop.",
            )
            stack.wait()
    except (RuntimeError, BrokerError) as exc:
        typer.echo(f"cortexctl up: {exc}", err=True)
        code = 1
    finally:
        typer.echo("Stopping Cortex ...")
        stack.stop()
        typer.echo("Stopped.")
    raise typer.Exit(code)


@app.command()
def status(
    nats: Annotated[str, typer.Option(help="NATS server URL")] = DEFAULT_URL,
    as_json: Annotated[bool, typer.Option("--json", help="print the adverts as JSON")] = False,
) -> None:
    """Workers, devices, loaded models and free slots, from the fleet bucket."""
    try:
        adverts = asyncio.run(_read_fleet(nats))
    except BrokerError as exc:
        typer.echo(f"cortexctl status: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps({"workers": adverts}, indent=2))
        return
    if not adverts:
        typer.echo("No live workers.")
        return
    now = time.time()
    typer.echo(f"{'WORKER':<28} {'DEVICE':<10} {'MEMORY FREE/TOTAL':<20} {'SLOTS':<7} {'AGE':<5} MODELS")
    for a in adverts:
        memory = f"{_gib(a.get('memory_free', 0))}/{_gib(a.get('memory_total', 0))} GiB"
        slots = f"{a.get('slots_free', 0)}/{a.get('slots_total', 0)}"
        age = f"{max(0.0, now - a.get('updated_at', now)):.0f}s"
        models = ", ".join(f"{m['id']} ({m['state']}, {m.get('in_flight', 0)} running)" for m in a.get("models", []))
        typer.echo(f"{a['worker_id']:<28} {a['device']:<10} {memory:<20} {slots:<7} {age:<5} {models}")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}"


async def _read_fleet(url: str) -> list[dict[str, Any]]:
    from cortex.broker.bus import Bus
    from cortex.protocol import codec, names

    bus = await Bus.open(url, name="cortexctl")
    try:
        raw = await bus.read_fleet()
    finally:
        await bus.close()
    adverts = []
    for key, value in sorted(raw.items()):
        if names.is_worker_key(key):
            try:
                adverts.append(msgspec.to_builtins(codec.decode_advert(value)))
            except codec.DecodeError:
                continue
    return adverts


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
