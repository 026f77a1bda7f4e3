"""``cortexctl``: run the embedded stack and inspect the fleet.

::

    cortexctl up                      # nats-server + gateway :31313 + worker, Ctrl-C stops all
    cortexctl status                  # workers, devices, memory, models, free slots
    cortexctl status --json           # the same as JSON (adverts without catalogues; --catalogue adds them)
    cortexctl models                  # the catalogue: where each model is loaded, and why
    cortexctl load MODEL [--worker W] / unload MODEL [--worker W]
    cortexctl pin MODEL [--worker W] / unpin MODEL
    cortexctl drain WORKER / undrain WORKER
    cortexctl up --secure / init / credentials DIR   # a locked-down broker (docs/security.md)
    cortexctl --nats-creds FILE COMMAND              # as a NATS user (or CORTEX_NATS_CREDS=FILE)
    cortexctl keys add NAME [--models m1,m2] [--rpm N] [--tpm N] [--max-concurrent N] [--expires 30d]
    cortexctl keys list / keys revoke NAME
    cortexctl usage [--key NAME] [--since 24h] [--json]
    cortexctl top [--metrics URL ...]  # per-model tokens/s, TTFT, queue, in-flight, refreshed
    cortexctl --install-completion     # shell completion (bash, zsh, fish)

Every command reads and writes the NATS KV buckets (``cortex-fleet``,
``cortex-alive``, ``cortex-placement``, ``cortex-keys``), so any number of
gateways and cortexctl agree; a worker counts as live by the gateways' rule
(`cortex.protocol.liveness`). Every change (load, unload, pin, unpin, drain,
undrain, keys) is appended to the audit trail (``CORTEX_AUDIT``). The fleet
actions themselves are `cortex.broker.fleet_ops`, which the gateway's fleet
page calls too.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer

from cortex.broker import ctl_bus, fleet_ops
from cortex.broker.connection import DEFAULT_URL
from cortex.broker.ctl_keys import first_key, keys_app, usage
from cortex.broker.ctl_secure import credentials, init, options, up_banner
from cortex.broker.ctl_top import top
from cortex.broker.errors import BrokerError
from cortex.broker.stack import Stack, StackConfig, default_data_dir
from cortex.protocol import Pin, Placement, WorkerAdvert, catalogues
from cortex.protocol.choice import held_by_model, pinned_workers

app = typer.Typer(help="Operate a Cortex fleet.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.command()(usage)
app.command()(top)
app.callback()(options)


@app.command()
def up(
    port: Annotated[int, typer.Option(help="gateway port")] = 31313,
    host: Annotated[str, typer.Option(help="gateway and metrics address")] = "127.0.0.1",
    metrics_port: Annotated[int, typer.Option(help="Prometheus /metrics port")] = 31314,
    nats_port: Annotated[int, typer.Option(help="nats-server port (0: any free port)")] = 4222,
    model: Annotated[str, typer.Option(help="catalogue id the worker loads")] = "smollm2-135m-instruct",
    models: Annotated[Path | None, typer.Option(help="models.toml catalogue (default: bundled)")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda if present)")] = None,
    gpu: Annotated[str, typer.Option(help="CUDA device index, or several: 0,1")] = "0",
    slots: Annotated[int, typer.Option(help="requests the worker runs at once")] = 8,
    data_dir: Annotated[Path | None, typer.Option(help="JetStream store and logs")] = None,
    secure: Annotated[bool, typer.Option("--secure", help="lock the broker down: a NATS user each for the "
                                         "gateway, the worker and cortexctl (credentials in DATA_DIR/secure)")] = False,
    log_format: Annotated[str | None, typer.Option(help="the gateway's and worker's logs: text or json")] = None,
    keys: Annotated[bool, typer.Option("--keys", help="require API keys: make a first key (named default) and "
                                       "print it, unless keys exist already")] = False,
) -> None:  # fmt: skip
    """Start nats-server, a gateway and one worker on this machine; Ctrl-C stops them all."""
    config = StackConfig(
        data_dir=data_dir or default_data_dir(), host=host, port=port, metrics_port=metrics_port,
        nats_port=nats_port, model=model, models_file=models, device=device, gpu=gpu, slots=slots, secure=secure,
        log_format=log_format,
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
        secret = asyncio.run(first_key(stack.nats.url, stack.admin)) if keys and stack.nats else None
        auth = "API key required" if keys else "any API key"
        key_line = (
            f"  API key          {secret}   (shown once: keep it)\n"
            if secret
            else ("  API keys         as before (`cortexctl keys list`; `keys add NAME` for another)\n" if keys else "")
        )
        if not stack._stop.is_set():
            typer.echo(
                "\nCortex is up.\n"
                f"  OpenAI base URL  {stack.base_url}   ({auth})\n"
                f"{key_line}"
                f"  Metrics          {stack.metrics_url}\n"
                f"  NATS             {stack.nats.url if stack.nats else '?'}\n"
                f"{up_banner(config.secure_dir if secure else None)}"
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
    catalogue: Annotated[bool, typer.Option("--catalogue", help="with --json: each advert's whole catalogue too "
                                            "(every card of every worker: megabytes on a large fleet)")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="redraw every 2 s until Ctrl-C")] = False,
) -> None:  # fmt: skip
    """Workers, devices, memory, loaded models, running and queued requests: the live workers (advert and heartbeat)."""
    while True:
        try:
            adverts, placements, pins = asyncio.run(_read_fleet(nats))
        except BrokerError as exc:
            typer.echo(f"cortexctl status: {exc}", err=True)
            raise typer.Exit(1) from None
        if as_json:
            typer.echo(status_json(adverts, placements, pins, catalogue=catalogue).decode())
        else:
            if watch:
                typer.echo("\x1b[2J\x1b[H", nl=False)  # clear the screen, cursor home
            _print_status([msgspec.to_builtins(_without_catalogue(a)) for a in adverts], placements)
        if not watch:
            return
        time.sleep(2.0)


def _without_catalogue(advert: WorkerAdvert) -> WorkerAdvert:
    """The advert less its catalogue (500 cards are 127 KB an advert; status shows the models held)."""
    return msgspec.structs.replace(advert, catalogue=[])


def status_json(
    adverts: list[WorkerAdvert], placements: dict[str, Any], pins: dict[str, Any], *, catalogue: bool = False
) -> bytes:
    """``cortexctl status --json``: the live adverts (with their catalogues only if `catalogue`), the placements
    and the pins, indented; encoded by msgspec in one pass (no builtins copy of every advert first)."""
    workers = adverts if catalogue else [_without_catalogue(a) for a in adverts]
    document = {"workers": workers, "placements": placements, "pins": pins}
    return msgspec.json.format(msgspec.json.encode(document), indent=2)


def _print_status(adverts: list[dict[str, Any]], placements: dict[str, Any] | None = None) -> None:
    if not adverts:
        typer.echo("No live workers.")
        return
    now = time.time()
    typer.echo(f"{'WORKER':<28} {'DEVICE':<10} {'MEMORY USED/BUDGET':<28} {'SLOTS':<7} {'AGE':<5} MODELS")
    for a in adverts:
        memory = _bar(a.get("memory_used", 0) + a.get("memory_reserved", 0), a.get("memory_budget", 0))
        slots = f"{a.get('slots_free', 0)}/{a.get('slots_total', 0)}"
        age = f"{max(0.0, now - a.get('updated_at', now)):.0f}s" + (" draining" if a.get("draining") else "")
        age += " keeper" if a.get("keeper") else ""  # it watches the fleet for the others (docs/fleet.md)
        models = ", ".join(_model_status(m) for m in a.get("models", []))
        if a.get("host_cache_bytes"):  # the host tier (--host-cache): models a copy away from the device
            parked = ", ".join(a.get("host_cached", [])) or "empty"
            tier = f"host tier: {parked} ({_gib(a.get('host_cache_used', 0))}/{_gib(a['host_cache_bytes'])} GiB)"
            models = f"{models}; {tier}" if models else tier
        typer.echo(f"{a['worker_id']:<28} {a['device']:<10} {memory:<28} {slots:<7} {age:<5} {models}")
    if placements:
        typer.echo(f"\n{'MODEL':<32} {'PLACED ON':<30} WHY")
        for model, p in sorted(placements.items()):
            why = p.get("error") or p.get("reason", "")
            if p.get("retry_at"):
                when = time.strftime("%H:%M:%S", time.localtime(p["retry_at"]))
                why += f"; next retry {when} (in {max(0.0, p['retry_at'] - now):.0f}s, after {p['attempts']} failed)"
            elif p.get("error") and p.get("attempts"):
                why += f"; no more retries after {p['attempts']} failed rounds (cortexctl load retries)"
            workers = [f"{w} (pinned)" if w in p.get("pinned", []) else w for w in p.get("workers", [])]
            typer.echo(f"{model:<32} {', '.join(workers) or '-':<30} {why}")


def _model_status(model: dict[str, Any]) -> str:
    if model["state"] == "loading":
        done = model.get("progress", 0.0)
        return f"{model['id']} (loading [{'#' * round(10 * done)}{'.' * (10 - round(10 * done))}] {done:.0%})"
    if model["state"] == "failed":
        return f"{model['id']} (failed: {model.get('error', '')})"
    return (
        f"{model['id']} ({model['state']}, {model.get('in_flight', 0)} running, {model.get('queue_depth', 0)} queued)"
    )


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}"


def _bar(used: int, total: int, width: int = 10) -> str:
    filled = min(width, round(width * used / total)) if total else 0
    return f"[{'#' * filled}{'.' * (width - filled)}] {_gib(used)}/{_gib(total)} GiB"


NatsOption = Annotated[str, typer.Option(help="NATS server URL")]


_run = ctl_bus.run
_on_bus = ctl_bus.on_bus
_Refused = fleet_ops.Refused
"""A command that cannot be carried out (unknown model, pinned model...): said in one line."""


async def _with_bus(url: str, action: Any) -> str:
    """A command's one-line answer, refusals included."""
    try:
        return str(await _on_bus(url, action))
    except _Refused as exc:
        return f"refused: {exc}"


