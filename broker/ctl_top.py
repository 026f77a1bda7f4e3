"""``cortexctl top``: per-model tokens/s, time to first token, queue and in-flight, refreshed.

Read from gateways' Prometheus endpoints (``--metrics``, repeatable; every
gateway counts only the requests it answered, so list them all): rates are the
difference of two scrapes ``--interval`` seconds apart. Queue depth and
in-flight come from the fleet metrics every gateway exports alike.

::

    cortexctl top                                   # the local stack's gateway (cortexctl up)
    cortexctl top --metrics http://gw-1:31314/metrics --metrics http://gw-2:31314/metrics
    cortexctl top --once --json                     # one sample, for scripts
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Annotated

import typer
from prometheus_client.parser import text_string_to_metric_families

DEFAULT_METRICS = os.environ.get("CORTEX_METRICS_URL", "http://127.0.0.1:31314/metrics")
_COUNTERS = {"cortex_completion_tokens": "tokens", "cortex_requests": "requests"}


@dataclass
class Scrape:
    """What the gateways said at one moment, summed per model."""

    at: float
    counters: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per model: completion tokens, requests answered, TTFT sum and count (cumulative)."""
    queue: dict[str, float] = field(default_factory=dict)
    in_flight: dict[str, float] = field(default_factory=dict)


def scrape(urls: list[str]) -> Scrape:
    """One reading of every gateway in `urls`; raises OSError if one does not answer."""
    out = Scrape(at=time.monotonic())
    for url in urls:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        _add(out, text, from_first=url == urls[0])
    return out


def _add(out: Scrape, text: str, *, from_first: bool) -> None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            model = sample.labels.get("model")
            if model is None:
                continue
            name = sample.name
            counters = out.counters.setdefault(model, {})
            if name.removesuffix("_total") in _COUNTERS and name.endswith("_total"):
                key = _COUNTERS[name.removesuffix("_total")]
                counters[key] = counters.get(key, 0.0) + sample.value
            elif name in ("cortex_time_to_first_token_seconds_sum", "cortex_time_to_first_token_seconds_count"):
                key = "ttft_sum" if name.endswith("_sum") else "ttft_count"
                counters[key] = counters.get(key, 0.0) + sample.value
            elif from_first and name == "cortex_model_queue_depth":
                out.queue[model] = sample.value  # the fleet's, the same at every gateway
            elif from_first and name == "cortex_model_in_flight":
                out.in_flight[model] = out.in_flight.get(model, 0.0) + sample.value


def rows(before: Scrape, after: Scrape) -> list[dict[str, float | str | None]]:
    """Per model: tokens/s and requests/s between the scrapes, mean TTFT of the requests that started meanwhile."""
    span = max(after.at - before.at, 1e-9)
    out: list[dict[str, float | str | None]] = []
    for model in sorted(set(after.counters) | set(after.queue) | set(after.in_flight)):
        now, then = after.counters.get(model, {}), before.counters.get(model, {})

        def delta(key: str, now: dict[str, float] = now, then: dict[str, float] = then) -> float:
            return max(0.0, now.get(key, 0.0) - then.get(key, 0.0))

        firsts = delta("ttft_count")
        out.append({
            "model": model,
            "tokens_per_s": round(delta("tokens") / span, 2),
            "requests_per_s": round(delta("requests") / span, 2),
            "ttft_s": round(delta("ttft_sum") / firsts, 4) if firsts else None,
            "queue": after.queue.get(model, 0.0),
            "in_flight": after.in_flight.get(model, 0.0),
        })  # fmt: skip
    return out


def _table(found: list[dict[str, float | str | None]]) -> str:
    lines = [f"{'MODEL':<32} {'TOKENS/S':>9} {'REQ/S':>7} {'TTFT':>8} {'QUEUE':>6} {'IN FLIGHT':>9}"]
    for r in found:
        ttft = f"{r['ttft_s']:.3f}s" if r["ttft_s"] is not None else "-"
        lines.append(f"{r['model']!s:<32} {r['tokens_per_s']:>9} {r['requests_per_s']:>7} {ttft:>8} "
                     f"{r['queue']:>6.0f} {r['in_flight']:>9.0f}")  # fmt: skip
    return "\n".join(lines)


def top(
    metrics: Annotated[
        list[str] | None, typer.Option(help="a gateway's /metrics URL (repeat for each gateway)")
    ] = None,
    interval: Annotated[float, typer.Option(help="seconds between readings", min=0.1)] = 2.0,
    once: Annotated[bool, typer.Option("--once", help="print one reading and stop")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable (with --once: one object)")] = False,
) -> None:
    """Per-model tokens/s, requests/s, time to first token, queue and in-flight, refreshed until Ctrl-C."""
    urls = metrics or [DEFAULT_METRICS]
    try:
        before = scrape(urls)
        while True:
            time.sleep(interval)
            after = scrape(urls)
            found = rows(before, after)
            if as_json:
                typer.echo(json.dumps({"interval_s": round(after.at - before.at, 3), "models": found}))
            else:
                if not once:
                    typer.echo("\x1b[2J\x1b[H", nl=False)  # clear the screen, cursor home: a table in place
                typer.echo(_table(found))
            if once:
                return
            before = after
    except OSError as exc:
        typer.echo(f"cortexctl top: cannot read {', '.join(urls)}: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        return
