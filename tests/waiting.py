"""The one way a test waits for something another process (or thread) does: ``wait_until``."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float = 10.0,
    what: str | Callable[[], str] = "the condition",
    interval: float = 0.02,
    ignoring: tuple[type[Exception], ...] = (),
) -> T:
    """``predicate()``'s first true value, asked every ``interval`` seconds for up to ``timeout``.

    Past the deadline the test fails, naming ``what`` it waited for (a callable is asked then,
    so that it can show a log as it is at the end). An exception of a type in ``ignoring``
    counts as a false value (a file not there yet, a socket not listening yet); any other,
    an ``AssertionError`` from the predicate included, fails the test at once. A predicate
    whose answer may be false itself (an empty list that is the result waited for) returns it
    in a tuple."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except ignoring:
            value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            described = what() if callable(what) else what
            raise AssertionError(f"waited {timeout:g} s for {described}")
        time.sleep(interval)
