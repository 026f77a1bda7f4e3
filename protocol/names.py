"""Every subject, stream, consumer, bucket and key name Cortex uses.

Call sites never build names with f-strings: they call these functions, so the
names operators see in `nats stream info` and `nats kv ls` are defined once.

Model names such as ``org/Model-1.5B.Q4`` contain characters that are not valid
in a subject token (``.``, ``*``, ``>``, whitespace) or in a KV key, so they are
escaped reversibly: ASCII letters, digits and ``-`` pass through, every other
byte of the UTF-8 encoding becomes ``_XX`` (two upper-case hex digits). The
result uses only ``[A-Za-z0-9_-]``, which is valid both as a subject token and
as a KV key, and ``decode_model_token`` undoes it exactly.
"""

from __future__ import annotations

import re

REQUEST_STREAM = "CORTEX_REQUESTS"
"""JetStream stream holding pending generation requests (work-queue retention)."""

FLEET_BUCKET = "cortex-fleet"
"""KV bucket with one advert per live worker (entries expire by TTL)."""
RESPONSES_BUCKET = "cortex-responses"
"""KV bucket of stored OpenAI Responses (``store``), keyed by response id, so any gateway can continue one."""
RESPONSES_TTL_S = 30 * 24 * 3600.0

_REQUEST_PREFIX = "cortex.req"
_REPLY_PREFIX = "cortex.reply"
_CONSUMER_PREFIX = "cortex-"
_WORKER_KEY_PREFIX = "workers."

_PLAIN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-")
_TOKEN_RE = re.compile(r"(?:[A-Za-z0-9-]|_[0-9A-F]{2})+")
_ID_RE = re.compile(r"[A-Za-z0-9_-]+")


def encode_model_token(model: str) -> str:
    """Escape a model name into a subject token / KV key segment.

    >>> encode_model_token("org/Model-1.5B.Q4")
    'org_2FModel-1_2E5B_2EQ4'
    """
    if not model:
        raise ValueError("model name must not be empty")
    out: list[str] = []
    for byte in model.encode("utf-8"):
        if byte in _PLAIN:
            out.append(chr(byte))
        else:
            out.append(f"_{byte:02X}")
    return "".join(out)


