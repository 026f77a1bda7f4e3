"""A locked-down broker: the users' credentials, the server's configuration, and who provisions.

``deploy/nats-secure.conf`` gives three users, ``gateway``, ``worker`` and
``admin``, the subjects their work needs and no others (docs/security.md). It
includes ``cortex-users.conf``, which holds their passwords as bcrypt hashes;
`write_credentials` makes that file and each user's credentials file
(``<user>.auth``, ``USER:PASSWORD``, `cortex.broker.access`), once, mode 0600.

Who provisions: on an open broker every process creates and updates the
streams and buckets at start (`cortex.broker.provision`), as ever. A process
that connects as a user takes the broker for locked down: there only the admin
provisions (``cortexctl init``, which ``cortexctl up --secure`` runs before it
starts anything else), and every other process `attach`es: it checks that each
stream and bucket is there, with one request every user may make
(``$JS.API.STREAM.NAMES``), and writes nothing; a missing one stops it with a
message naming it. So no process ever sends the broker a request its user may
not make, and no start waits on one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import secrets
import shutil
from pathlib import Path

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from cortex.broker import provision
from cortex.broker.access import Access, read_credentials
from cortex.broker.connection import connect
from cortex.broker.errors import BrokerUnavailable, NotProvisioned
from cortex.protocol import names

log = logging.getLogger("cortex.broker")

USERS = ("gateway", "worker", "admin")
"""The users ``deploy/nats-secure.conf`` defines."""
USERS_FILE = "cortex-users.conf"
"""What the secure configuration includes: a ``CORTEX_<USER>_PASSWORD`` variable per user."""
CONFIG_FILE = "nats-secure.conf"

_BUCKETS = {
    "fleet": names.FLEET_BUCKET, "responses": names.RESPONSES_BUCKET, "placement": names.PLACEMENT_BUCKET,
    "alive": names.ALIVE_BUCKET, "keys": names.KEYS_BUCKET, "limits": names.LIMITS_BUCKET,
    "catalogues": names.CATALOGUE_BUCKET,
}  # fmt: skip
"""`provision.Buckets` field -> bucket name."""
_STREAMS = (names.REQUEST_STREAM, names.USAGE_STREAM, names.AUDIT_STREAM)
_STREAM_NAMES = "$JS.API.STREAM.NAMES"
"""The one JetStream API request every user may make: the names of the streams, nothing of their contents."""


def credentials_file(directory: Path, user: str) -> Path:
    return directory / f"{user}.auth"


def secure_config_template() -> Path:
    """``deploy/nats-secure.conf`` (shipped in the wheel beside ``nats.conf``)."""
    template = Path(__file__).resolve().parent.parent / "deploy" / CONFIG_FILE
    if not template.is_file():
        raise BrokerUnavailable(f"{template} is missing (the cortex package ships it)")
    return template


def write_credentials(directory: Path) -> dict[str, Path]:
    """Each user's credentials file and the server's users file in `directory`, made if missing; user -> file.

    A user's password is made once and kept: processes started with its file
    go on connecting after a restart. The users file is written again from the
    credentials files if it is missing.
    """
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    users_file = directory / USERS_FILE
    files, passwords, made = {}, {}, not users_file.exists()
    for user in USERS:
        path = files[user] = credentials_file(directory, user)
        if not path.exists():
            _write_private(path, f"{user}:{secrets.token_urlsafe(32)}\n")
            made = True
        found, passwords[user] = read_credentials(path)
        if found != user:
            raise BrokerUnavailable(f"{path} is {found!r}'s credentials file, not {user!r}'s")
    if made:
        lines = [f"# The Cortex users' passwords, bcrypt-hashed ({directory}/<user>.auth hold them in the clear)."]
        lines += [
            f"CORTEX_{user.upper()}_PASSWORD: {json.dumps(bcrypt(password))}" for user, password in passwords.items()
        ]
        _write_private(users_file, "\n".join(lines) + "\n")
    return files


def server_config(directory: Path) -> Path:
    """The secure configuration in `directory`, beside the users file it includes (copied at every start, so an
    upgrade's permissions take effect)."""
    write_credentials(directory)
    config = directory / CONFIG_FILE
    shutil.copyfile(secure_config_template(), config)
    config.chmod(0o600)
    return config


def bcrypt(password: str) -> str:
    """The bcrypt hash nats-server checks a password against, from the C library's crypt (libxcrypt).

    Where the C library has no bcrypt (not glibc's libxcrypt: macOS), the password itself: nats-server takes a
    password in the clear too, and the users file is the admin's alone (mode 0600) either way.
    """
    name = ctypes.util.find_library("crypt")
    if name is not None:
        try:
            lib = ctypes.CDLL(name)
            lib.crypt_gensalt.restype = lib.crypt.restype = ctypes.c_char_p
            lib.crypt_gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int]
            lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
            salt = lib.crypt_gensalt(b"$2b$", 11, None, 0)  # the library draws the salt from the OS
            hashed = lib.crypt(password.encode(), salt) if salt else None
        except (OSError, AttributeError):
            hashed = None
        if hashed and hashed.startswith(b"$2b$"):
            return str(hashed.decode())
    log.warning("no bcrypt in the C library: the users file keeps the passwords in the clear")
    return password


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by this user alone from the start (never a moment with wider rights)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # a file that was there keeps its mode through open()
    with os.fdopen(fd, "w") as out:
        out.write(text)


