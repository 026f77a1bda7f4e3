"""Conversation affinity, the gateway's half: which worker likely holds a request's prompt prefix in its cache.

A worker keeps the KV of the prompts it answered (its prefix cache), so the
next turn of a conversation, a Responses ``previous_response_id``, or another
prompt with the same long system part runs faster where the last one ran.
This module names prompt prefixes by keys and picks that worker; the relay
publishes the request to the worker's affine subject
(``cortex.req.<model>.<worker>``), which that worker takes from first, else to
the model's shared subject as ever. The worker's half is `cortex.worker.affine`
(and `cortex.worker.conversations`).

Keys, over the canonical request (so every dialect agrees): ``k0`` hashes the
model, the tools and the leading system messages; each later message ``i``
gives ``k_i = H(k_{i-1}, message i)``. Turn n+1 of a conversation repeats turn
n's messages, so turn n's last key is in turn n+1's chain; prompts sharing a
system part share ``k0``. A raw prompt (completions) is chained by blocks of
`PROMPT_BLOCK` characters instead. Prefixes shorter than `MIN_PREFIX_BYTES`
get no key: too little to save to be worth a preference. A request carries its
system key and its last key (`GenerateRequest.prefix_keys`); the worker that
answers it advertises them (`ModelState.prefix_keys`), and this gateway
remembers them at once (`remember`), until the advert says so too.

The choice: the longest prefix of the chain that a live worker, ready for the
model, not draining, taking affine requests for it (`ModelState.affine`: it has
its consumer of its affine subject), and with a free slot, holds; the one with
most free slots among equals; when every worker ready for the model is full and
none of them saw requests waiting in its queue, the holder of the longest
prefix all the same (the shared queue would wait too, and nobody is passed);
else none (the shared subject). Free slots are the advert's, corrected by what
this gateway saw since that advert was written: its requests that started there
(one fewer), ended there (one more: the next turn of an agent comes at once,
before the worker's next advert), and the affine requests it sent there that
have not been taken yet. A worker that fills up meanwhile hands the
request on after its window: no request waits behind an affinity it cannot use.

`Placed` follows one request (one `cortex.gateway.relay.ReplyStream`): which
worker's affine subject holds it, until that worker takes it (`Taken`), and
whose slot it takes, for the counts above.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from cortex.protocol import GenerateRequest, WorkerAdvert
from cortex.protocol import messages as m

TAKE_PATIENCE_S = 0.3 + 10.0
"""How long a request sent to a worker first may wait for that worker's `Taken` (taken, or moved to the shared
queue) before its gateway sends it on itself: the workers' affinity window (`cortex.worker.affine`, 0.3 s) and
10 s. A worker whose moves go unanswered lets the request go silently after a while (`MOVE_TRIES_S`); its gateway
must not wait for the deadline then."""
MIN_PREFIX_BYTES = 256
"""A prefix whose canonical JSON is shorter than this gets no key (a few dozen tokens: nothing worth a detour)."""
PROMPT_BLOCK = 256
"""Characters per key of a raw prompt's chain."""
LOCAL_KEEP_S = 10.0
"""How long this gateway trusts its own memory of who answered a key: until the worker's advert says it (adverts
come every 2 s, and soon after each finished request), which is the truth from then on (a model unloaded takes its
cache, and its keys leave the advert)."""
LOCAL_MAX = 10_000

_encode = msgspec.json.Encoder().encode


def _key(previous: bytes, part: bytes) -> bytes:
    return hashlib.blake2b(previous + part, digest_size=8).digest()


@dataclass(frozen=True)
class Chain:
    """A request's prefix keys worth matching, shortest prefix first, and the one of its system part ("" if none)."""

    keys: list[str]
    system: str = ""

    @property
    def wire(self) -> list[str]:
        """What the request carries for its worker to advertise: the system key and the whole prompt's key."""
        if not self.keys:
            return []
        return [self.system, self.keys[-1]] if self.system and self.system != self.keys[-1] else [self.keys[-1]]


def prefix_chain(request: GenerateRequest) -> Chain:
    """The keys of `request`'s prompt prefixes (see the module's docstring); empty when none is long enough."""
    if request.prompt is not None:
        head = _key(b"cortex-prompt-v1", _encode(request.model))
        keys = []
        for end in range(PROMPT_BLOCK, len(request.prompt) + 1, PROMPT_BLOCK):
            head = _key(head, request.prompt[end - PROMPT_BLOCK : end].encode())
            if end >= MIN_PREFIX_BYTES:
                keys.append(head.hex())
        return Chain(keys)
    messages = request.messages
    lead = 0
    while lead < len(messages) and messages[lead].role == "system":
        lead += 1
    first = _encode([request.model, request.tools, messages[:lead]])
    head, covered = _key(b"cortex-chat-v1", first), len(first)
    keys = [head.hex()] if covered >= MIN_PREFIX_BYTES else []
    system = keys[0] if keys else ""
    for message in messages[lead:]:
        part = _encode(message)
        head, covered = _key(head, part), covered + len(part)
        if covered >= MIN_PREFIX_BYTES:
            keys.append(head.hex())
    return Chain(keys, system)


