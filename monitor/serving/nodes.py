"""Whether the device nodes drivers make outside udev's view exist, each answer kept a second."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from monitor.core.plan import Exists

NODE_CHECK_SECONDS = 1.0


class RecentNodeCheck:
    """``os.path.exists`` for vendor device nodes, each answer kept for a second.

    Drivers make those nodes when they load (``/dev/nvidia-uvm`` often only at first CUDA use),
    not per request, while a stat of each node on every request was much of what a reservation
    cost (tests/bench, scenario 5; the figures are in docs/performance.md).
    """

    def __init__(
        self,
        check: Exists = os.path.exists,
        clock: Callable[[], float] = time.monotonic,
        seconds: float = NODE_CHECK_SECONDS,
    ) -> None:
        self._check = check
        self._clock = clock
        self._seconds = seconds
        self._answers: dict[str, tuple[bool, float]] = {}

    def __call__(self, path: str) -> bool:
        now = self._clock()
        answer = self._answers.get(path)
        if answer is None or now >= answer[1]:
            answer = (self._check(path), now + self._seconds)
            self._answers[path] = answer
        return answer[0]
