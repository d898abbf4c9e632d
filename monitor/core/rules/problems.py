"""Setting and clearing a device's problems, shared by the inventory and NVIDIA rules."""

from __future__ import annotations

from collections.abc import Iterable

from monitor.core.draft import Draft
from monitor.core.health import Problem
from monitor.core.state import F


def set_problem(draft: Draft, address: str, cause: str, problem: Problem) -> None:
    causes = dict(draft.get(F.problems).get(address, {}))
    causes[cause] = problem
    draft.put(F.problems, address, causes)


def clear_problems(draft: Draft, address: str, causes: Iterable[str], reason: str) -> None:
    """Clear these causes; ``reason`` is the evidence, which the journal will name."""
    found = draft.get(F.problems).get(address, {})
    kept = {c: p for c, p in found.items() if c not in causes}
    if len(kept) == len(found):
        return
    if kept:
        draft.put(F.problems, address, kept)
    else:
        draft.pop(F.problems, address)
    draft.recoveries[address] = reason
