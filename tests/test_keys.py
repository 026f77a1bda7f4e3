"""API keys, per-key limits and usage, on a nats-server of this module's own (keys close every gateway on it).

One worker serves ``kept`` (``other`` is in its catalogue too); two gateways
share the broker. Keys are made and revoked with the real ``cortexctl``; the
gateways are called with the official SDKs and httpx. The tests run in file
order: the broker has no key at first (an open gateway), then keys.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from cortex.broker.server import EmbeddedNats
from cortex.gateway.auth import KeyRing
from cortex.gateway.errors import Unauthenticated
from cortex.gateway.limits import rate_headers, refuse
from cortex.protocol import codec, names
from cortex.protocol.keys import ApiKey, LimitWindow, new_secret, secret_hash
from tests.conftest import (
    Gateway,
    child_env,
    get_json,
    metric,
    on_bus,
    start_gateway,
    start_worker,
    stop_process,
    wait_for,
)

MODEL, OTHER = "kept", "other"
ASK = [{"role": "user", "content": "hi"}]
SEEN_WITHIN_S = 5.0
"""Deadline for every gateway to act on a key change (measured: well under the 2 s asked for)."""


@dataclass
class Fleet:
    nats: EmbeddedNats
    a: Gateway
    b: Gateway
    logs: Path
    secrets: dict[str, str] = field(default_factory=dict)
    """Key name -> secret, as `cortexctl keys add` printed it."""
    sent: dict[str, int] = field(default_factory=dict)
    """Key name -> requests this module sent with it that reached a route (for the usage totals)."""

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cortex.broker", *args, "--nats", self.nats.url],
                              capture_output=True, text=True, env=child_env(), timeout=60, check=False)  # fmt: skip

    def add_key(self, name: str, *options: str) -> str:
        made = self.ctl("keys", "add", name, *options)
        assert made.returncode == 0, made.stderr
        secret = made.stdout.strip()
        self.secrets[name] = secret
        return secret

    def known(self, name: str) -> bool:
        """Whether both gateways take the key (asked of a route no limit counts)."""
        headers = {"x-api-key": self.secrets[name]}
        return all(httpx.get(f"{g.base_url}/models", headers=headers, timeout=10).status_code == 200
                   for g in (self.a, self.b))  # fmt: skip

    def gateway_logs(self) -> str:
        return "".join((self.logs / f"gateway-{g.port}.log").read_text() for g in (self.a, self.b))

    def chat(self, gateway: Gateway, key: str | None, model: str = MODEL, **extra: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.secrets.get(key, key)}"} if key else {}
        body = {"model": model, "messages": ASK, "max_tokens": 1, "temperature": 0} | extra
        response = httpx.post(f"{gateway.base_url}/chat/completions", json=body, headers=headers, timeout=60)
        if key in self.secrets and response.status_code != 401:
            self.sent[key] = self.sent.get(key, 0) + 1
        return response


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, logs_dir: Path) -> Iterator[Fleet]:
    store = tmp_path_factory.mktemp("keys-nats")
    server = EmbeddedNats(store_dir=store, port=0, log_file=store / "nats.log")
    server.start()
    catalogue = store / "models.toml"
    catalogue.write_text("".join(f'[[models]]\nid = "{m}"\npath = "{tiny_model_dir}"\ndtype = "float32"\n\n'
                                 for m in (MODEL, OTHER)))  # fmt: skip
    worker = start_worker(server.url, catalogue, logs_dir / "keys-worker.log", "--model", MODEL, "--device", "cpu",
                          "--slots", "8", "--worker-id", "keys-worker")  # fmt: skip
    a, b = start_gateway(server.url, logs_dir), start_gateway(server.url, logs_dir)
    try:
        for gateway in (a, b):
            wait_for(lambda g=gateway: MODEL in get_json(f"{g.root_url}/health")["models_ready"], timeout=120,  # type: ignore[misc]
                     what="kept ready", proc=worker)  # fmt: skip
        yield Fleet(server, a, b, logs_dir)
    finally:
        for proc in (a.proc, b.proc, worker):
            stop_process(proc)
        server.stop()


def refused_without_key(gateway: Gateway) -> bool:
    return httpx.get(f"{gateway.base_url}/models", timeout=10).status_code == 401


def burst(calls: list[Callable[[], httpx.Response]]) -> list[httpx.Response]:
    """Every call at once (a thread each), released together."""
    gate = threading.Barrier(len(calls))

    def run(call: Callable[[], httpx.Response]) -> httpx.Response:
        gate.wait()
        return call()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


# -- open until a key exists ---------------------------------------------------------------------------


def test_a_gateway_is_open_until_a_key_exists_and_says_so(fleet: Fleet) -> None:
    assert get_json(f"{fleet.a.root_url}/health")["auth"] == "open"
    assert fleet.chat(fleet.a, None).status_code == 200
    assert fleet.chat(fleet.a, "sk-anything").status_code == 200


def test_require_keys_refuses_to_start_open(nats_server: EmbeddedNats) -> None:
    """The session's broker, which never holds a key."""
    started = subprocess.run([sys.executable, "-m", "cortex.gateway", "--nats", nats_server.url, "--require-keys",
                              "--port", "0", "--metrics-port", "-1"],
                             capture_output=True, text=True, env=child_env(), timeout=60, check=False)  # fmt: skip
    assert started.returncode != 0 and "--require-keys" in started.stderr


