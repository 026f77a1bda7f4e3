"""The gateway's view of the fleet, fed by watches on the fleet, heartbeat and placement buckets.

Who is live is `cortex.protocol.liveness.LiveFleet`'s rule, on the gateway's
own clock (host clock skew doesn't matter): a worker counts while its advert
keeps being refreshed (10 s) and its heartbeat does (2 s), so a worker that dies
leaves `workers()`, `is_live`, ``/health`` and ``/v1/models`` within about 2 s.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from cortex.gateway.errors import ModelNotFound, NoCapacity
from cortex.protocol import ModelCard, Pin, Placement, WorkerAdvert, codec, names
from cortex.protocol import messages as m
from cortex.protocol.liveness import LiveFleet

log = logging.getLogger("cortex.gateway")


@dataclass(frozen=True)
class ModelEntry:
    """One model as /v1/models shows it."""

    id: str
    card: ModelCard
    ready_on: list[str]
    loading_on: list[str]
    failed: list[str]
    reasoning: bool = False
    """A worker that loaded the model found it thinks before answering."""
    pinned: bool = False
    placement: Placement | None = None
    progress: dict[str, float] = field(default_factory=dict)
    """Load progress (0 to 1) per worker loading the model."""
    queue_depth: int = 0
    """Requests waiting in the model's queue, as the workers serving it last measured (0 while none does)."""
    in_flight: int = 0
    """Requests running on the workers that have it."""


RECENTLY_OFFERED_S = 60.0
"""A model a live worker offered this recently is "not served right now" (503), not "unknown" (404)."""
RECENT_DECISIONS = 20
"""Placement decisions kept for the fleet page (each model's latest when the gateway starts, then every change)."""

_Shown = tuple[tuple[str, str, int, str, bool, float, int, int], ...]
"""What the model list takes from an advert's held models: id, state, context length, error, reasoning, progress,
queue depth, in flight (not `last_used`, `memory` nor `prefix_keys`, which change with every request)."""


def _shown(advert: WorkerAdvert) -> _Shown:
    return tuple((s.id, s.state, s.context_length, s.error, s.reasoning, s.progress, s.queue_depth, s.in_flight)
                 for s in advert.models)  # fmt: skip


