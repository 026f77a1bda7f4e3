"""Who a process is to the broker, and how it trusts it: a user's credentials from a file, TLS.

A secret never travels on the command line (every user of the host reads
``ps``); a process learns its NATS user from a credentials file named by
``--nats-creds FILE`` or by ``CORTEX_NATS_CREDS``. The file holds one line,
``USER:PASSWORD`` (lines starting with ``#`` are comments), readable by the
service's user alone; ``cortexctl credentials DIR`` writes one per Cortex user.
TLS comes from the environment too: ``CORTEX_NATS_TLS_CA`` (the CA that signed
the server's certificate) and, where the server verifies clients,
``CORTEX_NATS_TLS_CERT`` and ``CORTEX_NATS_TLS_KEY``.

::

    access = Access.from_env()                 # CORTEX_NATS_CREDS, CORTEX_NATS_TLS_*
    access = Access.from_env(creds="/etc/cortex/worker.auth")
    nc = await connect(url, name="cortex-worker", access=access)

A process with a user takes the broker for locked down: the admin provisions
its streams and buckets (``cortexctl init``), the others only check that they
are there (`cortex.broker.lockdown`).
"""

from __future__ import annotations

import logging
import os
import re
import ssl
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cortex.broker.errors import CredentialsError

log = logging.getLogger("cortex.broker")

CREDS_ENV = "CORTEX_NATS_CREDS"
TLS_CA_ENV = "CORTEX_NATS_TLS_CA"
TLS_CERT_ENV = "CORTEX_NATS_TLS_CERT"
TLS_KEY_ENV = "CORTEX_NATS_TLS_KEY"

_USER_RE = re.compile(r"[A-Za-z0-9_-]+")
"""A user name is one subject token: it names the user's own inboxes (``_INBOX.<user>.>``)."""

_creds_override: Path | None = None
_warned: set[Path] = set()
"""Files already said to be readable by others (a process reads its file at every connection)."""


def use_credentials(path: str | Path | None) -> None:
    """Make `path` this process's credentials file, over ``CORTEX_NATS_CREDS`` (``--nats-creds``).

    Read at once, so a wrong path stops the process at start, not at its first connection.
    """
    global _creds_override
    _creds_override = Path(path) if path else None
    if _creds_override is not None:
        read_credentials(_creds_override)


def read_credentials(path: Path) -> tuple[str, str]:
    """(user, password) from a credentials file; raises CredentialsError."""
    try:
        text = path.read_text()
        mode = path.stat().st_mode
    except OSError as exc:
        raise CredentialsError(f"cannot read the NATS credentials file {path}: {exc.strerror or exc}") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO) and path not in _warned:
        _warned.add(path)
        log.warning("the NATS credentials file %s can be read by other users (chmod 600 it)", path)
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    user, colon, password = lines[0].partition(":") if len(lines) == 1 else ("", "", "")
    if not colon or not _USER_RE.fullmatch(user) or not password:
        raise CredentialsError(f"{path} is not a NATS credentials file: it should hold one line, USER:PASSWORD "
                               "(the user's name being letters, digits, '_' or '-')")  # fmt: skip
    return user, password


@dataclass(frozen=True)
class Access:
    """A NATS user and the TLS files a connection presents and trusts; the defaults are an anonymous plain one."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @classmethod
    def from_env(cls, creds: str | Path | None = None) -> Access:
        """`creds`, else the ``--nats-creds`` file of this process, else ``$CORTEX_NATS_CREDS``; TLS from the env."""
        path = Path(creds) if creds else _creds_override or _env_path(CREDS_ENV)
        user, password = read_credentials(path) if path is not None else (None, None)
        return cls(user=user, password=password, tls_ca=_env_path(TLS_CA_ENV), tls_cert=_env_path(TLS_CERT_ENV),
                   tls_key=_env_path(TLS_KEY_ENV))  # fmt: skip

    @classmethod
    def from_file(cls, creds: Path) -> Access:
        """The user of a credentials file, with no TLS (a broker on this host: `cortexctl up --secure`)."""
        user, password = read_credentials(creds)
        return cls(user=user, password=password)

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)

    @property
    def inbox_prefix(self) -> str:
        """Where the JetStream API and the broker answer this connection: a user's own inboxes on a locked-down
        broker, so no other user may subscribe to them."""
        return f"_INBOX.{self.user}" if self.user else "_INBOX"

    def tls_context(self) -> ssl.SSLContext | None:
        """A client context trusting `tls_ca` (else the system's CAs) and presenting `tls_cert`, if TLS is set."""
        if not self.tls:
            return None
        try:
            context = ssl.create_default_context(cafile=str(self.tls_ca) if self.tls_ca else None)
            if self.tls_cert:
                context.load_cert_chain(str(self.tls_cert), str(self.tls_key) if self.tls_key else None)
        except (OSError, ssl.SSLError) as exc:
            raise CredentialsError(f"cannot load the TLS files ({TLS_CA_ENV}, {TLS_CERT_ENV}, {TLS_KEY_ENV}): "
                                   f"{exc}") from exc  # fmt: skip
        return context

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect``."""
        options: dict[str, Any] = {"inbox_prefix": self.inbox_prefix}
        if self.user is not None:
            options |= {"user": self.user, "password": self.password}
        context = self.tls_context()
        if context is not None:
            options["tls"] = context
        return options


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name, "").strip()
    return Path(value) if value else None
