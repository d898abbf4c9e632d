"""How each setting's value is read and checked: the kinds of values the settings share
(``monitor.daemon.config`` defines the settings themselves, once each)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from monitor.core.conditions import known_condition
from monitor.daemon.kinds import Kind, flag_type

_CLASS_PREFIX = re.compile(r"^(?:0x)?((?:[0-9a-f]{2}){1,3})$")


def class_prefix(text: str) -> str:
    """``0x03``, ``0302`` or ``0x030200`` -> the hex prefix a class code must start with."""
    match = _CLASS_PREFIX.match(text.strip().lower())
    if match is None:
        raise ValueError(
            f"invalid PCI class {text!r}: give 2, 4 or 6 hex digits, such as 0x03 or 0x0302"
        )
    return match.group(1)


def xid(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 1 << 16:
        raise ValueError(f"an XID is a whole number from 1 to 65535, not {value!r}")
    return value


CLASS = Kind(str, 'a PCI class such as "0x03"', class_prefix, {"type": flag_type(class_prefix)})
XID = Kind(int, "an XID (a whole number)", xid, {"type": flag_type(lambda t: xid(int(t)))})
CONDITION = Kind(str, "a health condition", known_condition, {"type": flag_type(known_condition)})


def health_interval(value: float) -> str | None:
    """0 turns the health watches off; otherwise at least a second between reads."""
    return None if value == 0 or value >= 1 else "must be 0 (off) or at least 1 second"


def path_or_none(value: str) -> Path | None:
    return Path(value) if value else None
