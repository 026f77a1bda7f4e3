"""Stop strings that are never emitted, also when split across tokens.

Text that could still become the start of a stop string is held back until the
next delta shows whether it does.
"""

from __future__ import annotations


class StopMatcher:
    """Filter a stream of text deltas against a set of stop strings.

    ::

        stops = StopMatcher(["\\n\\n", "END"])
        text, hit = stops.push("Hello EN")   # ("Hello ", None): "EN" is held back
        text, hit = stops.push("D more")     # ("", "END")
    """

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in dict.fromkeys(stops) if s]
        self._pending = ""
        self.taken = 0
        """Characters pushed so far."""
        self.emitted = 0
        """Characters let through so far: the text ends here once a stop string matched."""

    def push(self, delta: str) -> tuple[str, str | None]:
        """Return (text safe to emit, the stop string that matched or None)."""
        self.taken += len(delta)
        if not self._stops:
            self.emitted += len(delta)
            return delta, None
        self._pending += delta
        hit: str | None = None
        hit_at = len(self._pending)
        for stop in self._stops:
            at = self._pending.find(stop)
            if at != -1 and at < hit_at:
                hit, hit_at = stop, at
        if hit is not None:
            out = self._pending[:hit_at]
            self._pending = ""
            self.emitted += len(out)
            return out, hit
        hold = self._held_suffix()
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        self.emitted += len(out)
        return out, None

    def flush(self) -> str:
        """The held-back text, at the end of generation when no stop matched."""
        out, self._pending = self._pending, ""
        self.emitted += len(out)
        return out

    def _held_suffix(self) -> int:
        """Length of the longest suffix of the pending text that starts some stop string."""
        return max((partial_suffix(self._pending, stop) for stop in self._stops), default=0)


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag` (text that may yet become `tag`)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
