"""Claude Code as a client: the real CLI from npm, headless, against a real gateway and worker.

Claude Code sends what no hand-written test would: a system prompt of thousands of tokens,
a dozen tools with long descriptions and JSON Schema 2020-12 schemas, ``max_tokens: 32000``,
adaptive thinking, beta headers and fields the gateway ignores. The worker here serves
``tiny-long``, a random model with a 64k context and a tokenizer trained on Claude Code's own
prompt (so the prompt takes about as many tokens as with a real model), built to answer
"Hello" and end its turn (see ``build_brief_model``).

The CLI is installed once, at a pinned version, into ``~/.cache/cortex-tests`` (only the npm
registry is needed; without ``npm`` the tests are skipped). It runs with a fresh HOME, no
telemetry, no auto-update and no other traffic than the gateway's.

``tests/data/claude_code_request.json`` is one ``/v1/messages`` body exactly as that version
sends it; the second test replays it with the ``anthropic`` SDK, forcing a tool call and then
answering it. After changing ``CLAUDE_CODE_VERSION``, capture it again with
``.venv/bin/python -m tests.test_claude_code``.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from cortex.broker.server import EmbeddedNats
from tests.conftest import Gateway, metric, serving_model
from tests.tiny_model import build_brief_model

CLAUDE_CODE_VERSION = "2.1.328"
PACKAGE = f"@anthropic-ai/claude-code@{CLAUDE_CODE_VERSION}"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cortex-tests"
INSTALL_DIR = CACHE / f"claude-code-{CLAUDE_CODE_VERSION}"
REQUEST_FILE = Path(__file__).parent / "data" / "claude_code_request.json"

LONG_MODEL = "tiny-long"
CONTEXT_LENGTH = 65536
RUN_TIMEOUT_S = 240
PROMPT = "Say hello."
ANSWER = "Hello"
"""What ``tiny-long`` answers to anything."""

QUIET = {
    "DISABLE_TELEMETRY": "1",
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
}
"""Claude Code talks to nobody but ``ANTHROPIC_BASE_URL``."""


# -- Claude Code, installed once ------------------------------------------------------


def _version(binary: Path) -> str:
    try:
        done = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)  # fmt: skip
    except OSError as exc:
        return str(exc)
    return (done.stdout + done.stderr).strip()


def _installed(folder: Path) -> Path | None:
    binary = folder / "node_modules" / ".bin" / "claude"
    return binary if binary.exists() and _version(binary).startswith(CLAUDE_CODE_VERSION) else None


def install_claude_code() -> Path:
    """The ``claude`` binary of the pinned version, installed with npm into the cache on first use."""
    binary = _installed(INSTALL_DIR)
    if binary is not None:
        return binary
    npm = shutil.which("npm")
    if npm is None:
        reason = f"npm is not installed: cannot install {PACKAGE} (Claude Code) from the npm registry"
        print(reason)
        pytest.skip(reason)
    CACHE.mkdir(parents=True, exist_ok=True)
    # Installed beside the final folder, then renamed: an interrupted install leaves no half a copy.
    staging = Path(tempfile.mkdtemp(prefix=f"{INSTALL_DIR.name}.", dir=CACHE))
    try:
        done = subprocess.run([npm, "install", "--prefix", str(staging), "--no-audit", "--no-fund", PACKAGE],
                              capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)  # fmt: skip
        assert done.returncode == 0, f"npm install {PACKAGE} failed:\n{done.stdout}\n{done.stderr}"
        if _installed(staging) is None:
            # An npm that skipped the package's postinstall leaves a stub where the native binary goes.
            package = staging / "node_modules" / "@anthropic-ai" / "claude-code"
            node = shutil.which("node") or "node"
            subprocess.run([node, "install.cjs"], cwd=package, capture_output=True, timeout=120, check=False)
        binary = _installed(staging)
        says = _version(staging / "node_modules" / ".bin" / "claude")
        assert binary is not None, f"{PACKAGE} installed but `claude --version` says: {says}"
        shutil.rmtree(INSTALL_DIR, ignore_errors=True)  # a copy that does not work (it was checked above)
        with contextlib.suppress(OSError):  # another run installed it first
            staging.rename(INSTALL_DIR)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    binary = _installed(INSTALL_DIR)
    assert binary is not None, f"{INSTALL_DIR} holds no working claude {CLAUDE_CODE_VERSION}"
    return binary


def claude_env(base_url: str, scratch: Path) -> dict[str, str]:
    """Claude Code's environment: only what it needs, a fresh HOME, the gateway as its API."""
    home = scratch / "home"
    (scratch / "tmp").mkdir(parents=True, exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": str(home),
        "CLAUDE_CONFIG_DIR": str(home / ".claude"),
        "TMPDIR": str(scratch / "tmp"),
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_AUTH_TOKEN": "cortex-test",
        "ANTHROPIC_MODEL": LONG_MODEL,
        "ANTHROPIC_SMALL_FAST_MODEL": LONG_MODEL,
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": LONG_MODEL,
        **QUIET,
    }