async def attach(nc: NATS, js: JetStreamContext) -> provision.Buckets:
    """Every bucket, provisioned by the admin, without writing or looking into any of them.

    Raises NotProvisioned naming whatever is missing. The handles read with
    plain ``STREAM.MSG.GET`` (not direct gets), which works whatever a bucket's
    ``allow_direct`` is.
    """
    present: set[str] = set()
    try:
        while True:  # a page holds up to 1024 names
            reply = json.loads((await nc.request(_STREAM_NAMES, json.dumps({"offset": len(present)}).encode(),
                                                 timeout=5.0)).data)  # fmt: skip
            page = reply.get("streams") or []
            present.update(page)
            if not page or len(present) >= int(reply.get("total") or 0):
                break
    except Exception as exc:  # nats-py raises several unrelated types here
        raise BrokerUnavailable(f"cannot list the broker's streams: {exc!r}") from exc
    if "error" in reply:
        raise BrokerUnavailable(f"cannot list the broker's streams: {reply['error']}")
    wanted = [*(f"stream {name}" for name in _STREAMS if name not in present),
              *(f"bucket {bucket}" for bucket in _BUCKETS.values() if f"KV_{bucket}" not in present)]  # fmt: skip
    if wanted:
        raise NotProvisioned(f"missing on the broker: {', '.join(wanted)}. On a locked-down broker only the admin "
                             "creates them: run `cortexctl --nats-creds ADMIN_FILE init` "
                             "(`cortexctl up --secure` does)")  # fmt: skip
    handles = {
        field: KeyValue(name=bucket, stream=f"KV_{bucket}", pre=f"$KV.{bucket}.", js=js, direct=False)
        for field, bucket in _BUCKETS.items()
    }
    return provision.Buckets(**handles)


async def provision_broker(url: str, access: Access | None = None) -> None:
    """Create or update every stream and bucket, as the admin (``cortexctl init``; `cortexctl up --secure`)."""
    access = access if access is not None else Access.from_env()
    nc = await connect(url, name="cortexctl init", access=access)
    try:
        await provision.ensure_all(nc.jetstream(timeout=5.0), provision.replicas_for(nc))
    except Exception as exc:
        who = f" as {access.user!r} (on a locked-down broker only the admin user may)" if access.user not in (
            None, "admin") else ""  # fmt: skip
        raise BrokerUnavailable(f"cannot provision the broker at {url}{who}: {exc!r}") from exc
    finally:
        await nc.close()