# -- keys ------------------------------------------------------------------------------------------------


def test_keys_add_prints_the_secret_once_and_every_gateway_requires_a_key(fleet: Fleet) -> None:
    added_at = time.monotonic()
    secret = fleet.add_key("alice", "--models", MODEL)
    assert secret.startswith("sk-") and len(secret) > 40
    wait_for(lambda: refused_without_key(fleet.a) and refused_without_key(fleet.b), timeout=SEEN_WITHIN_S,
             what="both gateways closed")  # fmt: skip
    print(f"\nkey added to both gateways closed: {time.monotonic() - added_at:.2f} s (cortexctl's start included)")
    listed = fleet.ctl("keys", "list")
    assert listed.returncode == 0 and "alice" in listed.stdout and secret not in listed.stdout
    rows = json.loads(fleet.ctl("keys", "list", "--json").stdout)
    assert (
        [row["name"] for row in rows] == ["alice"] and "secret_sha256" not in rows[0] and rows[0]["models"] == [MODEL]
    )
    assert get_json(f"{fleet.b.root_url}/health")["auth"] == "keys"
    again = fleet.ctl("keys", "add", "alice")
    assert again.returncode == 1 and "exists" in again.stderr


def test_missing_and_unknown_keys_are_401_in_each_dialect(fleet: Fleet) -> None:
    missing = httpx.post(f"{fleet.a.base_url}/chat/completions", json={"model": MODEL, "messages": ASK}, timeout=10)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    missing = httpx.post(f"{fleet.b.base_url}/messages", json={"model": MODEL, "messages": ASK}, timeout=10)
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    client = openai.OpenAI(base_url=fleet.a.base_url, api_key="sk-not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as raised:
        client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1)  # type: ignore[arg-type]
    assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"
    claude = anthropic.Anthropic(base_url=fleet.b.root_url, api_key="sk-not-a-key", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as refused:
        claude.messages.create(model=MODEL, messages=ASK, max_tokens=1)  # type: ignore[arg-type]
    assert refused.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    assert fleet.secrets["alice"] not in fleet.gateway_logs()


def test_a_key_works_as_bearer_and_as_x_api_key_on_every_route(fleet: Fleet) -> None:
    secret = fleet.secrets["alice"]
    reply = openai.OpenAI(base_url=fleet.a.base_url, api_key=secret, max_retries=0).chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=1,  # type: ignore[arg-type]
    )
    message = anthropic.Anthropic(base_url=fleet.b.root_url, api_key=secret, max_retries=0).messages.create(
        model=MODEL,
        messages=ASK,
        max_tokens=1,  # type: ignore[arg-type]
    )
    fleet.sent["alice"] = fleet.sent.get("alice", 0) + 2
    assert reply.choices[0].finish_reason and message.stop_reason
    models = httpx.get(f"{fleet.a.base_url}/models", headers={"x-api-key": secret}, timeout=10)
    assert [m["id"] for m in models.json()["data"]] == [MODEL]  # `other` is not the key's


def test_a_model_the_key_may_not_use_is_403_in_each_dialect(fleet: Fleet) -> None:
    secret = fleet.secrets["alice"]
    with pytest.raises(openai.PermissionDeniedError) as denied:
        openai.OpenAI(base_url=fleet.a.base_url, api_key=secret, max_retries=0).chat.completions.create(
            model=OTHER,
            messages=ASK,
            max_tokens=1,  # type: ignore[arg-type]
        )
    assert denied.value.status_code == 403 and denied.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(anthropic.PermissionDeniedError) as refused:
        anthropic.Anthropic(base_url=fleet.b.root_url, api_key=secret, max_retries=0).messages.create(
            model=OTHER,
            messages=ASK,
            max_tokens=1,  # type: ignore[arg-type]
        )
    assert refused.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
    looked_up = httpx.get(f"{fleet.a.base_url}/models/{OTHER}", headers={"x-api-key": secret}, timeout=10)
    assert looked_up.status_code == 403


