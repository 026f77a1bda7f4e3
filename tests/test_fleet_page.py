"""The fleet page (``/fleet``) in a real headless Chromium, and who may act from it.

The browser test uses the session's gateway and worker (an open gateway: this
broker never gets an API key, which would close every gateway on it) and
drives Debian's ``chromium`` over the DevTools protocol (`tests.cdp`): the
page shows the worker and the tiny model as the snapshots arrive over SSE, a
click on "load" makes the cold model go through its loading state to ready,
and screenshots land in the test's tmp dir. The key test runs a nats-server
and a gateway of its own (no worker) and calls the routes with httpx.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cortex.broker.server import EmbeddedNats
from cortex.gateway.fleet_feed import SAMPLE_S, Rates
from cortex.gateway.metrics import Metrics, RequestTimer
from cortex.protocol import codec, names
from tests.cdp import Browser, Page, chromium_binary
from tests.conftest import COLD_MODEL, TINY_MODEL, Gateway, child_env, on_bus, start_gateway, stop_process, wait_for

SEEN_WITHIN_S = 30.0
"""Deadline for the page to show what the fleet does (measured: well under a second; a sparkline's first point
within `SAMPLE_S`, 5 s)."""
WORKER = "test-worker"

# Records every state the cold model's card and its row on the worker go through, as the page draws them.
RECORD_STATES = """
window.seen = [];
const record = () => {
  for (const node of document.querySelectorAll('article.model[data-model=MODEL], li[data-worker-model=MODEL]')) {
    const state = node.dataset.state + (node.querySelector('.bar .progress') ? '+progress' : '');
    if (!window.seen.includes(state)) window.seen.push(state);
  }
};
new MutationObserver(record).observe(document.body, {subtree: true, childList: true, attributes: true});
record();
true
""".replace("MODEL", json.dumps(COLD_MODEL))


def card(kind: str, name: str, **more: str) -> str:
    """The CSS selector of a worker's or a model's card (the buttons carry `data-model` and `data-worker` too)."""
    return f"article.{kind}[data-{kind}={json.dumps(name)}]" + "".join(f"[data-{k}={json.dumps(v)}]"
                                                                      for k, v in more.items())  # fmt: skip


def present(css: str) -> str:
    return f"document.querySelector({json.dumps(css)}) !== null"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    binary = chromium_binary()
    if binary is None:
        pytest.skip("no Chromium found (chromium, chromium-browser, google-chrome or $CORTEX_CHROMIUM): "
                    "`make test` installs Debian's chromium when run as root")  # fmt: skip
    with Browser.launch(binary, tmp_path / "chromium-profile", tmp_path / "chromium.log") as browser:
        yield browser
    assert not browser.exceptions(), browser.exceptions()


def model_state(page: Page, model: str) -> str | None:
    state: str | None = page.evaluate(f"(document.querySelector({json.dumps(card('model', model))}) || "
                                      "{dataset: {}}).dataset.state || null")  # fmt: skip
    return state


def test_the_page_shows_the_fleet_live_and_loads_a_model(gateway: Gateway, browser: Browser, tmp_path: Path) -> None:
    for _ in range(3):  # some traffic for the tokens/s and TTFT sparklines
        chat = {"model": TINY_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
        assert httpx.post(f"{gateway.base_url}/chat/completions", json=chat, timeout=60).status_code == 200
    page = browser.new_page(width=1280, height=900)
    page.goto(f"{gateway.root_url}/")  # redirects to /fleet
    page.wait_for(present(card("worker", WORKER)), timeout=SEEN_WITHIN_S, what=f"worker {WORKER}")
    page.wait_for(present(card("model", TINY_MODEL, state="ready")), timeout=SEEN_WITHIN_S, what="tiny ready")
    assert page.evaluate("location.pathname") == "/fleet"
    assert model_state(page, COLD_MODEL) == "cold", "the cold model is in the catalogue, not loaded"
    memory_bar = page.evaluate(f"document.querySelector({json.dumps(card('worker', WORKER) + ' .bar')}).title")
    assert " used + " in memory_bar and " reserved of " in memory_bar, memory_bar

    page.evaluate(RECORD_STATES)
    page.click(f"{card('model', COLD_MODEL)} button[data-action=load]")
    page.wait_for(present(card("model", COLD_MODEL, state="ready")), timeout=SEEN_WITHIN_S, what="cold ready")
    # The tiny model loads in about 0.1 s: the page draws the placement naming the worker, then the worker's loading
    # advert (with its progress bar), then ready; a gateway busy at that moment may send two of them as one.
    seen = page.evaluate("window.seen")
    assert seen[0] == "cold" and seen[-1] == "ready", seen
    assert {"placed", "loading+progress"} & set(seen[1:-1]), f"nothing drawn between cold and ready: {seen}"
    print(f"\nstates the page drew for {COLD_MODEL}: {' -> '.join(seen)}")
    decision = f"li[data-decision={json.dumps(COLD_MODEL)}]"
    reason = page.wait_for(f"document.querySelector({json.dumps(decision)})?.textContent", timeout=SEEN_WITHIN_S,
                           what="the load's placement decision")  # fmt: skip
    assert WORKER in reason and "fleet page load" in reason, reason
    # The gateway samples its own metrics every SAMPLE_S: the sparklines show the requests above.
    spark = f"{card('model', TINY_MODEL)} svg.spark polyline, {card('model', TINY_MODEL)} svg.spark circle"
    page.wait_for(present(spark), timeout=SEEN_WITHIN_S, what="a tokens/s sparkline")
    print(f"fleet page screenshot: {page.screenshot(tmp_path / 'fleet-desktop.png')}")

    page.resize(width=390, height=844, mobile=True)  # a phone: one column, nothing wider than the screen
    page.wait_for("document.documentElement.scrollWidth <= 390", timeout=10, what="the page to fit a phone")
    print(f"fleet page screenshot (phone): {page.screenshot(tmp_path / 'fleet-phone.png')}")

    # Unload it again (two taps: the first asks "sure?"), leaving the session's worker as it was.
    unload = f"{card('model', COLD_MODEL)} button[data-action=unload]"
    page.click(unload)
    page.wait_for(present(unload + ".confirm"), timeout=10, what="the unload to ask for a second tap")
    page.click(unload)
    page.wait_for(present(card("model", COLD_MODEL, state="cold")), timeout=SEEN_WITHIN_S, what="cold again")

    trail = on_bus(gateway_nats(gateway), lambda bus: bus.read_records(names.AUDIT_STREAM, names.audit_wildcard(), 0))
    actions = [(e.action, e.target, e.who) for e in map(codec.decode_audit, trail) if e.target == COLD_MODEL]
    assert ("load", COLD_MODEL, "fleet page at 127.0.0.1 (open gateway)") in actions, actions
    assert ("unload", COLD_MODEL, "fleet page at 127.0.0.1 (open gateway)") in actions, actions


def gateway_nats(gateway: Gateway) -> str:
    """The broker the session gateway uses (its command line says)."""
    args = gateway.proc.args
    assert isinstance(args, list)
    return str(args[args.index("--nats") + 1])


# -- keys ---------------------------------------------------------------------------------------------------


def ctl(nats: EmbeddedNats, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cortex.broker", *args, "--nats", nats.url], capture_output=True,
                          text=True, env=child_env(), timeout=60, check=False)  # fmt: skip


def post(gateway: Gateway, body: dict[str, Any], key: str | None = None, **headers: str) -> httpx.Response:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {}) | headers
    return httpx.post(f"{gateway.root_url}/fleet/actions", content=json.dumps(body), headers=headers, timeout=30)


def hello(gateway: Gateway, key: str) -> dict[str, Any]:
    """The first event of the page's stream: who the caller is to the page."""
    with httpx.stream("GET", f"{gateway.root_url}/fleet/events", headers={"x-api-key": key}, timeout=10) as stream:
        assert stream.status_code == 200
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("data:"):
                first: dict[str, Any] = json.loads(line[5:])
                return first
    raise AssertionError("the stream ended before its first event")


