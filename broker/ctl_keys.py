"""``cortexctl keys`` and ``cortexctl usage``: API keys, and what each used.

::

    cortexctl keys add team-a --models smollm2-135m-instruct --rpm 60 --tpm 100000 --max-concurrent 4 --expires 30d
    cortexctl keys add ops --admin        # may also act from the gateway's fleet page
    cortexctl keys list [--json]
    cortexctl keys revoke team-a
    cortexctl usage [--key team-a] [--since 24h] [--json]

A key's secret is printed once, by ``keys add``, and kept only as its hash;
every gateway sees a new or revoked key within a moment (it watches the
``cortex-keys`` bucket). Key changes are written to the audit trail.
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
import typer

from cortex.broker import audit
from cortex.broker.access import Access
from cortex.broker.bus import Bus
from cortex.broker.connection import DEFAULT_URL
from cortex.broker.ctl_bus import run_on_bus
from cortex.broker.errors import BrokerError
from cortex.protocol import codec, names
from cortex.protocol.keys import ApiKey, new_secret, secret_hash, secret_hint

keys_app = typer.Typer(help="API keys: add, list, revoke.", no_args_is_help=True, add_completion=False)
NatsOption = Annotated[str, typer.Option(help="NATS server URL")]
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Seconds in ``90s``, ``15m``, ``24h``, ``30d`` or ``2w``; raises typer.BadParameter otherwise."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise typer.BadParameter(f"{text!r} is not a duration such as 90s, 15m, 24h, 30d or 2w")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def _refuse(message: str) -> typer.Exit:
    typer.echo(f"refused: {message}", err=True)
    return typer.Exit(1)


async def create_key(
    bus: Bus, name: str, *, models: list[str], rpm: int, tpm: int, max_concurrent: int, expires_in: float | None,
    admin: bool = False,
) -> tuple[ApiKey, str] | None:  # fmt: skip
    """Make and store a key named `name`; its record and its secret, or None if a key of that name exists."""
    secret, now, who = new_secret(), time.time(), audit.operator()
    api_key = ApiKey(
        name=name, secret_sha256=secret_hash(secret), hint=secret_hint(secret), models=models, rpm=rpm, tpm=tpm,
        max_concurrent=max_concurrent, expires_at=now + expires_in if expires_in else 0.0, created_at=now,
        created_by=who, admin=admin,
    )  # fmt: skip
    if not await bus.write_key(names.api_key_key(name), codec.encode(api_key), 0):
        return None
    limits = ", ".join(f"{label} {n}" for label, n in (("rpm", rpm), ("tpm", tpm), ("max concurrent", max_concurrent))
                       if n)  # fmt: skip
    detail = f"models: {', '.join(models) or 'all'}; {limits or 'no limits'}" + ("; admin" if admin else "")
    try:
        await audit.record(bus, "keys.add", name, detail, who)
    except BrokerError as exc:  # the key exists now: its secret must still reach the operator
        typer.echo(f"warning: key {name} made, but not written to the audit trail: {exc}", err=True)
    return api_key, secret


FIRST_KEY = "default"
"""The name `cortexctl up --keys` gives the key it makes."""


async def first_key(url: str, access: Access | None = None) -> str | None:
    """The secret of a key made now for `cortexctl up --keys`, or None if the broker has had keys already."""
    bus = await Bus.open(url, name="cortexctl up", access=access)
    try:
        if await bus.read_keys() or await bus.keys_ever_written():
            return None
        made = await create_key(bus, FIRST_KEY, models=[], rpm=0, tpm=0, max_concurrent=0, expires_in=None)
        return made[1] if made is not None else None
    finally:
        await bus.close()


@keys_app.command("add")
def add(
    name: str,
    models: Annotated[str, typer.Option(help="models the key may use, comma-separated (default: all)")] = "",
    rpm: Annotated[int, typer.Option(help="requests per minute, over every gateway (0: no limit)", min=0)] = 0,
    tpm: Annotated[int, typer.Option(help="tokens per minute, over every gateway (0: no limit)", min=0)] = 0,
    max_concurrent: Annotated[int, typer.Option(help="requests at once (0: no limit)", min=0)] = 0,
    expires: Annotated[str | None, typer.Option(help="refuse the key after this long: 90m, 24h, 30d...")] = None,
    admin: Annotated[bool, typer.Option("--admin", help="may also load, unload, pin, unpin, drain and undrain "
                                        "from the gateway's fleet page")] = False,
    nats: NatsOption = DEFAULT_URL,
) -> None:  # fmt: skip
    """Create an API key; its secret is printed once, and never again."""
    try:
        names.check_key_name(name)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    expires_in = parse_duration(expires) if expires else None
    wanted = [m.strip() for m in models.split(",") if m.strip()]
    limits = {"rpm": rpm, "tpm": tpm, "max_concurrent": max_concurrent}
    made = run_on_bus(nats, "keys add", lambda bus: create_key(bus, name, models=wanted, expires_in=expires_in,
                                                            admin=admin, **limits))  # fmt: skip
    if made is None:
        raise _refuse(f"a key named {name!r} exists (`cortexctl keys revoke {name}` first)")
    api_key, secret = made
    typer.echo(secret)
    typer.echo(f"key {api_key.name} created; the secret above is shown only now: keep it", err=True)


@keys_app.command("list")
def list_keys(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
    nats: NatsOption = DEFAULT_URL,
) -> None:
    """Every API key and its limits (never a secret)."""

    async def read(bus: Bus) -> list[ApiKey]:
        out = []
        for value in (await bus.read_keys()).values():
            try:
                out.append(codec.decode_api_key(value))
            except codec.DecodeError:
                continue
        return sorted(out, key=lambda k: k.name)

    found = run_on_bus(nats, "keys list", read)
    if as_json:
        rows = [msgspec.to_builtins(k) for k in found]
        for row in rows:
            row.pop("secret_sha256", None)
        typer.echo(json.dumps(rows, indent=2))
        return
    now = time.time()
    typer.echo(f"{'NAME':<20} {'SECRET':<12} {'MODELS':<28} {'RPM':>6} {'TPM':>8} {'CONC':>5} {'EXPIRES':<20} CREATED")
    for k in found:
        expires = "never" if not k.expires_at else ("EXPIRED" if k.expired(now) else _when(k.expires_at))
        label = k.name + (" (admin)" if k.admin else "")
        typer.echo(f"{label:<20} {k.hint:<12} {', '.join(k.models) or 'all':<28} {k.rpm or '-':>6} "
                   f"{k.tpm or '-':>8} {k.max_concurrent or '-':>5} {expires:<20} {_when(k.created_at)} "
                   f"by {k.created_by}")  # fmt: skip


@keys_app.command("revoke")
def revoke(name: str, nats: NatsOption = DEFAULT_URL) -> None:
    """Revoke an API key: every gateway refuses it from now on (a moment, at most)."""

    async def action(bus: Bus) -> bool:
        key = names.api_key_key(name)
        if (await bus.read_key(key))[0] is None:
            return False
        await bus.delete_key(key)
        await audit.record(bus, "keys.revoke", name)
        return True

    if not run_on_bus(nats, "keys revoke", action):
        raise _refuse(f"no key is named {name!r}")
    typer.echo(f"key {name} revoked")


def _when(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M UTC")


def add_up(records: list[bytes]) -> dict[str, dict[str, Any]]:
    """Usage records summed per key: requests, errors, tokens of each kind, slot seconds."""
    totals: dict[str, dict[str, Any]] = {}
    for data in records:
        try:
            r = codec.decode_usage(data)
        except codec.DecodeError:
            continue
        t = totals.setdefault(r.key, {"key": r.key, "requests": 0, "errors": 0, "prompt_tokens": 0,
                                      "completion_tokens": 0, "cached_tokens": 0, "slot_seconds": 0.0,
                                      "models": {}})  # fmt: skip
        t["requests"] += 1
        t["errors"] += r.status >= 400
        t["prompt_tokens"] += r.prompt_tokens
        t["completion_tokens"] += r.completion_tokens
        t["cached_tokens"] += r.cached_tokens
        t["slot_seconds"] = round(t["slot_seconds"] + r.slot_seconds, 6)
        t["models"][r.model] = t["models"].get(r.model, 0) + 1
    return dict(sorted(totals.items()))


def usage(
    key: Annotated[str | None, typer.Option(help="only this key")] = None,
    since: Annotated[str, typer.Option(help="how far back: 90m, 24h, 30d...")] = "24h",
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable")] = False,
    nats: NatsOption = DEFAULT_URL,
) -> None:
    """What each API key used: requests, errors, prompt/completion/cached tokens, GPU slot seconds."""
    start = time.time() - parse_duration(since)
    subject = names.usage_subject(key) if key else names.usage_wildcard()
    records = run_on_bus(nats, "usage", lambda bus: bus.read_records(names.USAGE_STREAM, subject, start))
    totals = add_up(records)
    if as_json:
        typer.echo(json.dumps({"since": start, "keys": list(totals.values())}, indent=2))
        return
    typer.echo(f"since {_when(start)}")
    typer.echo(f"{'KEY':<20} {'REQUESTS':>8} {'ERRORS':>6} {'PROMPT':>10} {'COMPLETION':>10} {'CACHED':>8} "
               f"{'SLOT S':>9}")  # fmt: skip
    for t in totals.values():
        typer.echo(f"{t['key']:<20} {t['requests']:>8} {t['errors']:>6} {t['prompt_tokens']:>10} "
                   f"{t['completion_tokens']:>10} {t['cached_tokens']:>8} {t['slot_seconds']:>9.2f}")  # fmt: skip
