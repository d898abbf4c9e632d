"""Text from outside the daemon made safe: what every source (udev, NVML) takes in, and what a
log line or a terminal shows.

The kernel, a driver, NVML or a buggy library may hand us any bytes. What becomes part of the
state (a name, a group key, an attribute) is printable and bounded; an identity (a UUID) is
taken only in the form its maker documents, never cleaned into one.
"""

from __future__ import annotations

import re
from typing import Any

MAX_TEXT = 256
# What of a value is looked at: enough for MAX_TEXT printable characters in all sane cases,
# and a 2 MiB attribute costs no more than a short one.
READ_LIMIT = 16 * MAX_TEXT

# NVIDIA's form (nvmlDeviceGetUUID): "GPU-" and a UUID in its 8-4-4-4-12 hex form.
_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
GPU_UUID = re.compile(f"GPU-{_UUID}")


def printable(value: Any, limit: int = MAX_TEXT) -> str | None:
    """``value`` as printable text, or None when nothing is left: control characters dropped,
    invalid UTF-8 replaced, surrounding space stripped, at most ``limit`` characters."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value[:READ_LIMIT].decode("utf-8", errors="replace")
    text = "".join(ch for ch in str(value)[:READ_LIMIT] if ch.isprintable()).strip()
    return text[:limit] or None


def escaped(text: str) -> str:
    """``text`` with every character that is not printable written as an escape (``\\x1b``),
    so that what a terminal or a log shows is what was there, and moves no cursor."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def shown(value: Any, limit: int = MAX_TEXT) -> str:
    """Outside text for a log line: escaped and bounded."""
    text = value if isinstance(value, str) else repr(value)
    shortened = escaped(text[:limit])
    return shortened if len(text) <= limit else f"{shortened}..."


def is_gpu_uuid(value: Any) -> bool:
    """Whether ``value`` is a GPU UUID in NVIDIA's form (``GPU-`` and a UUID)."""
    return isinstance(value, str) and GPU_UUID.fullmatch(value) is not None


def for_terminal(text: str) -> str:
    """``text`` for a terminal: each line ``escaped``, so that a name with an escape sequence
    in it can neither clear the screen nor retitle the window."""
    return "\n".join(escaped(line) for line in text.split("\n"))
