"""``cortexctl init``, ``cortexctl credentials`` and the ``--nats-creds`` option of every command.

::

    cortexctl credentials /etc/cortex                 # once: gateway.auth, worker.auth, admin.auth, cortex-users.conf
    cortexctl --nats-creds /etc/cortex/admin.auth init --nats nats://broker:4222   # after each upgrade too
    CORTEX_NATS_CREDS=/etc/cortex/admin.auth cortexctl status

On a locked-down broker (``deploy/nats-secure.conf``) only the admin user
creates and updates the streams and buckets; gateways and workers find them
(`cortex.broker.lockdown`).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer

from cortex.broker import lockdown
from cortex.broker.access import CREDS_ENV, use_credentials
from cortex.broker.connection import DEFAULT_URL
from cortex.broker.errors import BrokerError, CredentialsError


def options(
    nats_creds: Annotated[
        Path | None,
        typer.Option("--nats-creds", metavar="FILE", show_default=False,
                     help=f"NATS credentials file (USER:PASSWORD) for a locked-down broker; default ${CREDS_ENV}"),
    ] = None,
) -> None:  # fmt: skip
    """Operate a Cortex fleet."""
    try:
        use_credentials(nats_creds)
    except CredentialsError as exc:
        typer.echo(f"cortexctl: {exc}", err=True)
        raise typer.Exit(2) from None


def init(nats: Annotated[str, typer.Option(help="NATS server URL")] = DEFAULT_URL) -> None:
    """Create or update every stream and bucket: on a locked-down broker, as the admin, once and after upgrades."""
    try:
        asyncio.run(lockdown.provision_broker(nats))
    except BrokerError as exc:
        typer.echo(f"cortexctl init: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{nats}: every Cortex stream and bucket is in place")


def credentials(
    directory: Annotated[Path, typer.Argument(help="where to write them (kept if there already)")],
) -> None:
    """Make the users' credentials for deploy/nats-secure.conf, once: <user>.auth each, and cortex-users.conf."""
    try:
        files = lockdown.write_credentials(directory)
    except (OSError, BrokerError) as exc:
        typer.echo(f"cortexctl credentials: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{directory / lockdown.USERS_FILE}  (nats-server includes it: put it beside nats-secure.conf)")
    for user, path in files.items():
        typer.echo(f"{path}  (the {user}'s: --nats-creds {path} or {CREDS_ENV}={path})")


def up_banner(secure_dir: Path | None) -> str:
    """The lines `cortexctl up --secure` adds to its banner (none without it)."""
    if secure_dir is None:
        return ""
    admin = lockdown.credentials_file(secure_dir, "admin")
    return (f"  NATS users       gateway, worker, admin (locked down; credentials in {secure_dir})\n"
            f"  cortexctl        cortexctl --nats-creds {admin} status\n")  # fmt: skip