def test_actions_need_an_admin_key_once_keys_exist(tmp_path: Path, logs_dir: Path) -> None:
    server = EmbeddedNats(store_dir=tmp_path / "nats", port=0, log_file=tmp_path / "nats.log")
    server.start()
    gateway = None
    try:
        gateway = start_gateway(server.url, logs_dir)
        drain = {"action": "drain", "worker": "ghost"}
        # Open: anyone may act, as anyone may use the gateway; the trail says from where.
        assert post(gateway, drain).status_code == 200
        assert post(gateway, {"action": "undrain", "worker": "ghost"}).status_code == 200
        assert httpx.get(f"{gateway.root_url}/fleet/state", timeout=10).json()["auth"] == "open"
        # ...but by IP address or localhost only: a DNS name may be another site's, rebound to this gateway.
        rebound = post(gateway, drain, Host="fleet.attacker.example")
        assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "host_not_allowed"
        assert (
            post(gateway, {"action": "undrain", "worker": "ghost"}, Host=f"localhost:{gateway.port}").status_code == 200
        )

        made = ctl(server, "keys", "add", "ops", "--admin")
        assert made.returncode == 0, made.stderr
        admin = made.stdout.strip()
        made = ctl(server, "keys", "add", "reader")
        assert made.returncode == 0, made.stderr
        user = made.stdout.strip()
        listing = ctl(server, "keys", "list").stdout
        assert "ops (admin)" in listing and "reader (admin)" not in listing, listing
        state = f"{gateway.root_url}/fleet/state"
        closed = lambda: httpx.get(state, timeout=10).status_code == 401  # noqa: E731
        wait_for(closed, timeout=10, what="the gateway to see the keys")

        # The page itself is static and always served; what it shows needs a key; what it does, an admin key.
        page = httpx.get(f"{gateway.root_url}/fleet", timeout=10)
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert httpx.get(f"{gateway.root_url}/fleet/events", timeout=10).status_code == 401
        assert post(gateway, drain).status_code == 401
        assert post(gateway, drain, "sk-not-a-key").status_code == 401
        refused = post(gateway, drain, user)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "not_admin", refused.text
        assert httpx.get(state, headers={"Authorization": f"Bearer {user}"}, timeout=10).status_code == 200
        assert hello(gateway, user) == {"auth": "key", "key": "reader", "may_act": False}
        assert hello(gateway, admin) == {"auth": "key", "key": "ops", "may_act": True}

        done = post(gateway, drain, admin)
        assert done.status_code == 200 and done.json()["message"].startswith("ghost draining"), done.text
        assert post(gateway, {"action": "undrain", "worker": "ghost"}, admin).status_code == 200
        # Only JSON (a form of another site cannot send it), a known action with what it needs, and refusals.
        assert post(gateway, drain, admin, **{"Content-Type": "text/plain"}).status_code == 415
        assert post(gateway, {"action": "reboot", "worker": "ghost"}, admin).status_code == 400
        assert post(gateway, {"action": "load"}, admin).status_code == 400
        unknown = post(gateway, {"action": "load", "model": "nothing-here"}, admin)
        assert unknown.status_code == 409 and "no live worker" in unknown.json()["error"]["message"], unknown.text

        trail = on_bus(server.url, lambda bus: bus.read_records(names.AUDIT_STREAM, names.audit_wildcard(), 0))
        events = [(e.action, e.target, e.who) for e in map(codec.decode_audit, trail) if e.target == "ghost"]
        assert events == [
            ("drain", "ghost", "fleet page at 127.0.0.1 (open gateway)"),
            ("undrain", "ghost", "fleet page at 127.0.0.1 (open gateway)"),
            ("undrain", "ghost", "fleet page at 127.0.0.1 (open gateway)"),
            ("drain", "ghost", "ops"),
            ("undrain", "ghost", "ops"),
        ], events
    finally:
        if gateway is not None:
            stop_process(gateway.proc)
        server.stop()


def test_rates_are_tokens_per_second_and_mean_ttft_per_sample() -> None:
    metrics = Metrics()
    rates = Rates(metrics)
    start = rates._last[0]
    for ttft in (0.1, 0.3):
        timer = RequestTimer(metrics, "m", "openai", started=time.monotonic() - ttft)
        timer.saw_tokens(1)
        timer.completion_tokens = 50
        timer.done(200)
    rates.sample(start + SAMPLE_S / 2)
    assert "m" not in rates.series, "no point before a sample's time is up"
    rates.sample(start + SAMPLE_S)
    ((tokens_per_s, mean_ttft),) = rates.series["m"]
    assert tokens_per_s == 100 / SAMPLE_S
    assert mean_ttft == pytest.approx(0.2, abs=0.05)
    rates.sample(start + 2 * SAMPLE_S)
    assert rates.series["m"][-1] == (0.0, None), "an idle spell is no tokens and no TTFT"
