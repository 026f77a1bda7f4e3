"""Options from the command line, the environment and cortex.toml, in that order; JSON log lines."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from cortex.broker.settings import JsonFormatter
from cortex.gateway.main import parse_args as gateway_args
from cortex.worker.main import parse_args as worker_args


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cortex.toml"
    path.write_text('nats = "nats://from-file:4222"\nlog_format = "json"\n\n[gateway]\nport = 1234\n'
                    'request-timeout = 300\nrequire_keys = true\n\n[worker]\nslots = 16\n')  # fmt: skip
    monkeypatch.setenv("CORTEX_CONFIG", str(path))
    for name in ("CORTEX_NATS_URL", "CORTEX_LOG_FORMAT", "CORTEX_GATEWAY_PORT", "CORTEX_GATEWAY_REQUEST_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    return path


def test_the_file_sets_defaults_the_environment_overrides_it_the_command_line_wins(
    config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = gateway_args([])
    assert (args.port, args.request_timeout, args.require_keys) == (1234, 300.0, True)
    assert (args.nats, args.log_format) == ("nats://from-file:4222", "json")
    assert worker_args([]).slots == 16
    monkeypatch.setenv("CORTEX_GATEWAY_REQUEST_TIMEOUT", "5")
    monkeypatch.setenv("CORTEX_NATS_URL", "nats://from-env:4222")
    args = gateway_args(["--port", "999"])
    assert (args.port, args.request_timeout, args.nats) == (999, 5.0, "nats://from-env:4222")


def test_an_option_nobody_takes_stops_the_process_from_the_file_and_is_said_from_the_environment(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CORTEX_WORKER_SLOTZ", "3")
    assert worker_args([]).slots == 16 and "ignoring CORTEX_WORKER_SLOTZ" in capsys.readouterr().err
    config.write_text("[worker]\nslotz = 3\n")
    with pytest.raises(SystemExit, match="slotz"):
        worker_args([])
    config.write_text("[gateway]\nport = [1\n")
    with pytest.raises(SystemExit, match="cannot read"):
        gateway_args([])


def test_a_json_log_line_is_one_object() -> None:
    record = logging.LogRecord("cortex.gateway", logging.WARNING, __file__, 1, "hello %s", ("world",), None)
    line = JsonFormatter().format(record)
    assert json.loads(line) | {"time": "t"} == {"time": "t", "level": "WARNING", "logger": "cortex.gateway",
                                                "message": "hello world"}  # fmt: skip