@dataclass
class FleetView:
    """The fleet as this gateway sees it, and the model list every request resolves its model in.

    The model list (`models`) is kept until what it shows changes, not recomputed per request: an advert drops it
    only when its worker comes, its catalogue changes, or the shown fields of its models do (`_shown`); a
    heartbeat only when a worker starts or stops counting; a placement or pin whenever one changes; and it never
    stands past the moment a worker it counts goes stale. The catalogues merged across the live workers (the
    costly part: workers x catalogue) are kept apart and merged again only when a catalogue or who is live
    changes, so a change in a model's state costs O(workers x models held + models).
    """

    stale_after: float = names.ADVERT_TTL_S
    """How long an advert counts without being rewritten (a worker without heartbeats is judged by this alone)."""
    _fleet: LiveFleet = field(init=False)
    placements: dict[str, Placement] = field(default_factory=dict)
    pins: dict[str, Pin] = field(default_factory=dict)
    decisions: deque[Placement] = field(default_factory=lambda: deque(maxlen=RECENT_DECISIONS))
    """The placement decisions seen last, as they came (the fleet page lists them)."""
    listeners: list[Callable[[], None]] = field(default_factory=list)
    """Called after every change the watches bring (not a heartbeat that only keeps a worker live): the fleet page
    sends a new snapshot."""
    _models: dict[str, ModelEntry] | None = None
    """`models()` as last computed (None: to compute again)."""
    _listed: dict[str, ModelEntry] = field(default_factory=dict)
    """The list last computed, even once dropped: the names it had (`_known_at`)."""
    _models_until: float = 0.0
    """When that list stops standing by itself: the first worker it counts goes stale (monotonic)."""
    _aliases: dict[str, str] = field(default_factory=dict)
    """Alias -> model id over that list (the first id in order that has it)."""
    _counted: set[str] = field(default_factory=set)
    """The advert keys that list counted: an advert from another worker is a worker coming (back)."""
    _cards: dict[str, ModelCard] | None = None
    """The live workers' catalogues merged, the first card of an id kept (None: to merge again)."""
    _adverts_shown: dict[str, tuple[list[ModelCard], _Shown]] = field(default_factory=dict)
    """By advert key: the catalogue and `_shown` of the worker's advert last seen."""
    _known_at: dict[str, float] = field(default_factory=dict)
    """Model ids and aliases live workers stopped offering, and when (monotonic) the list last had them."""

    def __post_init__(self) -> None:
        self._fleet = LiveFleet(advert_window=self.stale_after)

    def on_decision(self, key: str, value: bytes | None) -> None:
        """A change in the placement bucket (placements and pins; drains show in the adverts)."""
        parsed = names.parse_placement_key(key)
        if parsed is None or parsed[0] == "drain":
            return
        kind, model = parsed
        target: dict[str, Any] = self.placements if kind == "placement" else self.pins
        self._models = None
        if value is None:
            target.pop(model, None)
        else:
            try:
                target[model] = codec.decode_placement(value) if kind == "placement" else codec.decode_pin(value)
            except codec.DecodeError as exc:
                log.warning("ignoring malformed %s: %s", key, exc)
            else:
                if kind == "placement":
                    self.decisions.append(target[model])
        self._notify()

    def on_change(self, key: str, value: bytes | None) -> None:
        """A change in the fleet: an advert (``workers.*``) or a heartbeat (``alive.*``; None once it is gone)."""
        try:
            changed = self._fleet.on_change(key, value, time.monotonic())
        except codec.DecodeError as exc:
            log.warning("ignoring malformed advert %s: %s", key, exc)
            changed = True
        if not changed:
            return
        self._forget_shown(key, value)
        self._notify()

    def _forget_shown(self, key: str, value: bytes | None) -> None:
        """Drop the model list (and the merged catalogues) if what `key`'s change brings may change them."""
        if not names.is_worker_key(key):  # a heartbeat that made a worker start or stop counting
            self._models = self._cards = None
            return
        before = self._adverts_shown.pop(key, None)
        try:
            advert = self._fleet.advert(names.decode_model_token(key.partition(".")[2]))
        except ValueError:
            advert = None
        if advert is None or value is None:  # gone, or did not decode
            self._models = self._cards = None
            return
        catalogue, shown = advert.catalogue, _shown(advert)
        if before is None or key not in self._counted or before[0] != catalogue:
            self._models = self._cards = None
        else:
            catalogue = before[0]  # the same cards: the next comparison may stop at the first (identical) one
            if before[1] != shown:
                self._models = None
        self._adverts_shown[key] = (catalogue, shown)

    def _notify(self) -> None:
        for listener in self.listeners:
            listener()

    def workers(self) -> list[WorkerAdvert]:
        """The live workers' adverts."""
        return self._fleet.live(time.monotonic())

    def is_live(self, worker_id: str, instance: str = "") -> bool:
        """Whether `worker_id` is live: its advert and its heartbeat are current (a vanished worker won't answer).

        Given the `instance` a chunk came from, also whether that process is still the one beating (a worker
        restarted under the same id won't finish its old process's answers).
        """
        return self._fleet.is_live(worker_id, time.monotonic(), instance)

    def models(self) -> dict[str, ModelEntry]:
        """Every model a live worker offers or holds, by id, as /v1/models shows them (kept until they change)."""
        now = time.monotonic()
        if self._models is None or now >= self._models_until:
            self._models_until = self._fleet.next_change(now)
            self._models = self._compute_models()
        return self._models

    def note_placement(self, placement: Placement) -> None:
        """A placement this gateway just wrote, seen by the next request before the bucket's watch brings it."""
        self.placements[placement.model] = placement
        self._models = None

    def _merged_cards(self, adverts: list[WorkerAdvert]) -> dict[str, ModelCard]:
        if self._cards is None:
            cards: dict[str, ModelCard] = {}
            for advert in adverts:
                for card in advert.catalogue:
                    cards.setdefault(card.id, card)
            self._cards = cards
        return self._cards

    def _compute_models(self) -> dict[str, ModelEntry]:
        adverts = self.workers()
        counted = {names.worker_key(advert.worker_id) for advert in adverts}
        if counted != self._counted:
            self._cards = None  # a worker started or stopped counting: its catalogue joins or leaves the merge
        cards = dict(self._merged_cards(adverts))
        ready: dict[str, list[str]] = {}
        loading: dict[str, list[str]] = {}
        failed: dict[str, list[str]] = {}
        loaded_context: dict[str, int] = {}
        reasoning: set[str] = set()
        progress: dict[str, dict[str, float]] = {}
        queued: dict[str, int] = {}
        running: dict[str, int] = {}
        for advert in adverts:
            for state in advert.models:
                if state.id not in cards:
                    cards[state.id] = ModelCard(id=state.id, context_length=state.context_length)
                bucket = {m.MODEL_READY: ready, m.MODEL_LOADING: loading}.get(state.state, failed)
                detail = advert.worker_id if state.state != m.MODEL_FAILED else f"{advert.worker_id}: {state.error}"
                bucket.setdefault(state.id, []).append(detail)
                if state.context_length:
                    loaded_context.setdefault(state.id, state.context_length)
                if state.reasoning:
                    reasoning.add(state.id)
                if state.state == m.MODEL_LOADING:
                    progress.setdefault(state.id, {})[advert.worker_id] = state.progress
                # Every worker serving a model sees the one queue: the deepest reading is the latest.
                queued[state.id] = max(queued.get(state.id, 0), state.queue_depth)
                running[state.id] = running.get(state.id, 0) + state.in_flight
        # A catalogue that leaves the context length open learns it from a worker that loaded the model.
        for model_id, context in loaded_context.items():
            if not cards[model_id].context_length:
                cards[model_id] = msgspec.structs.replace(cards[model_id], context_length=context)
        entries = {
            model_id: ModelEntry(
                id=model_id,
                card=card,
                ready_on=ready.get(model_id, []),
                loading_on=loading.get(model_id, []),
                failed=failed.get(model_id, []),
                reasoning=model_id in reasoning,
                pinned=model_id in self.pins,
                progress=progress.get(model_id, {}),
                placement=self.placements.get(model_id),
                queue_depth=queued.get(model_id, 0),
                in_flight=running.get(model_id, 0),
            )
            for model_id, card in sorted(cards.items())
        }
        aliases: dict[str, str] = {}
        for model_id, entry in entries.items():
            for alias in entry.card.aliases:
                aliases.setdefault(alias, model_id)
        # Names the list had and has no more were offered until now: a request for one is a 503 for a while.
        now = time.monotonic()
        for name in (*self._listed, *self._aliases):
            if name not in entries and name not in aliases:
                self._known_at[name] = now
        self._listed, self._aliases = entries, aliases
        self._counted = counted
        return entries

    def find(self, name: str) -> ModelEntry:
        """The model a name (id or alias) refers to; raises 404 when no live worker knows it."""
        entries = self.models()
        entry = entries.get(name)
        if entry is None and name in self._aliases:
            entry = entries.get(self._aliases[name])
        if entry is None:
            known_at = self._known_at.get(name)
            if known_at is not None and time.monotonic() - known_at <= RECENTLY_OFFERED_S:
                # Its workers are gone for now (restarting, or unheard while the broker elects a leader): a 503 the
                # SDKs retry, not a 404 that says the name is wrong.
                raise NoCapacity(f"No live worker offers the model `{name}` right now (one did moments ago); "
                                 "retry shortly.")  # fmt: skip
            raise ModelNotFound(f"The model `{name}` does not exist or no live worker offers it.", param="model")
        return entry

    def resolve(self, name: str) -> ModelEntry:
        """The model a request names (loaded or not: it loads on demand); raises 404 when no worker knows it."""
        return self.find(name)