def run_claude(binary: Path, base_url: str, scratch: Path) -> subprocess.CompletedProcess[str]:
    """``claude -p`` in `scratch`, its debug log in ``scratch/claude-debug.log``."""
    project = scratch / "project"
    project.mkdir(parents=True, exist_ok=True)
    command = [str(binary), "-p", PROMPT, "--output-format", "stream-json", "--verbose", "--max-turns", "2",
               "--debug-file", str(scratch / "claude-debug.log")]  # fmt: skip
    return subprocess.run(command, cwd=project, env=claude_env(base_url, scratch), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S, stdin=subprocess.DEVNULL)  # fmt: skip


# -- the model, a worker and a gateway of this module's own --------------------------


def prompt_texts(body: dict[str, Any]) -> list[str]:
    """The text of a Messages body: system, messages, and the tools as JSON."""
    texts: list[str] = []
    for part in [body.get("system"), *(m["content"] for m in body["messages"])]:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, list):
            texts += [block.get("text", "") for block in part]
    return texts + [json.dumps(tool) for tool in body.get("tools", [])]


def captured_request() -> dict[str, Any]:
    body = json.loads(REQUEST_FILE.read_text())
    assert isinstance(body, dict)
    return body


@pytest.fixture(scope="module")
def claude_code() -> Path:
    return install_claude_code()


@pytest.fixture(scope="module")
def long_gateway(nats_server: EmbeddedNats, tmp_path_factory: pytest.TempPathFactory,
                 logs_dir: Path) -> Iterator[Gateway]:  # fmt: skip
    folder = build_brief_model(tmp_path_factory.mktemp("tiny-long"), prompt_texts(captured_request()),
                               max_positions=CONTEXT_LENGTH)  # fmt: skip
    with serving_model(nats_server.url, logs_dir, tmp_path_factory.mktemp("long-catalogue"), folder, LONG_MODEL,
                       context_length=CONTEXT_LENGTH, worker_id="test-worker-long") as gateway:  # fmt: skip
        yield gateway


def gateway_log(gateway: Gateway, logs_dir: Path, tail: int = 6000) -> str:
    return (logs_dir / f"gateway-{gateway.port}.log").read_text(errors="replace")[-tail:]


def error_counts(gateway: Gateway) -> str:
    """The gateway's error counters (by code, dialect and model): it does not log a client's 4xx."""
    lines = httpx.get(gateway.metrics_url, timeout=10).text.splitlines()
    return "\n".join(line for line in lines if line.startswith("cortex_request_errors_total{"))


def logged_api_errors(debug_log: Path) -> list[str]:
    """The lines of Claude Code's debug log that report an error answer from the API."""
    lines = debug_log.read_text(errors="replace").splitlines() if debug_log.exists() else []
    return [line for line in lines if "API error" in line]


def event_of(line: str) -> dict[str, Any]:
    """One line of ``--output-format stream-json``: a JSON object (empty if the line is anything else)."""
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return {}
    return event if isinstance(event, dict) else {}


def answered_requests(gateway: Gateway) -> float:
    return metric(gateway, "cortex_requests_total", dialect="anthropic", model=LONG_MODEL, status="200")


# -- the tests ------------------------------------------------------------------------


def test_claude_code_runs_headless_against_the_gateway(
    claude_code: Path, long_gateway: Gateway, logs_dir: Path, tmp_path: Path
) -> None:
    errors, answered = metric(long_gateway, "cortex_request_errors_total"), answered_requests(long_gateway)
    done = run_claude(claude_code, long_gateway.root_url, tmp_path)
    api_errors = logged_api_errors(tmp_path / "claude-debug.log")
    context = "\n".join(["Claude Code's API errors:", *api_errors, "gateway errors:", error_counts(long_gateway),
                         "stderr:", done.stderr[-3000:], "stdout:", done.stdout[-3000:], "gateway log:",
                         gateway_log(long_gateway, logs_dir)])  # fmt: skip
    assert done.returncode == 0, context
    # Claude Code retries some 400s with a request rewritten to suit, and says nothing but in its debug log.
    assert not api_errors, context
    assert metric(long_gateway, "cortex_request_errors_total") == errors, context
    assert answered_requests(long_gateway) > answered, context
    events = [event_of(line) for line in done.stdout.splitlines()]
    assert events and all(events), f"stdout lines that are not JSON objects: {context}"
    init, result = events[0], events[-1]
    assert (init["type"], init["subtype"], init["model"]) == ("system", "init", LONG_MODEL), context
    retries = [e for e in events if e.get("subtype") == "api_retry"]
    assert not retries, context
    assert result["type"] == "result", context
    assert result["is_error"] is False and result["subtype"] == "success", context
    assert result["api_error_status"] is None, context
    assert result["result"] == ANSWER, context
    replies = [e["message"] for e in events if e["type"] == "assistant"]
    assert replies and all(r["model"] == LONG_MODEL for r in replies), context
    usage = result["usage"]
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] > 5000, "the whole prompt reached the model"