def test_a_revoked_or_expired_key_is_refused(fleet: Fleet) -> None:
    fleet.add_key("temp")
    fleet.add_key("brief", "--expires", "2s")
    assert fleet.chat(fleet.a, "temp").status_code == 200
    assert fleet.ctl("keys", "revoke", "temp").returncode == 0
    wait_for(lambda: fleet.chat(fleet.a, "temp").status_code == 401 and fleet.chat(fleet.b, "temp").status_code == 401,
             timeout=SEEN_WITHIN_S, what="a revoked key refused by both gateways")  # fmt: skip
    assert fleet.ctl("keys", "revoke", "temp").returncode == 1  # no such key any more
    wait_for(lambda: fleet.chat(fleet.a, "brief").status_code == 401, timeout=30, what="the expired key refused")
    expired = fleet.chat(fleet.b, "brief")
    assert expired.status_code == 401 and expired.json()["error"]["code"] == "invalid_api_key"


# -- limits, over two gateways ------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "rpm", "each"), [("burst", 10, 15), ("burst-wide", 24, 30)])
def test_requests_per_minute_are_exact_over_two_gateways(fleet: Fleet, name: str, rpm: int, each: int) -> None:
    fleet.add_key(name, "--rpm", str(rpm))
    wait_for(lambda: fleet.known(name), timeout=SEEN_WITHIN_S, what="the key known to both gateways")
    calls = [lambda g=gateway: fleet.chat(g, name) for gateway in (fleet.a, fleet.b) for _ in range(each)]
    outcomes = burst(calls)
    statuses = sorted(r.status_code for r in outcomes)
    print(f"\nrpm {rpm}, a burst of {2 * each} at once over two gateways: {statuses.count(200)} let in")
    assert statuses.count(200) == rpm and statuses.count(429) == 2 * each - rpm
    refused = next(r for r in outcomes if r.status_code == 429)
    assert refused.json()["error"]["type"] == "requests" and refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(refused.headers["retry-after"]) >= 1 and refused.headers["x-ratelimit-limit-requests"] == str(rpm)
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    claude = httpx.post(f"{fleet.b.root_url}/v1/messages", headers={"x-api-key": fleet.secrets[name]},
                        json={"model": MODEL, "messages": ASK, "max_tokens": 1}, timeout=30)  # fmt: skip
    assert claude.status_code == 429 and claude.json()["error"]["type"] == "rate_limit_error"
    assert claude.headers["anthropic-ratelimit-requests-limit"] == str(rpm) and "retry-after" in claude.headers
    let_in = next(r for r in outcomes if r.status_code == 200)
    assert let_in.headers["x-ratelimit-limit-requests"] == str(rpm)


def test_concurrent_requests_are_exact_over_two_gateways(fleet: Fleet) -> None:
    secret = fleet.add_key("two-at-once", "--max-concurrent", "2")
    headers = {"Authorization": f"Bearer {secret}"}
    long = {"model": MODEL, "messages": ASK, "max_tokens": 4000, "stream": True, "temperature": 0}  # never ends early
    wait_for(lambda: fleet.known("two-at-once"), timeout=SEEN_WITHIN_S, what="the key known to both gateways")
    with httpx.Client(timeout=60) as client:
        held: list[Any] = []
        for gateway in (fleet.a, fleet.b):  # one answer running through each gateway, held open
            stream = client.stream("POST", f"{gateway.base_url}/chat/completions", json=long, headers=headers)
            response = stream.__enter__()
            assert response.status_code == 200
            lines = response.iter_lines()  # kept: dropping the iterator would close the connection
            next(line for line in lines if line.startswith("data:"))
            held.append((stream, lines))
        third = [fleet.chat(gateway, "two-at-once") for gateway in (fleet.a, fleet.b)]
        assert [r.status_code for r in third] == [429, 429]
        for stream, _ in held:
            stream.__exit__(None, None, None)  # the clients leave: their places come back
    wait_for(lambda: fleet.chat(fleet.b, "two-at-once").status_code == 200, timeout=30, what="a place back")


def test_tokens_per_minute_refuse_once_spent(fleet: Fleet) -> None:
    fleet.add_key("thrifty", "--tpm", "40")
    wait_for(lambda: fleet.known("thrifty"), timeout=SEEN_WITHIN_S, what="the key known to both gateways")
    assert fleet.chat(fleet.a, "thrifty", max_tokens=30).status_code == 200  # under the limit when it starts

    def refused_for_tokens() -> bool:
        response = fleet.chat(fleet.b, "thrifty", max_tokens=30)
        return response.status_code == 429 and response.json()["error"]["type"] == "tokens"

    wait_for(refused_for_tokens, timeout=30, what="the key's tokens spent")


# -- usage and the audit trail ---------------------------------------------------------------------------------


