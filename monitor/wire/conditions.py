"""A GPU's health conditions as the snapshot shows them: the device attribute
``health_conditions``, ``name=verdict`` pairs joined by commas (``row_remap_pending=needs
reset,thermal_slowdown=reported``); the verdict is ``reported``, ``needs reset`` or
``unhealthy``. The daemon's core writes it; consumers read it here."""

from __future__ import annotations

import re
from typing import Any

ATTRIBUTE = "health_conditions"
VERDICTS = ("reported", "needs reset", "unhealthy")
MAX_CONDITIONS = 32
_NAME = re.compile(r"[a-z0-9_]{1,64}")


def parse_conditions(value: Any) -> dict[str, str]:
    """The attribute's value as condition -> verdict; what is not in its form is left out."""
    found: dict[str, str] = {}
    if not isinstance(value, str):
        return found
    for pair in value.split(",")[:MAX_CONDITIONS]:
        name, _, verdict = pair.partition("=")
        if _NAME.fullmatch(name) and verdict in VERDICTS:
            found[name] = verdict
    return found
