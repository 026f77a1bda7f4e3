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

    def push(self, delta: str) -> tuple[str, str | None]:
        """Return (text safe to emit, the stop string that matched or None)."""
        if not self._stops:
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
            return out, hit
        hold = self._held_suffix()
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out, None

    def flush(self) -> str:
        """The held-back text, at the end of generation when no stop matched."""
        out, self._pending = self._pending, ""
        return out

    def _held_suffix(self) -> int:
        """Length of the longest suffix of the pending text that starts some stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:n]):
                    best = n
                    break
        return best
