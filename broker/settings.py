"""Defaults every Cortex process takes from ``cortex.toml`` and the environment, and its logging set-up.

Each option is looked up in this order, the first found wins:

1. the command line (``--port 8080``);
2. the environment: ``CORTEX_NATS_URL``, ``CORTEX_NATS_CREDS``, ``CORTEX_LOG_FORMAT``,
   ``CORTEX_LOG_LEVEL`` for every process, ``CORTEX_GATEWAY_<OPTION>`` and
   ``CORTEX_WORKER_<OPTION>`` for the others (``CORTEX_GATEWAY_PORT=8080``,
   ``CORTEX_WORKER_SLOTS=16``: the option's long name, upper-cased, ``-`` as ``_``; one that
   names no option is reported and ignored);
3. ``cortex.toml``: the file ``$CORTEX_CONFIG`` names, else ``./cortex.toml``, else
   ``~/.config/cortex/cortex.toml``; top-level ``nats``, ``nats_creds``, ``log_format``,
   ``log_level``, and tables ``[gateway]`` and ``[worker]`` keyed by option name
   (``request_timeout = 300`` or ``request-timeout = 300``);
4. the built-in default.

::

    nats = "nats://broker-1:4222,nats://broker-2:4222,nats://broker-3:4222"
    log_format = "json"

    [gateway]
    host = "0.0.0.0"
    request_timeout = 300

    [worker]
    slots = 16
    memory_budget = "70GiB"
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tomllib
from pathlib import Path
from typing import Any

CONFIG_ENV = "CORTEX_CONFIG"
SHARED_KEYS = {"nats": "CORTEX_NATS_URL", "nats_creds": "CORTEX_NATS_CREDS", "log_format": "CORTEX_LOG_FORMAT",
               "log_level": "CORTEX_LOG_LEVEL"}  # fmt: skip
"""The options every process has, and the environment variable of each."""
LOG_FORMATS = ("text", "json")


class ConfigError(Exception):
    """``cortex.toml`` cannot be read, or says something no option takes."""


def config_path() -> Path | None:
    """The ``cortex.toml`` in effect, if any."""
    named = os.environ.get(CONFIG_ENV)
    if named:
        return Path(named)
    for candidate in (Path("cortex.toml"), Path.home() / ".config" / "cortex" / "cortex.toml"):
        if candidate.is_file():
            return candidate
    return None


def read_config(path: Path | None = None) -> dict[str, Any]:
    path = path or config_path()
    if path is None:
        return {}
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc


def shared(key: str, default: str) -> str:
    """A setting every process has (`SHARED_KEYS`): the environment, else ``cortex.toml``, else `default`."""
    from_env = os.environ.get(SHARED_KEYS[key])
    if from_env:
        return from_env
    try:
        value = read_config().get(key)
    except ConfigError:
        return default  # the process's own parser reports a broken file
    return str(value) if value is not None else default


def apply_defaults(parser: argparse.ArgumentParser, section: str) -> None:
    """Make ``cortex.toml`` (`section`'s table and the shared keys) and the environment the defaults of `parser`'s
    options; the command line still wins. Raises ConfigError for a key no option of `parser` takes."""
    actions = {action.dest: action for action in parser._actions if action.option_strings}
    config = read_config()
    values: dict[str, Any] = {key: config[key] for key in SHARED_KEYS if key in config}
    table = config.get(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"[{section}] in cortex.toml must be a table")
    values |= {key.replace("-", "_"): value for key, value in table.items()}
    for dest, env in SHARED_KEYS.items():
        if os.environ.get(env):
            values[dest] = os.environ[env]
    prefix = f"CORTEX_{section.upper()}_"
    for name, value in os.environ.items():
        if not name.startswith(prefix):
            continue
        dest = name[len(prefix) :].lower()
        if dest in actions:
            values[dest] = value
        else:  # the environment is shared with other programs: a stray variable is said, not fatal
            print(f"cortex-{section}: ignoring {name}: no option --{dest.replace('_', '-')}", file=sys.stderr)
    defaults: dict[str, Any] = {}
    for dest, value in values.items():
        action = actions.get(dest)
        if action is None:
            raise ConfigError(f"cortex.toml: no {section} option is called {dest!r}")
        try:
            defaults[dest] = _as_option(action, value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{section} option {dest!r}: {value!r} is not valid ({exc})") from None
    parser.set_defaults(**defaults)


def _as_option(action: argparse.Action, value: Any) -> Any:
    """`value` (a TOML value, or an environment variable's text) as `action` would have parsed it."""
    if isinstance(action, argparse._StoreTrueAction):
        return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes", "on")
    if isinstance(action, argparse._AppendAction):  # a list in TOML, comma-separated in the environment
        items = value if isinstance(value, list) else str(value).split(",")
        return [_one(action, item) for item in items if str(item).strip()]
    return _one(action, value)


def _one(action: argparse.Action, value: Any) -> Any:
    converted = action.type(str(value).strip()) if callable(action.type) else str(value).strip()
    if action.choices is not None and converted not in action.choices:
        raise ValueError(f"choose from {', '.join(map(str, action.choices))}")
    return converted


def parse_service_args(parser: argparse.ArgumentParser, section: str, argv: list[str] | None) -> argparse.Namespace:
    """`argv` parsed by `parser` with the log options added and `apply_defaults(parser, section)` applied; a broken
    ``cortex.toml`` ends the process with its message."""
    add_log_options(parser)
    try:
        apply_defaults(parser, section)
    except ConfigError as exc:
        raise SystemExit(f"{parser.prog}: {exc}") from None
    return parser.parse_args(argv)


def add_log_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default="text",
                        help="text (default) or json: one JSON object per line, for log collectors")  # fmt: skip


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message (and the traceback, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str, log_format: str) -> None:
    """Configure the root logger of this process: `level`, and text or JSON lines on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
