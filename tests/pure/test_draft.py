"""The draft: copy on write, and every write recording the devices it touched."""

from __future__ import annotations

from collections.abc import Callable

import attrs

from monitor.core.draft import Draft
from monitor.core.events import DeviceSeen, DrmNodeSeen
from monitor.core.fingerprint import build_fingerprint
from monitor.core.leases import Lease
from monitor.core.state import State
from tests.pure.examples import CARD, H100, H100_B, run

F = attrs.fields(State)


def base() -> State:
    state, _ = run(DeviceSeen(H100), DeviceSeen(H100_B), DrmNodeSeen(CARD))
    return state


def test_a_write_copies_its_field_alone_and_leaves_the_base_as_it_was() -> None:
    state = base()
    draft = Draft(state)
    draft.put(F.xids, H100.address, (79, 1))
    assert draft.get(F.xids) == {H100.address: (79, 1)} and state.xids == {}
    new, patch = draft.commit()
    assert new.devices is state.devices and new.drm_nodes is state.drm_nodes  # not copied
    assert patch is not None and new.generation == state.generation + 1


def test_writes_that_change_nothing_record_nothing() -> None:
    state = base()
    draft = Draft(state)
    draft.put(F.devices, H100.address, H100)
    draft.pop(F.nvml, H100.address)
    draft.set(F.match_classes, state.match_classes)
    assert not draft.changed and draft.commit() == (state, None)


def test_what_a_write_touches_is_built_again_and_nothing_else() -> None:
    state = base()
    untouched = state.fingerprint.devices()[H100_B.address][1]
    lease = Lease(id="l", devices={H100.address: "g/p/n"}, uid=0, gid=0, pid=1, created=0.0)
    writes: list[Callable[[Draft], None]] = [
        lambda d: d.put(F.drm_nodes, "card1", attrs.evolve(CARD, devnode="/dev/dri/card9")),
        lambda d: d.put(F.leases, "l", lease),
        lambda d: d.put(F.problems, H100.address, {}),
    ]
    for write in writes:
        draft = Draft(state)
        write(draft)
        new = draft.state()
        assert new.fingerprint.devices()[H100_B.address][1] is untouched  # taken over as it was
        assert new.fingerprint == build_fingerprint(new)  # and the whole is right
    draft = Draft(state)
    draft.set(F.match_classes, ("03",))  # shown or not: every device may change
    assert draft.state().fingerprint.devices()[H100_B.address][1] is not untouched