def _queued(advert: WorkerAdvert, model: str) -> bool:
    """Whether the worker last measured requests waiting in `model`'s queue."""
    state = advert.state_of(model)
    return state is not None and state.queue_depth > 0


def _ready(advert: WorkerAdvert, model: str) -> bool:
    state = advert.state_of(model)
    return state is not None and state.state == m.MODEL_READY and not advert.draining


def _takes_affine(advert: WorkerAdvert, model: str) -> bool:
    """Ready, and pulling from its affine subject of `model` (`ModelState.affine`): one that does not say so, older
    or without its consumer yet, is sent no affine request."""
    state = advert.state_of(model)
    return _ready(advert, model) and state is not None and state.affine


@dataclass
class Affinity:
    """Picks the worker for a request by its prompt's prefix; one per gateway, used by the relay."""

    workers: Callable[[], list[WorkerAdvert]]
    """The live workers' adverts (`FleetView.workers`)."""
    _local: OrderedDict[tuple[str, str], tuple[str, float]] = field(default_factory=OrderedDict)
    """(model, key) -> the worker that answered it, and until when (monotonic) that counts."""
    _waiting: dict[str, int] = field(default_factory=dict)
    """Affine requests this gateway has sent each worker that have not started yet."""
    _since: dict[str, tuple[float, int]] = field(default_factory=dict)
    """Per worker: the advert (its `updated_at`) and the slots this gateway's requests freed (+) or took (-) since."""
    _seen: dict[str, float] = field(default_factory=dict)
    """The `updated_at` of each worker's advert as last looked at."""
    _index: dict[tuple[str, str], dict[str, None]] = field(default_factory=dict)
    """The adverts' keys: (model, key) -> the workers advertising it."""
    _indexed: dict[str, tuple[float, list[tuple[str, str]]]] = field(default_factory=dict)
    """Per worker: the `updated_at` of the advert its keys in `_index` come from, and those (model, key)s."""

    def route(self, request: GenerateRequest) -> tuple[GenerateRequest, str]:
        """`request` with its prefix keys on, and the worker to send it to first ("": the shared subject)."""
        if request.count_only:
            return request, ""  # tokenized only: no cache to find, none to leave
        chain = prefix_chain(request)
        if not chain.keys:
            return request, ""
        request = msgspec.structs.replace(request, prefix_keys=chain.wire)
        return request, self.choose(request.model, chain)

    def choose(self, model: str, chain: Chain) -> str:
        """The live worker ready for `model` with a free slot that holds the longest prefix of `chain`, or "".

        When every worker ready for the model is full and nothing waits in its queue,
        the one holding the longest prefix all the same: the shared queue would make the
        request wait as well, and the worker's window bounds the wait there. Never when
        requests wait in the queue: taken first where it goes, it would pass them.
        """
        adverts = {advert.worker_id: advert for advert in self.workers()}
        self._seen = {worker: advert.updated_at for worker, advert in adverts.items()}
        index = self._keys_advertised(adverts)
        now = time.monotonic()
        full = ""
        for key in reversed(chain.keys):
            holders = list(index.get((model, key), ()))
            local = self._local.get((model, key))
            if local is not None and local[1] > now and local[0] not in holders:
                holders.append(local[0])
            best, most = "", 0
            for worker in holders:
                advert = adverts.get(worker)
                if advert is None or not _takes_affine(advert, model):
                    continue
                full = full or worker
                free = self._free(advert)
                if free > most:
                    best, most = worker, free
            if best:
                return best
        if full and not any(_ready(a, model) and (self._free(a) > 0 or _queued(a, model)) for a in adverts.values()):
            return full
        return ""

    def serves(self, worker: str, model: str) -> bool:
        """Whether `worker` is live, not draining, has `model` ready and pulls from its affine subject of it: it will
        take its affine requests."""
        return any(advert.worker_id == worker and _takes_affine(advert, model) for advert in self.workers())

    def sent(self, worker: str) -> None:
        """An affine request went to `worker`; it counts against its free slots until `started`."""
        self._waiting[worker] = self._waiting.get(worker, 0) + 1

    def started(self, worker: str) -> None:
        """An affine request sent to `worker` started (anywhere), went elsewhere, or ended."""
        left = self._waiting.get(worker, 0) - 1
        if left > 0:
            self._waiting[worker] = left
        else:
            self._waiting.pop(worker, None)

    def began(self, worker: str) -> None:
        """A request of this gateway started on `worker` (it takes a slot the advert may still show free)."""
        self._since_advert(worker, -1)

    def ended(self, worker: str) -> None:
        """A request of this gateway that ran on `worker` ended (its slot is free before the advert says so)."""
        self._since_advert(worker, +1)

    def _since_advert(self, worker: str, change: int) -> None:
        seen = self._seen.get(worker)
        if seen is None:
            return  # never looked at: the next advert read counts it
        at, slots = self._since.get(worker, (seen, 0))
        self._since[worker] = (seen, (slots if at == seen else 0) + change)

    def _free(self, advert: WorkerAdvert) -> int:
        at, slots = self._since.get(advert.worker_id, (advert.updated_at, 0))
        since = slots if at == advert.updated_at else 0  # a newer advert already counts them
        return min(advert.slots_total, advert.slots_free + since) - self._waiting.get(advert.worker_id, 0)

    def remember(self, model: str, keys: list[str], worker: str) -> None:
        """`worker` answered a request with these prefix keys: send the next turn there, before its advert says so."""
        until = time.monotonic() + LOCAL_KEEP_S
        for key in keys:
            self._local[(model, key)] = (worker, until)
            self._local.move_to_end((model, key))
        while len(self._local) > LOCAL_MAX:
            self._local.popitem(last=False)

    def _keys_advertised(self, adverts: dict[str, WorkerAdvert]) -> dict[tuple[str, str], dict[str, None]]:
        """(model, key) -> the workers advertising it, brought up to date with `adverts`.

        Only the workers whose advert changed since the last call are indexed again
        (nearly every request changes some advert in a busy fleet, rarely many).
        """
        for worker in [worker for worker in self._indexed if worker not in adverts]:
            self._unindex(worker)
        for worker, advert in adverts.items():
            indexed = self._indexed.get(worker)
            if indexed is not None and indexed[0] == advert.updated_at:
                continue
            self._unindex(worker)
            pairs = [(state.id, key) for state in advert.models for key in state.prefix_keys]
            for pair in pairs:
                self._index.setdefault(pair, {})[worker] = None
            self._indexed[worker] = (advert.updated_at, pairs)
        return self._index

    def _unindex(self, worker: str) -> None:
        _, pairs = self._indexed.pop(worker, (0.0, []))
        for pair in pairs:
            holders = self._index.get(pair)
            if holders is not None:
                holders.pop(worker, None)
                if not holders:
                    del self._index[pair]


