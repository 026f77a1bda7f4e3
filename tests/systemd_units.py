"""deploy/systemd's units read as systemd reads them, so a test can start their command lines without systemd.

systemd itself is not the init of a test machine (nor of CI's), so the units are
started by hand: their ``Environment=`` and ``EnvironmentFile=`` lines in order,
then ``ExecStart=`` with ``%i`` for the instance, ``${VAR}`` as one word and
``$VAR`` split at whitespace (systemd.exec(5), systemd.service(5), "Command
lines"). The paths a unit names on a real host (``/opt/cortex/venv/bin``,
``/etc/cortex``, ``/var/lib/cortex``) move to this venv and a test's folder.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

_SIMPLE_VAR = re.compile(r"\$(\w+)")
_BRACED_VAR = re.compile(r"\$\{(\w+)\}")


def service_section(unit: Path) -> list[tuple[str, str]]:
    """The ``[Service]`` section's ``Key=value`` lines, in order (comments and other sections left out)."""
    lines: list[tuple[str, str]] = []
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            lines.append((key.strip(), value.strip()))
    return lines


def read_environment_file(path: Path) -> dict[str, str]:
    """``KEY=value`` lines; the value is the rest of the line (spaces kept), unquoted if it is quoted whole."""
    env: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


@dataclass
class Relocation:
    """Where a unit's host paths live in a test: prefix on the host -> prefix here."""

    prefixes: dict[str, str] = field(default_factory=dict)

    def __call__(self, text: str) -> str:
        for host, here in self.prefixes.items():
            text = text.replace(host, here)
        return text


@dataclass
class Service:
    argv: list[str]
    env: dict[str, str]
    settings: dict[str, str]
    """The other [Service] settings (the last of each key): KillSignal, TimeoutStopSec..."""


def expand(unit: Path, relocate: Relocation, instance: str = "") -> Service:
    """The unit's ExecStart as systemd would run it, with the environment it would give the process."""
    env: dict[str, str] = {}
    settings: dict[str, str] = {}
    exec_start = ""
    for key, value in service_section(unit):
        value = value.replace("%i", instance)
        if key == "Environment":
            for assignment in shlex.split(value):
                name, _, val = assignment.partition("=")
                env[name] = val
        elif key == "EnvironmentFile":
            path = Path(relocate(value.removeprefix("-")))
            if path.exists():
                env |= read_environment_file(path)
            elif not value.startswith("-"):
                raise FileNotFoundError(f"{unit.name}: EnvironmentFile {path} is missing")
        elif key == "ExecStart":
            exec_start = value
        else:
            settings[key] = value
    argv: list[str] = []
    for word in shlex.split(exec_start):
        whole = _SIMPLE_VAR.fullmatch(word)
        if whole:
            argv += env.get(whole[1], "").split()
        else:
            argv.append(_BRACED_VAR.sub(lambda m: env.get(m[1], ""), word))
    return Service(argv=[relocate(a) for a in argv], env=env, settings=settings)


def example_args(unit: Path) -> list[list[str]]:
    """The argument lists a unit's comments suggest (``#   GATEWAY_ARGS=--flag ...``) and its defaults set."""
    found = []
    for raw in unit.read_text().splitlines():
        match = re.search(r"\b(?:GATEWAY|WORKER)_ARGS=([^\"]*)", raw)
        if match and match[1].strip():
            found.append(match[1].split())
    return found
