"""What the commands print, through one filter: text from the daemon (device names, owners,
messages) is outside text, shown with its control characters escaped (``for_terminal``)."""

from __future__ import annotations

import sys

from monitor.core.text import for_terminal


def say(text: str = "", *, err: bool = False, flush: bool = False) -> None:
    """Print ``text`` and a newline on stdout, or stderr with ``err``."""
    print(for_terminal(text), file=sys.stderr if err else sys.stdout, flush=flush)
