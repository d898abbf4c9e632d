"""How long a client waits before it tries the daemon again: a little more each time."""

from __future__ import annotations

import attrs


@attrs.define
class Backoff:
    first: float = 0.1  # seconds
    most: float = 5.0
    _next: float | None = None

    def delay(self) -> float:
        """The wait before the next try; each is twice the last, up to ``most``."""
        delay = self.first if self._next is None else self._next
        self._next = min(delay * 2, self.most)
        return delay

    def reset(self) -> None:
        """It worked: the next failure starts again from ``first``."""
        self._next = None
