"""OpenAI stop semantics on top of the ensemble's ``stop_words``: the text ends *before* the stop.

The engine stops generating when a stop word appears, but the text it returns still contains it;
OpenAI's API returns the text without the stop sequence. ``trim_at_stop`` does that for a whole
text, ``StopTrimmer`` for a stream of deltas (it holds back a tail that could still become a stop
word, so a stop split across two events is caught too).
"""

from __future__ import annotations

from collections.abc import Sequence


def _earliest_stop(text: str, stops: Sequence[str]) -> int:
    positions = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(positions) if positions else -1


def trim_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first stop string, and whether one was found."""
    index = _earliest_stop(text, stops)
    return (text, False) if index < 0 else (text[:index], True)


class StopTrimmer:
    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        """The part of the text so far that is safe to emit; sets ``stopped`` on a stop."""
        if self.stopped:
            return ""
        if not self._stops:
            return delta
        buffer = self._held + delta
        index = _earliest_stop(buffer, self._stops)
        if index >= 0:
            self.stopped = True
            self._held = ""
            return buffer[:index]
        keep = self._partial_suffix(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """What is still held back, at the end of the stream."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _partial_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of ``buffer`` that is a proper prefix of a stop."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(buffer)), longest, -1):
                if buffer.endswith(stop[:size]):
                    longest = size
                    break
        return longest
