"""Catalogues written once under their digest, and the adverts that name them.

A worker's catalogue (its `ModelCard` list, ~250 bytes a model) is the bulk of
its advert and changes only when the worker restarts with another catalogue. So
the worker writes it once under a content-addressed key of ``cortex-catalogues``
(`names.catalogue_key` of `digest`) and its 2 s advert names it by
`WorkerAdvert.catalogue_digest`, with an empty ``catalogue``. Every reader keeps
the catalogues it has read, by digest, in one `CatalogueCache` per process
(`CACHE`): the broker side fills it (`cortex.broker.catalogues`: it fetches a
digest it does not hold before it hands on an advert naming it) and
`cortex.protocol.codec.decode_advert` fills an advert's catalogue from it, so
code downstream of the decode sees ``catalogue`` as it always was. A fleet whose
workers share one ``models.toml`` (and devices) shares one catalogue: one decode
and one copy in memory per reader, whatever the number of workers.

An advert with an inline catalogue (an older worker, or one run with
``--advert-catalogue inline``) has no digest and decodes as before.

Workers read each other's adverts, so a worker from before digests would take a
digest advert for a worker with no models. Adverts say which kind wrote them
(`WorkerAdvert.advert_format`, `ADVERT_FORMAT`), and a worker keeps its
catalogue inline while any other live worker's advert is older
(`reads_digests`): a rolling upgrade of the workers goes in any order.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterable

import msgspec

from cortex.protocol.messages import ModelCard, WorkerAdvert

DIGEST_PREFIX = "sha256-"
"""Digests are ``sha256-`` and the first 32 hex digits of the SHA-256 of the encoded cards (a valid KV key token)."""
ADVERT_FORMAT = 1
"""The `WorkerAdvert.advert_format` this release writes: its writer reads catalogues by digest (0: an older one)."""
CACHE_SIZE = 256
"""Distinct catalogues a process keeps (least recently used out first); a fleet has a handful."""

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(list[ModelCard])


class _DigestOnly(msgspec.Struct):
    """An advert read for its digest alone: msgspec skips every other field without building it."""

    catalogue_digest: str = ""


_digest_decoder = msgspec.json.Decoder(_DigestOnly)


def encode_catalogue(cards: list[ModelCard]) -> bytes:
    """The value stored under the catalogue's key (JSON, a list of cards)."""
    return _encoder.encode(cards)


def decode_catalogue(data: bytes) -> list[ModelCard]:
    """Raises `msgspec.DecodeError` on a malformed catalogue."""
    return _decoder.decode(data)


def digest(encoded: bytes) -> str:
    """The digest of an encoded catalogue (`encode_catalogue`)."""
    return DIGEST_PREFIX + hashlib.sha256(encoded).hexdigest()[:32]


def digest_of_advert(data: bytes) -> str:
    """The catalogue digest an encoded advert names ("" for an inline catalogue, or an advert that does not decode:
    the full decode will say why)."""
    try:
        return _digest_decoder.decode(data).catalogue_digest
    except msgspec.DecodeError:
        return ""


def reads_digests(advert: WorkerAdvert) -> bool:
    """Whether the worker behind `advert` reads catalogues by digest in others' adverts (it is not older)."""
    return advert.advert_format >= ADVERT_FORMAT


def on_the_wire(advert: WorkerAdvert) -> WorkerAdvert:
    """The advert as written to the fleet bucket: without its catalogue when it names one by digest."""
    if advert.catalogue_digest and advert.catalogue:
        return msgspec.structs.replace(advert, catalogue=[])
    return advert


class CatalogueCache:
    """Catalogues by digest, least recently used out first beyond `size`."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self._size = size
        self._cards: OrderedDict[str, list[ModelCard]] = OrderedDict()

    def __contains__(self, key: object) -> bool:
        return key in self._cards

    def get(self, key: str) -> list[ModelCard] | None:
        cards = self._cards.get(key)
        if cards is not None:
            self._cards.move_to_end(key)
        return cards

    def put(self, key: str, cards: list[ModelCard]) -> None:
        self._cards[key] = cards
        self._cards.move_to_end(key)
        while len(self._cards) > self._size:
            self._cards.popitem(last=False)

    def clear(self) -> None:
        self._cards.clear()

    def resolve(self, advert: WorkerAdvert) -> WorkerAdvert:
        """`advert` with its catalogue filled in from its digest, if this cache holds it (else as it is)."""
        if not advert.catalogue_digest or advert.catalogue:
            return advert
        cards = self.get(advert.catalogue_digest)
        return advert if cards is None else msgspec.structs.replace(advert, catalogue=cards)


CACHE = CatalogueCache()
"""This process's catalogues: shared by every reader in it (they are the same catalogues)."""


def largest_per_model(adverts: Iterable[WorkerAdvert], field: str) -> dict[str, int]:
    """Every model in the adverts' catalogues, with the largest value of a card's integer `field` (``memory``,
    ``min_replicas``) any of them gives it; a catalogue shared by digest is looked at once."""
    out: dict[str, int] = {}
    seen: set[str] = set()
    for advert in adverts:
        if advert.catalogue_digest:
            if advert.catalogue_digest in seen:
                continue
            seen.add(advert.catalogue_digest)
        for card in advert.catalogue:
            out[card.id] = max(out.get(card.id, 0), getattr(card, field))
    return out