class Placed:
    """Where one request's current attempt is, as affinity counts it (one per `cortex.gateway.relay.ReplyStream`).

    `affine_to` is the worker whose affine subject holds the attempt's message ("":
    the shared subject). Until that worker takes it (`taken`), the attempt counts
    against the worker's free slots (`Affinity.sent`), and `serves` says whether the
    worker will still take it. `run_on` keeps the slot counts of whichever worker runs it.
    """

    __slots__ = ("_affinity", "_running_on", "affine_to", "sent_at", "waiting")

    def __init__(self, affinity: Affinity | None, affine_to: str = "") -> None:
        self._affinity = affinity
        self.affine_to = affine_to
        self.waiting = bool(affine_to)
        """Sent to `affine_to` and not taken there yet."""
        self.sent_at = time.monotonic()
        self._running_on = ""
        if affine_to and affinity is not None:
            affinity.sent(affine_to)

    def overdue(self) -> bool:
        """Whether `affine_to` has neither taken nor moved the attempt in `TAKE_PATIENCE_S`: it let it go silently."""
        return self.waiting and time.monotonic() - self.sent_at > TAKE_PATIENCE_S

    def serves(self, model: str) -> bool:
        """Whether `affine_to` will still take the attempt (`Affinity.serves`)."""
        return self._affinity is None or self._affinity.serves(self.affine_to, model)

    def taken(self, worker: str) -> None:
        """`worker` took the attempt (its `Taken` came, or its first chunk): from its affine subject if it is
        `affine_to`, else from the shared queue (moved there)."""
        self._stop_waiting()
        if worker != self.affine_to:
            self.affine_to = ""
        self.run_on(worker)

    def moved(self) -> None:
        """The attempt left its affine subject: moved to the shared queue by its worker, or sent on as another."""
        self._stop_waiting()
        self.affine_to = ""

    def run_on(self, worker: str) -> None:
        """The attempt runs on `worker` ("": on none any more); the affinity counts each worker's slots."""
        if self._affinity is not None and worker != self._running_on:
            if self._running_on:
                self._affinity.ended(self._running_on)
            if worker:
                self._affinity.began(worker)
        self._running_on = worker

    def close(self, request: GenerateRequest, answered_by: str) -> None:
        """The request is over; `answered_by` ("": nobody) answered it without an error: it holds its prompt now."""
        self.moved()
        self.run_on("")
        if answered_by and self._affinity is not None:
            self._affinity.remember(request.model, request.prefix_keys, answered_by)

    def _stop_waiting(self) -> None:
        if self.waiting and self._affinity is not None:
            self._affinity.started(self.affine_to)
        self.waiting = False
