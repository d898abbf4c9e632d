"""A draft: the working copy of a state, private to one fold.

Rules read the draft's current facts and change them only through ``put``, ``pop`` and ``set``.
Each field is copied the first time it is written (copy on write), and each write records which
devices it touched, from the field's own metadata (``monitor.core.state``): so the fingerprint is
built again for exactly those devices, and no rule can forget to say what it changed. A write
that changes nothing records nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from monitor.core.fingerprint import Patch, build_fingerprint, fingerprint_patch
from monitor.core.leases import LeaseChange
from monitor.core.model import Fingerprint
from monitor.core.state import EVERY_DEVICE, NO_DEVICE, TOUCHES, State

if TYPE_CHECKING:
    from monitor.core.answers import Answer

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")
Field = attrs.Attribute


class Draft:
    """The working copy of ``base``; ``commit`` makes the new state."""

    def __init__(self, base: State) -> None:
        self.base = base
        self._written: dict[str, Any] = {}  # field name -> its copy (a dict for mappings)
        self._dirty: set[str] | None = set()  # devices touched since the base; None: any
        self._current: State | None = base  # the facts as a state, built again after a write
        # What happened, for the journal: devices recovered (and the evidence), lease changes.
        self.recoveries: dict[str, str] = {}
        self.lease_changes: list[LeaseChange] = []
        self.notes: list[str] = []  # what the operator must be told (a deferred setting)

    @property
    def changed(self) -> bool:
        return bool(self._written)

    def touched(self) -> set[str] | None:
        """The devices touched since the base (None: any may have been)."""
        return None if self._dirty is None else set(self._dirty)

    def get(self, field: Field[T]) -> T:
        if field.name in self._written:
            value: T = self._written[field.name]
            return value
        value = getattr(self.base, field.name)
        return value

    def put(self, field: Field[Mapping[K, V]], key: K, value: V) -> None:
        old = self.get(field).get(key)
        if old == value:
            return
        self._mapping(field)[key] = value
        self._touch(field, key, old)
        self._touch(field, key, value)

    def pop(self, field: Field[Mapping[K, V]], key: K) -> V | None:
        if key not in self.get(field):
            return None
        old = self._mapping(field).pop(key)
        self._touch(field, key, old)
        return old

    def set(self, field: Field[T], value: T) -> None:
        """Replace a whole field (a mapping replaced whole touches every device)."""
        if self.get(field) == value:
            return
        self._written[field.name] = value
        self._current = None
        if field.metadata[TOUCHES] != NO_DEVICE:
            self._dirty = None

    def _mapping(self, field: Field[Mapping[K, V]]) -> dict[K, V]:
        copy: dict[K, V] | None = self._written.get(field.name)
        if copy is None:
            copy = self._written[field.name] = dict(getattr(self.base, field.name))
        return copy

    def _touch(self, field: Field[Any], key: Any, value: Any) -> None:
        self._current = None
        touches = field.metadata[TOUCHES]
        if value is None or touches == NO_DEVICE or self._dirty is None:
            return
        if touches == EVERY_DEVICE:
            self._dirty = None
        else:
            self._dirty.update(touches(key, value))

    def state(self) -> State:
        """The facts as they are now, with their fingerprint (built once per change, from the
        devices touched and the unchanged rest of the base's)."""
        if self._current is None:
            facts, fingerprint = self._build()
            self._current = attrs.evolve(facts, fingerprint=fingerprint)
        return self._current

    def fingerprint(self) -> Fingerprint:
        return self.state().fingerprint

    def commit(self) -> tuple[State, Patch | None]:
        """The new state, and the patch from the base's fingerprint to its; the generation
        grows with a patch and only then."""
        if not self._written:
            return self.base, None
        if self._current is not None:  # built already, for a rule that looked
            facts, fingerprint = self._current, self._current.fingerprint
        else:
            facts, fingerprint = self._build()
        patch = fingerprint_patch(self.base.fingerprint, fingerprint)
        generation = self.base.generation + 1 if patch is not None else self.base.generation
        if facts.fingerprint is fingerprint and facts.generation == generation:
            return facts, patch
        return attrs.evolve(facts, fingerprint=fingerprint, generation=generation), patch

    def _build(self) -> tuple[State, Fingerprint]:
        """The facts written over the base's (with the base's fingerprint still), and the
        fingerprint of them."""
        facts = attrs.evolve(self.base, **self._written)
        return facts, build_fingerprint(facts, self.base.fingerprint, self._dirty)


Rule = Callable[[Draft, Any], None]  # what an event does to a draft
RequestRule = Callable[[Draft, Any], "Answer"]  # and a request, with its answer
