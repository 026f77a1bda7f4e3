"""cortexctl: fleet status from the KV bucket, and `up` with the real default model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import anthropic
import openai
import pytest

from cortex.broker.server import EmbeddedNats
from tests.conftest import TINY_MODEL, Gateway, child_env, free_port, ready_models, wait_for

DEFAULT_MODEL = "smollm2-135m-instruct"


def cortexctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cortex.broker", *args], capture_output=True, text=True, timeout=60)


def test_status_json_lists_the_worker(nats_server: EmbeddedNats, gateway: Gateway) -> None:
    result = cortexctl("status", "--nats", nats_server.url, "--json")
    assert result.returncode == 0, result.stderr
    workers = {w["worker_id"]: w for w in json.loads(result.stdout)["workers"]}
    worker = workers["test-worker"]
    assert worker["device"] == "cpu"
    assert worker["slots_total"] == 4
    assert 0 <= worker["slots_free"] <= 4
    assert worker["memory_total"] > 0
    assert (TINY_MODEL, "ready") in [(m["id"], m["state"]) for m in worker["models"]]


def test_status_json_leaves_catalogues_out_unless_asked(nats_server: EmbeddedNats, gateway: Gateway) -> None:
    plain = json.loads(cortexctl("status", "--nats", nats_server.url, "--json").stdout)["workers"]
    assert plain and all("catalogue" not in w for w in plain)
    result = cortexctl("status", "--nats", nats_server.url, "--json", "--catalogue")
    assert result.returncode == 0, result.stderr
    worker = {w["worker_id"]: w for w in json.loads(result.stdout)["workers"]}["test-worker"]
    assert TINY_MODEL in [card["id"] for card in worker["catalogue"]]


def test_status_table(nats_server: EmbeddedNats, gateway: Gateway) -> None:
    result = cortexctl("status", "--nats", nats_server.url)
    assert result.returncode == 0, result.stderr
    assert "test-worker" in result.stdout
    assert f"{TINY_MODEL} (ready" in result.stdout


def test_status_without_a_server_fails_clearly() -> None:
    result = cortexctl("status", "--nats", f"nats://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "cannot connect to NATS" in result.stderr


def test_status_takes_the_broker_from_the_environment(nats_server: EmbeddedNats, gateway: Gateway) -> None:
    env = child_env() | {"CORTEX_NATS_URL": nats_server.url}
    result = subprocess.run([sys.executable, "-m", "cortex.broker", "status", "--json"], capture_output=True,
                            text=True, timeout=60, env=env, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "test-worker" in {w["worker_id"] for w in json.loads(result.stdout)["workers"]}


def test_top_shows_tokens_per_second_and_ttft_per_model(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0)
    argv = ["top", "--metrics", gateway.metrics_url, "--once", "--json", "--interval", "3"]
    top = subprocess.Popen([sys.executable, "-m", "cortex.broker", *argv], stdout=subprocess.PIPE, text=True,
                           env=child_env())  # fmt: skip
    deadline = time.monotonic() + 60
    while top.poll() is None and time.monotonic() < deadline:  # answers streamed for as long as it watches
        list(client.chat.completions.create(model=TINY_MODEL, messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=8, stream=True))  # fmt: skip
    out, _ = top.communicate(timeout=30)
    assert top.returncode == 0
    tiny = {row["model"]: row for row in json.loads(out)["models"]}[TINY_MODEL]
    assert tiny["tokens_per_s"] > 0 and tiny["requests_per_s"] > 0 and tiny["ttft_s"] is not None
    assert tiny["queue"] >= 0 and tiny["in_flight"] >= 0


def test_log_format_json_is_one_object_per_line(nats_server: EmbeddedNats, tmp_path: Path) -> None:
    env = child_env() | {"CORTEX_LOG_FORMAT": "json"}
    gateway = subprocess.Popen([sys.executable, "-m", "cortex.gateway", "--nats", nats_server.url, "--port",
                                str(free_port()), "--metrics-port", "-1"], stderr=subprocess.PIPE, text=True,
                               env=env)  # fmt: skip
    try:
        assert gateway.stderr is not None
        first = gateway.stderr.readline()
    finally:
        gateway.terminate()
        gateway.wait(timeout=30)
    record = json.loads(first)
    assert {"time", "level", "logger", "message"} <= set(record)


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class UpStack:
    proc: subprocess.Popen[str]
    port: int
    metrics_port: int
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


@pytest.fixture(scope="module")
def up_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpStack]:
    data = tmp_path_factory.mktemp("cortexctl-up")
    port, metrics_port = free_port(), free_port()
    log = data / "up.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cortex.broker", "up", "--port", str(port), "--metrics-port", str(metrics_port),
             "--nats-port", "0", "--device", "cpu", "--slots", "2", "--data-dir", str(data)],
            stdout=out, stderr=subprocess.STDOUT, text=True, env=child_env(),
        )  # fmt: skip
    stack = UpStack(proc=proc, port=port, metrics_port=metrics_port, log=log)
    try:
        wait_for(lambda: DEFAULT_MODEL in ready_models(stack.base_url), timeout=300, what="cortexctl up", proc=proc)
        yield stack
    finally:
        if proc.poll() is None:
            for pid in descendants(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()


@pytest.mark.default_model
def test_default_model_answers_paris(up_stack: UpStack) -> None:
    client = openai.OpenAI(base_url=up_stack.base_url, api_key="any", max_retries=0, timeout=120,
                           _strict_response_validation=True)  # fmt: skip
    question = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model=DEFAULT_MODEL, messages=question, temperature=0, max_tokens=40)  # type: ignore[arg-type]
    assert "Paris" in (reply.choices[0].message.content or "")
    assert reply.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=question,
        temperature=0,
        max_tokens=40,
        stream=True,  # type: ignore[arg-type]
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == reply.choices[0].message.content
    assert "Cortex is up." in up_stack.log.read_text()


@pytest.mark.default_model
def test_default_model_through_completions_responses_and_anthropic_messages(up_stack: UpStack) -> None:
    root = up_stack.base_url.removesuffix("/v1")
    oai = openai.OpenAI(base_url=up_stack.base_url, api_key="any", max_retries=0, timeout=120)
    completion = oai.completions.create(
        model=DEFAULT_MODEL, prompt="The capital of France is", temperature=0, max_tokens=5
    )
    assert "Paris" in completion.choices[0].text
    claude = anthropic.Anthropic(base_url=root, api_key="any", max_retries=0, timeout=120,
                                 _strict_response_validation=True)  # fmt: skip
    question = [{"role": "user", "content": "What is the capital of France?"}]
    message = claude.messages.create(model=DEFAULT_MODEL, max_tokens=40, messages=question,  # type: ignore[arg-type]
                                     extra_body={"temperature": 0.0})  # fmt: skip
    assert "Paris" in message.content[0].text  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    with claude.messages.stream(model=DEFAULT_MODEL, max_tokens=40, messages=question,  # type: ignore[arg-type]
                                extra_body={"temperature": 0.0}) as stream:  # fmt: skip
        assert stream.get_final_message().content[0].text == message.content[0].text  # type: ignore[union-attr]
    with oai.responses.stream(model=DEFAULT_MODEL, input="What is the capital of France?", temperature=0,
                              max_output_tokens=40) as responses:  # fmt: skip
        final = responses.get_final_response()
    assert final.status == "completed" and "Paris" in final.output_text
    counted = claude.messages.count_tokens(model=DEFAULT_MODEL, messages=question)  # type: ignore[arg-type]
    # As in Anthropic's API, tokens read from the (prefix) cache are not part of input_tokens.
    assert counted.input_tokens == message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0)


@pytest.mark.default_model
def test_default_model_json_schema_validates_20_of_20(up_stack: UpStack) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 40}, "country": {"type": "string", "maxLength": 40},
                       "population_millions": {"type": "integer", "minimum": 0, "maximum": 100}},
        "required": ["city", "country", "population_millions"],
        "additionalProperties": False,
    }  # fmt: skip
    client = openai.OpenAI(base_url=up_stack.base_url, api_key="any", max_retries=0, timeout=300,
                           _strict_response_validation=True)  # fmt: skip

    def one(seed: int) -> dict[str, object]:
        reply = client.chat.completions.create(
            model=DEFAULT_MODEL, temperature=1.0, seed=seed, max_tokens=120,
            messages=[{"role": "user", "content": "Describe the capital of France as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},  # type: ignore[arg-type]
        )  # fmt: skip
        assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
        return json.loads(reply.choices[0].message.content or "")  # type: ignore[no-any-return]

    with ThreadPoolExecutor(4) as pool:
        values = list(pool.map(one, range(20)))
    for value in values:
        assert set(value) == {"city", "country", "population_millions"}
        assert isinstance(value["city"], str) and isinstance(value["country"], str)
        assert isinstance(value["population_millions"], int) and 0 <= value["population_millions"] <= 100


@pytest.mark.default_model
def test_default_model_calls_a_tool_in_every_dialect(up_stack: UpStack) -> None:
    weather = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"],
               "additionalProperties": False}  # fmt: skip
    question = [{"role": "user", "content": "What's the weather like in Paris right now?"}]
    oai = openai.OpenAI(base_url=up_stack.base_url, api_key="any", max_retries=0, timeout=120,
                        _strict_response_validation=True)  # fmt: skip
    tool = {"name": "get_weather", "description": "Current weather in a city", "parameters": weather}
    tools = [{"type": "function", "function": tool}]
    reply = oai.chat.completions.create(model=DEFAULT_MODEL, messages=question, tools=tools,  # type: ignore[arg-type]
                                        tool_choice="required", temperature=0, max_tokens=100)  # fmt: skip
    assert reply.choices[0].finish_reason == "tool_calls"
    (call,) = reply.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather" and "Paris" in json.loads(call.function.arguments)["city"]
    response = oai.responses.create(model=DEFAULT_MODEL, input=question, tools=[{"type": "function", **tool}],  # type: ignore[arg-type,list-item]
                                    tool_choice="required", temperature=0, max_output_tokens=100)  # fmt: skip
    assert [(item.type, getattr(item, "name", "")) for item in response.output] == [("function_call", "get_weather")]
    claude = anthropic.Anthropic(base_url=up_stack.base_url.removesuffix("/v1"), api_key="any", max_retries=0,
                                 timeout=120, _strict_response_validation=True)  # fmt: skip
    message = claude.messages.create(
        model=DEFAULT_MODEL, max_tokens=100, messages=question, tool_choice={"type": "any"},  # type: ignore[arg-type]
        tools=[{"name": "get_weather", "description": tool["description"], "input_schema": weather}],  # type: ignore[list-item]
        extra_body={"temperature": 0.0},
    )  # fmt: skip
    assert message.stop_reason == "tool_use"
    assert [(b.type, getattr(b, "name", "")) for b in message.content] == [("tool_use", "get_weather")]


@pytest.mark.default_model
def test_up_serves_metrics(up_stack: UpStack) -> None:
    client = openai.OpenAI(base_url=up_stack.base_url, api_key="any", max_retries=0, timeout=120)
    client.chat.completions.create(model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    with urllib.request.urlopen(f"http://127.0.0.1:{up_stack.metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    assert f'cortex_requests_total{{dialect="openai",model="{DEFAULT_MODEL}",status="200"}}' in text


@pytest.mark.default_model
def test_up_stops_every_child_on_sigterm(up_stack: UpStack) -> None:
    children = descendants(up_stack.proc.pid)
    assert len(children) >= 3  # nats-server, gateway, worker
    up_stack.proc.send_signal(signal.SIGTERM)
    assert up_stack.proc.wait(timeout=60) == 0
    wait_for(lambda: not any(alive(pid) for pid in children), timeout=10, what="children to exit")
    assert "Stopped." in up_stack.log.read_text()