_adverts = fleet_ops.live_adverts


def _done(result: Any) -> None:
    typer.echo(result)
    if str(result).startswith("refused:"):
        raise typer.Exit(1)


@app.command()
def load(
    model: str,
    worker: Annotated[str | None, typer.Option(help="load it on this worker (default: the placement's choice)")] = None,
    nats: NatsOption = DEFAULT_URL,
) -> None:
    """Load a model now, on the best worker (or the one named)."""

    def action(bus: Any) -> Any:
        return fleet_ops.load(bus, model, worker=worker)

    _done(_run("load", _with_bus(nats, action)))


@app.command()
def unload(
    model: str,
    worker: Annotated[str | None, typer.Option(help="unload it from this worker only")] = None,
    nats: NatsOption = DEFAULT_URL,
) -> None:
    """Unload a model (from every worker, or the one named); refused while it is pinned."""

    def action(bus: Any) -> Any:
        return fleet_ops.unload(bus, model, worker=worker)

    _done(_run("unload", _with_bus(nats, action)))


@app.command()
def pin(
    model: str,
    replicas: Annotated[int, typer.Option(help="workers to keep it on")] = 1,
    worker: Annotated[str | None, typer.Option(help="keep it on this worker")] = None,
    nats: NatsOption = DEFAULT_URL,
) -> None:
    """Keep a model loaded: never evicted, never unloaded for idleness (kept in KV: survives restarts)."""

    def action(bus: Any) -> Any:
        return fleet_ops.pin(bus, model, replicas=replicas, worker=worker)

    _done(_run("pin", _with_bus(nats, action)))