def test_usage_is_recorded_per_key(fleet: Fleet) -> None:
    def totals() -> dict[str, Any]:
        shown = fleet.ctl("usage", "--key", "alice", "--json")
        assert shown.returncode == 0, shown.stderr
        found = json.loads(shown.stdout)["keys"]
        return found[0] if found else {}

    wait_for(lambda: totals().get("requests") == fleet.sent["alice"], timeout=30, what="alice's usage recorded")
    alice = totals()
    assert alice["prompt_tokens"] > 0 and alice["completion_tokens"] >= 2 and alice["slot_seconds"] > 0
    assert alice["errors"] == 0  # refused requests (401, 403, 429) are not usage
    assert (
        metric(fleet.a, "cortex_key_requests_total", key="alice")
        + metric(fleet.b, "cortex_key_requests_total", key="alice")
        == fleet.sent["alice"]
    )
    table = fleet.ctl("usage", "--since", "1h")
    assert table.returncode == 0 and "alice" in table.stdout and "burst" in table.stdout


def test_key_changes_are_in_the_audit_trail(fleet: Fleet) -> None:
    async def read(bus: Any) -> list[bytes]:
        return await bus.read_records(names.AUDIT_STREAM, names.audit_wildcard(), 0.0)  # type: ignore[no-any-return]

    events = [codec.decode_audit(data) for data in on_bus(fleet.nats.url, read)]
    done = {(e.action, e.target) for e in events}
    assert {("keys.add", "alice"), ("keys.add", "temp"), ("keys.revoke", "temp")} <= done
    assert all(e.who and e.at for e in events)


def test_revoking_every_key_closes_rather_than_opens(fleet: Fleet) -> None:
    for name in list(json.loads(fleet.ctl("keys", "list", "--json").stdout)):
        assert fleet.ctl("keys", "revoke", name["name"]).returncode == 0
    wait_for(lambda: fleet.chat(fleet.a, "alice").status_code == 401, timeout=SEEN_WITHIN_S, what="alice revoked")
    assert fleet.chat(fleet.a, None).status_code == 401 and fleet.chat(fleet.b, None).status_code == 401
    assert get_json(f"{fleet.a.root_url}/health")["auth"] == "keys"


# -- the rules, on hand-made windows and keys ----------------------------------------------------------------


def test_the_window_slides_and_says_when_a_place_frees() -> None:
    key = ApiKey(name="k", secret_sha256="x", rpm=2, tpm=100)
    window = LimitWindow(requests=[10.0, 40.0])
    refusal = refuse(key, window, now=50.0)
    assert refusal is not None and refusal.kind == "requests" and refusal.wait == pytest.approx(20.0)
    window.prune(70.5)  # the first admission is more than a minute old
    assert window.requests == [40.0] and refuse(key, window, now=70.5) is None
    spent = LimitWindow(token_times=[10.0, 20.0, 30.0], token_counts=[30, 50, 40])
    refusal = refuse(key, spent, now=35.0)
    # 120 tokens; once the first charge (30) is 60 s old, 90 < 100
    assert refusal is not None and refusal.kind == "tokens" and refusal.wait == pytest.approx(35.0)
    headers = rate_headers(key, spent, now=35.0)
    assert headers["x-ratelimit-remaining-tokens"] == "0" and headers["anthropic-ratelimit-tokens-limit"] == "100"


def test_a_running_request_holds_its_place_until_its_deadline() -> None:
    key = ApiKey(name="k", secret_sha256="x", max_concurrent=1)
    window = LimitWindow(running={"r1": 100.0})
    assert refuse(key, window, now=99.0) is not None
    window.prune(100.0)  # its gateway never gave it back: it ends at the deadline
    assert refuse(key, window, now=100.0) is None


def test_a_key_ring_reads_either_header_and_stays_closed_once_a_key_existed() -> None:
    ring = KeyRing()
    assert ring.open and ring.authenticate({}) is None
    secret = new_secret()
    value = codec.encode(ApiKey(name="k", secret_sha256=secret_hash(secret), expires_at=4e9))
    ring.on_change(names.api_key_key("k"), value)
    assert not ring.open
    assert ring.authenticate({"authorization": f"Bearer {secret}"}).name == "k"  # type: ignore[union-attr]
    assert ring.authenticate({"x-api-key": secret}).name == "k"  # type: ignore[union-attr]
    with pytest.raises(Unauthenticated):
        ring.authenticate({"authorization": "Basic abc"})
    with pytest.raises(Unauthenticated):
        ring.authenticate({"x-api-key": secret}, now=4e9)  # expired
    ring.on_change(names.api_key_key("k"), None)  # revoked: the last key
    assert not ring.open
    with pytest.raises(Unauthenticated):
        ring.authenticate({"x-api-key": secret})