def check_schema(value: object, schema: dict[str, Any], where: str = "input") -> None:
    """`value` against the JSON Schema keywords Claude Code's tools use (types, required, enum, bounds)."""
    kinds = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int, "number": (int, float),
             "null": type(None)}  # fmt: skip
    kind = schema.get("type")
    if kind is not None:
        assert isinstance(value, kinds[kind]), f"{where}: {value!r} is not {kind}"
        assert kind in ("boolean", "null") or not isinstance(value, bool), f"{where}: {value!r} is not {kind}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        assert value >= schema.get("minimum", value) and value <= schema.get("maximum", value), where
        assert "exclusiveMinimum" not in schema or value > schema["exclusiveMinimum"], where
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        for name in schema.get("required", []):
            assert name in value, f"{where}: {name!r} is required"
        for name, item in value.items():
            if name in properties:
                check_schema(item, properties[name], f"{where}.{name}")
            else:
                assert schema.get("additionalProperties", True) is not False, f"{where}: {name!r} is not allowed"
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            check_schema(item, schema["items"], f"{where}[{i}]")


SDK_FIELDS = ("messages", "system", "tools", "metadata", "thinking", "output_config")
"""The captured body's fields the SDK's ``messages.create`` names; the others go in ``extra_body``."""


def replay_params(body: dict[str, Any], **changes: Any) -> dict[str, Any]:
    params = {k: body[k] for k in SDK_FIELDS if k in body}
    extra = {k: v for k, v in body.items() if k not in (*SDK_FIELDS, "model", "max_tokens", "stream")}
    return params | {"model": LONG_MODEL, "max_tokens": 64, "extra_body": extra} | changes


def send(client: anthropic.Anthropic, params: dict[str, Any], streamed: bool) -> anthropic.types.Message:
    if streamed:
        with client.messages.stream(**params) as stream:
            return stream.get_final_message()
    return client.messages.create(**params)  # type: ignore[no-any-return]


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_captured_request_calls_a_tool_and_reads_its_result(long_gateway: Gateway, streamed: bool) -> None:
    body = captured_request()
    tool = next(t for t in body["tools"] if t["name"] == "Bash")
    client = anthropic.Anthropic(base_url=long_gateway.root_url, api_key="unused", max_retries=0, timeout=120,
                                 _strict_response_validation=True)  # fmt: skip
    forced = {"type": "tool", "name": tool["name"], "disable_parallel_tool_use": True}
    first = send(client, replay_params(body, tool_choice=forced), streamed)
    assert first.stop_reason == "tool_use"
    (use,) = [block for block in first.content if block.type == "tool_use"]
    assert use.name == tool["name"] and use.id
    check_schema(use.input, tool["input_schema"])

    history = [
        *body["messages"],
        {"role": "assistant", "content": [block.model_dump(exclude_none=True) for block in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "hello from Bash"}]},
    ]
    second = send(client, replay_params(body, messages=history, tool_choice={"type": "none"}), streamed)
    assert second.stop_reason == "end_turn"
    assert [block.type for block in second.content] == ["text"]
    assert second.content[0].text == ANSWER  # type: ignore[union-attr]


# -- capturing a request body again: python -m tests.test_claude_code ------------------


def _answer_events(model: str) -> bytes:
    """A whole streamed answer, "Hello", in Anthropic's events."""
    usage = {"input_tokens": 1, "output_tokens": 0}
    message = {"id": "msg_capture", "type": "message", "role": "assistant", "model": model, "content": [],
               "stop_reason": None, "stop_sequence": None, "usage": usage}  # fmt: skip
    events = [
        {"type": "message_start", "message": message},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": ANSWER}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
         "usage": {"output_tokens": 1}},
        {"type": "message_stop"},
    ]  # fmt: skip
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


def capture_request() -> dict[str, Any]:
    """The first ``/v1/messages`` body Claude Code sends, caught by a stand-in server that answers "Hello"."""
    bodies: list[dict[str, Any]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
            if self.path.split("?")[0] == "/v1/messages":
                bodies.append(body)
            reply = _answer_events(body.get("model", "")) if body.get("stream") else b'{"input_tokens": 1}'
            self.send_response(200)
            self.send_header("content-type", "text/event-stream" if body.get("stream") else "application/json")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with tempfile.TemporaryDirectory() as scratch:
            done = run_claude(install_claude_code(), f"http://127.0.0.1:{server.server_port}", Path(scratch))
    finally:
        server.shutdown()
    assert done.returncode == 0 and bodies, f"claude exited {done.returncode}:\n{done.stderr}\n{done.stdout}"
    return bodies[0]


if __name__ == "__main__":
    REQUEST_FILE.parent.mkdir(exist_ok=True)
    REQUEST_FILE.write_text(json.dumps(capture_request(), indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {REQUEST_FILE}", file=sys.stderr)