@app.command()
def unpin(model: str, nats: NatsOption = DEFAULT_URL) -> None:
    """Let a pinned model be evicted and unload when idle again."""

    def action(bus: Any) -> Any:
        return fleet_ops.unpin(bus, model)

    _done(_run("unpin", _with_bus(nats, action)))


@app.command()
def drain(worker: str, nats: NatsOption = DEFAULT_URL) -> None:
    """Finish a worker's requests, take no new ones, unload its models (kept in KV until undrain)."""

    def action(bus: Any) -> Any:
        return fleet_ops.drain(bus, worker)

    _done(_run("drain", _with_bus(nats, action)))


@app.command()
def undrain(worker: str, nats: NatsOption = DEFAULT_URL) -> None:
    """Let a drained worker take requests again (models load on demand)."""

    def action(bus: Any) -> Any:
        return fleet_ops.undrain(bus, worker)

    _done(_run("undrain", _with_bus(nats, action)))


@app.command()
def models(nats: NatsOption = DEFAULT_URL) -> None:
    """The catalogue across live workers: where each model is loaded, pins, and the placement's reason."""

    async def action(bus: Any) -> str:
        from cortex.broker.decisions import read_all

        adverts = await _adverts(bus)
        placements, pins = await read_all(bus)
        memory_of = catalogues.largest_per_model(adverts, "memory")  # each model's largest card
        held = held_by_model(adverts)  # model -> (worker, state), workers in id order
        lines = [f"{'MODEL':<32} {'MEMORY':<10} {'PINNED':<10} {'LOADED ON':<30} WHY"]
        for model_id, memory in sorted(memory_of.items()):
            placement, pin = placements.get(model_id), pins.get(model_id)
            kept = pinned_workers(pin, placement)
            where = [f"{worker} ({state.state}{', pinned' if worker in kept else ''})"
                     for worker, state in held.get(model_id, [])]  # fmt: skip
            why = placement.error or placement.reason if placement is not None else ""
            pinned = "" if pin is None else f"on {pin.worker}" if pin.worker else f"{pin.replicas} kept"
            lines.append(f"{model_id:<32} {_gib(memory) + ' GiB':<10} {pinned:<10} "
                         f"{', '.join(where) or '-':<30} {why}")  # fmt: skip
        return "\n".join(lines)

    _done(_run("models", _with_bus(nats, action)))


async def _read_fleet(url: str) -> tuple[list[WorkerAdvert], dict[str, Any], dict[str, Any]]:
    """The live adverts, by worker id; the placements (model -> placement as plain data, with the workers a pin keeps
    as ``pinned`` and the others as ``extra``) and the pins (model -> pin, plain data)."""
    from cortex.broker.decisions import read_all

    async def read(bus: Any) -> tuple[list[Any], dict[str, Placement], dict[str, Pin]]:
        return await _adverts(bus), *(await read_all(bus))

    adverts, placements, pins = await _on_bus(url, read)
    shown: dict[str, Any] = {}
    for model, placement in placements.items():
        kept = pinned_workers(pins.get(model), placement)
        shown[model] = msgspec.to_builtins(placement) | {
            "pinned": kept, "extra": [w for w in placement.workers if w not in kept] if model in pins else []
        }  # fmt: skip
    return adverts, shown, {m: msgspec.to_builtins(p) for m, p in pins.items()}


app.command()(init)
app.command()(credentials)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