def decode_model_token(token: str) -> str:
    """Invert `encode_model_token`; raises ValueError on a malformed token."""
    if not _TOKEN_RE.fullmatch(token):
        raise ValueError(f"not a model token: {token!r}")
    raw = bytearray()
    i = 0
    while i < len(token):
        if token[i] == "_":
            raw.append(int(token[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.append(ord(token[i]))
            i += 1
    return raw.decode("utf-8")


def _check_id(kind: str, value: str) -> str:
    if not _ID_RE.fullmatch(value):
        raise ValueError(f"{kind} must match [A-Za-z0-9_-]+, got {value!r}")
    return value


def request_subject(model: str) -> str:
    """Subject a gateway publishes a request for `model` to."""
    return f"{_REQUEST_PREFIX}.{encode_model_token(model)}"


def request_subject_wildcard() -> str:
    """Subjects bound to the request stream: every model's shared subject and its workers' affine ones."""
    return f"{_REQUEST_PREFIX}.>"


def consumer_name(model: str) -> str:
    """Durable pull consumer shared by every worker that serves `model`."""
    return f"{_CONSUMER_PREFIX}{encode_model_token(model)}"


def affine_subject(model: str, worker_id: str) -> str:
    """Where a gateway publishes a request for `model` meant for one worker first (conversation affinity).

    One token below the model's shared subject: the shared consumer's filter is the
    exact shared subject, so the two never overlap, as a work-queue stream requires.
    """
    return f"{request_subject(model)}.{encode_model_token(worker_id)}"


def affine_wildcard(model: str) -> str:
    """Every worker's affine subject of `model` (with `request_subject`: the whole queue of `model`)."""
    return f"{request_subject(model)}.>"


def affine_consumer_name(model: str, worker_id: str) -> str:
    """The durable pull consumer of `worker_id`'s affine subject of `model`: ``cortex-<model>__<worker>``.

    ``__`` never occurs inside a token (``_`` always starts an escape, ``_XX``), so the
    name splits back unambiguously.
    """
    return f"{consumer_name(model)}__{encode_model_token(worker_id)}"


MOVED_BY_HEADER = "Cortex-Moved-By"
"""On an affine request moved to its shared subject: the worker that moved it (for want of a slot)."""


def moved_msg_id(msg_id: str, stream_seq: int) -> str:
    """``Nats-Msg-Id`` of an affine request moved to its shared subject: new, so the duplicate window keeps it,
    and the same for every try at moving the one message, so a move retried after a lost ack is not doubled."""
    return f"{msg_id}~moved-{stream_seq}"


def pull_next_subject(stream: str, durable: str) -> str:
    """The JetStream API subject a pull request for `durable`'s next messages goes to (`broker/standing.py`)."""
    return f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"


def reply_subject(gateway_id: str, request_id: str) -> str:
    """Core-NATS subject a worker sends one request's chunks to."""
    return f"{_REPLY_PREFIX}.{_check_id('gateway id', gateway_id)}.{_check_id('request id', request_id)}"


def reply_wildcard(gateway_id: str) -> str:
    """The one subscription a gateway process holds for all of its replies."""
    return f"{_REPLY_PREFIX}.{_check_id('gateway id', gateway_id)}.*"


_TAKEN_TOKEN = "taken"


def taken_subject(reply_subject: str) -> str:
    """Where a worker tells a request's gateway at once that it took the request, or moved it (`Taken`).

    The reply subject and one token more: a gateway's `reply_wildcard` does not match
    it, so a gateway older than the notice never hears one (nor takes it for a chunk).
    """
    return f"{reply_subject}.{_TAKEN_TOKEN}"


def taken_wildcard(gateway_id: str) -> str:
    """The subscription a gateway holds for the `taken_subject` of all of its requests."""
    return f"{reply_wildcard(gateway_id)}.{_TAKEN_TOKEN}"


def request_id_from_reply(subject: str) -> str:
    """The request id is the last token of a reply subject."""
    return subject.rsplit(".", 1)[-1]


def worker_key(worker_id: str) -> str:
    """KV key of a worker's advert in `FLEET_BUCKET`."""
    return f"{_WORKER_KEY_PREFIX}{encode_model_token(worker_id)}"


def is_worker_key(key: str) -> bool:
    return key.startswith(_WORKER_KEY_PREFIX)


ADVERT_INTERVAL_S = 2.0
"""How often a worker rewrites its advert."""

ADVERT_TTL_S = 10.0
"""Fleet bucket TTL: an advert not refreshed for this long disappears by itself."""


CATALOGUE_BUCKET = "cortex-catalogues"
"""KV bucket of worker catalogues, each under its digest (`cortex.protocol.catalogues`), written once per change;
adverts name theirs by digest. Entries outlive `CATALOGUE_MAX_AGE_S` only by being written again."""
_CATALOGUE_PREFIX = "catalogues."

CATALOGUE_MAX_AGE_S = 24 * 3600.0
"""The catalogue bucket's max age: a catalogue no worker has written for this long goes (a worker long gone)."""
CATALOGUE_REFRESH_S = 600.0
"""How often a worker writes its catalogue again (and at start, and on each change), far inside
`CATALOGUE_MAX_AGE_S`: a catalogue lost (a purged bucket) comes back within this."""


def catalogue_key(digest: str) -> str:
    """KV key of the catalogue whose digest is `digest`, in `CATALOGUE_BUCKET`."""
    return f"{_CATALOGUE_PREFIX}{_check_id('catalogue digest', digest)}"


ALIVE_BUCKET = "cortex-alive"
"""KV bucket with one heartbeat key per live worker, each expiring on its own (`HEARTBEAT_TTL_S`)."""
_ALIVE_KEY_PREFIX = "alive."

HEARTBEAT_INTERVAL_S = 0.5
"""How often a worker rewrites its heartbeat key, from its asyncio loop (never the engine thread)."""

HEARTBEAT_TTL_S = 2
"""A heartbeat not rewritten for this long is gone: the key expires (per-message TTL, whole seconds) and every
reader stops counting the worker. Three beats missed in a row, so a worker late by 1.5 s is still live."""

HEARTBEAT_GONE_S = 20
"""How long the marker of an expired or withdrawn heartbeat stays: longer than an advert outlives its worker
(`ADVERT_TTL_S`), so a reader that starts meanwhile knows the advert is a dead worker's."""


def alive_key(worker_id: str) -> str:
    """KV key of a worker's heartbeat in `ALIVE_BUCKET`."""
    return f"{_ALIVE_KEY_PREFIX}{encode_model_token(worker_id)}"


def worker_of_alive_key(key: str) -> str | None:
    """The worker id of a heartbeat key, else None (another key, or a malformed one)."""
    if not key.startswith(_ALIVE_KEY_PREFIX):
        return None
    try:
        return decode_model_token(key[len(_ALIVE_KEY_PREFIX) :])
    except ValueError:
        return None


PLACEMENT_BUCKET = "cortex-placement"
"""KV bucket of decisions that outlive any process: placements, pins, drains (no TTL)."""
_PLACEMENT_PREFIX = "models."
_PIN_PREFIX = "pins."
_DRAIN_PREFIX = "drain."
KEEPER_KEY = "keeper"
"""The `Keeper` record in `PLACEMENT_BUCKET`: which worker watches the whole fleet for the others."""
KEEPER_RENEW_S = 1.0
"""How often the keeper rewrites its record."""
KEEPER_LEASE_S = 5.0
"""A keeper record not rewritten for this long (by the reader's own clock) may be taken over."""


def placement_key(model: str) -> str:
    """Where `model` should be loaded (a `Placement`), in `PLACEMENT_BUCKET`."""
    return f"{_PLACEMENT_PREFIX}{encode_model_token(model)}"


def pin_key(model: str) -> str:
    """A `Pin` keeping `model` loaded, in `PLACEMENT_BUCKET`."""
    return f"{_PIN_PREFIX}{encode_model_token(model)}"


def drain_key(worker_id: str) -> str:
    """Present while `worker_id` is draining (cortexctl drain; a `Drain`), in `PLACEMENT_BUCKET`."""
    return f"{_DRAIN_PREFIX}{encode_model_token(worker_id)}"


def parse_placement_key(key: str) -> tuple[str, str] | None:
    """(``placement`` | ``pin`` | ``drain``, model or worker id) for a placement-bucket key, else None."""
    for kind, prefix in (("placement", _PLACEMENT_PREFIX), ("pin", _PIN_PREFIX), ("drain", _DRAIN_PREFIX)):
        if key.startswith(prefix):
            try:
                return kind, decode_model_token(key[len(prefix) :])
            except ValueError:
                return None
    return None


def cancel_subject() -> str:
    """Gateways publish a request id here when its client went away; every worker listens."""
    return "cortex.cancel"


KEYS_BUCKET = "cortex-keys"
"""KV bucket of API keys (`cortex.protocol.keys.ApiKey`, the secret only as its hash), one per key name; cortexctl
writes it, every gateway watches it."""
_API_KEY_PREFIX = "keys."

LIMITS_BUCKET = "cortex-limits"
"""KV bucket of each key's rate-limit window (`cortex.protocol.keys.LimitWindow`), rewritten by the gateways with
compare-and-set, so a limit holds across every gateway."""
_LIMIT_PREFIX = "limits."

USAGE_STREAM = "CORTEX_USAGE"
"""JetStream stream of one `cortex.protocol.keys.UsageRecord` per finished request, by key name."""
_USAGE_PREFIX = "cortex.usage"

AUDIT_STREAM = "CORTEX_AUDIT"
"""JetStream stream of admin actions (`cortex.protocol.keys.AuditEvent`): key changes, pins, loads, drains."""
_AUDIT_PREFIX = "cortex.audit"

KEY_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
"""What an API key's name may be: it is a Prometheus label value and part of KV keys and subjects."""


def check_key_name(name: str) -> str:
    """`name` if it may name an API key, else ValueError."""
    if not KEY_NAME_RE.fullmatch(name):
        raise ValueError(f"a key name is 1 to 64 letters, digits, '_', '.' or '-' (starting with a letter or digit), "
                         f"got {name!r}")  # fmt: skip
    return name


def api_key_key(name: str) -> str:
    """KV key of the API key `name` in `KEYS_BUCKET`."""
    return f"{_API_KEY_PREFIX}{encode_model_token(name)}"


def limit_key(name: str) -> str:
    """KV key of the API key `name`'s rate-limit window in `LIMITS_BUCKET`."""
    return f"{_LIMIT_PREFIX}{encode_model_token(name)}"


def usage_subject(name: str) -> str:
    """Subject of the usage records of the API key `name` (``open`` for requests made without keys)."""
    return f"{_USAGE_PREFIX}.{encode_model_token(name)}"


def usage_wildcard() -> str:
    return f"{_USAGE_PREFIX}.*"


def audit_subject(action: str) -> str:
    """Subject of one kind of admin action (``keys.add``, ``pin``...): each dot-separated part escaped."""
    return ".".join([_AUDIT_PREFIX, *(encode_model_token(part) for part in action.split("."))])


def audit_wildcard() -> str:
    return f"{_AUDIT_PREFIX}.>"
