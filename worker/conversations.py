"""Which prompts this worker has likely cached, by the prefix keys of the requests it answered (conversation affinity).

A gateway puts on each request the keys of its prompt's prefixes worth finding
again (`GenerateRequest.prefix_keys`: the system part, the whole conversation
so far). Once a worker has answered a request, its prompt and answer sit in the
engine's prefix cache, so the worker remembers those keys here, per model, and
advertises the newest (`ModelState.prefix_keys`): a gateway sends the next turn
of the conversation, or another prompt with the same system part, to this
worker first.

Only a hint: the prefix cache evicts by its own measure (tokens, least recently
used), so a key here may outlive its entry there; a wrong guess costs a prefill,
never an answer. A model that leaves takes its cache with it: `forget` then.

The keys are advertised only while this worker pulls from its affine subject of
the model (`affine`), with `ModelState.affine` set: a gateway sends a request
there only to a worker that says so, so none waits on a subject nobody reads (a
consumer that could not be made yet: `cortex.broker.pull.PullQueue.ensure_affine`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import islice

REMEMBERED = 1024
"""Keys kept per model (newest win)."""
ADVERTISED = 64
"""Keys advertised per model: what a gateway matches against (about 1.2 KB of JSON per model)."""


@dataclass
class Conversations:
    _keys: dict[str, OrderedDict[str, None]] = field(default_factory=dict)
    _affine: set[str] = field(default_factory=set)
    """The models whose affine subject this worker pulls from: only theirs are advertised."""

    def affine(self, model: str) -> None:
        """This worker now takes requests for `model` on its affine subject: its keys may be advertised."""
        self._affine.add(model)

    def remember(self, model: str, keys: list[str]) -> None:
        """`keys` of a request for `model` that this worker answered (its prompt is in the prefix cache now)."""
        if not keys:
            return
        held = self._keys.setdefault(model, OrderedDict())
        for key in keys:
            held[key] = None
            held.move_to_end(key)
        while len(held) > REMEMBERED:
            held.popitem(last=False)

    def recent(self, model: str, limit: int = ADVERTISED) -> list[str] | None:
        """The newest `limit` keys of `model`, newest first; None while it takes no affine requests (`affine`)."""
        if model not in self._affine:
            return None
        return list(islice(reversed(self._keys.get(model, {})), limit))

    def forget(self, model: str) -> None:
        """`model` left this worker (or stops being served here): its cache is gone, and so is its affine pull."""
        self._keys.pop(model, None)
        self._affine.discard(model)
