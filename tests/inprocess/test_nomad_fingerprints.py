"""The Nomad plugin's Fingerprint stream in process, on asyncio (gRPC's loop), under a clock of
the test's own: the first message at once, a burst within the window as one message, a change
undone within the window as none, the daemon lost and found, and new settings. The daemon's
answers are handed to the view as ``follow`` hands them (``Mirror`` or None)."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from monitor.adapters.nomad import translate
from monitor.adapters.nomad.config import PluginConfig
from monitor.adapters.nomad.daemon_view import DaemonView, fingerprints
from monitor.wire.mirror import Mirror

A, B = "0000:3b:00.0", "0000:86:00.0"
WINDOW = 0.005


def snapshot(**unhealthy: str) -> dict[str, Any]:
    """Two GPUs; ``unhealthy`` maps an address's last two hex digits ("3b") to a reason."""

    def device(address: str) -> dict[str, Any]:
        why = unhealthy.get(f"x{address[5:7]}")
        return {
            "id": address,
            "healthy": why is None,
            "health_desc": why or "",
            "hw_locality": {"pci_bus_id": address},
            "attributes": {"driver": {"value": "nvidia"}},
        }

    group = {"vendor": "nvidia", "type": "gpu", "name": "H100", "attributes": {}}
    return {"groups": {"nvidia/gpu/H100": {**group, "devices": {a: device(a) for a in (A, B)}}}}


generation = 0


def mirror(snap: dict[str, Any]) -> Mirror:
    global generation
    generation += 1
    return Mirror({"generation": generation, "snapshot": copy.deepcopy(snap)})


def health(offer: translate.Offered) -> dict[str, bool]:
    return {d.ID: d.healthy for g in offer.groups for d in g.devices}


class Clock:
    """Time that moves only when the test says; ``sleep`` waits for the test's release."""

    def __init__(self) -> None:
        self.t = 100.0
        self.sleeping = asyncio.Event()
        self.release = asyncio.Event()
        self.slept: list[float] = []

    def now(self) -> float:
        return self.t

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.sleeping.set()
        await self.release.wait()
        self.release.clear()
        self.sleeping.clear()
        self.t += seconds


def run(test: Callable[[DaemonView, Clock], Awaitable[None]]) -> None:
    async def main() -> None:
        view = DaemonView(PluginConfig())
        await test(view, Clock())

    asyncio.run(asyncio.wait_for(main(), timeout=20))


def test_first_message_at_once_a_burst_as_one_and_an_undone_change_as_none() -> None:
    async def scenario(view: DaemonView, clock: Clock) -> None:
        stream = fingerprints(view, WINDOW, first_wait=10, clock=clock.now, sleep=clock.sleep)
        first = asyncio.ensure_future(anext(stream))
        await view._emit(mirror(snapshot()))
        assert health(await first) == {A: True, B: True}
        # Two changes right after the first message: one message, with the last state.
        second = asyncio.ensure_future(anext(stream))
        await view._emit(mirror(snapshot(x3b="PCI error")))
        await clock.sleeping.wait()  # held back: the window since the first message is open
        assert clock.slept == [pytest.approx(WINDOW)]
        await view._emit(mirror(snapshot(x3b="PCI error", x86="wedged")))
        clock.release.set()
        assert health(await second) == {A: False, B: False}
        # A lone change after a quiet while goes at once, without waiting.
        clock.t += 60
        third = asyncio.ensure_future(anext(stream))
        await view._emit(mirror(snapshot(x86="wedged")))
        assert health(await third) == {A: True, B: False}
        assert clock.slept == [pytest.approx(WINDOW)]
        # A change undone within the window sends nothing; the next real change is the next
        # message.
        fourth = asyncio.ensure_future(anext(stream))
        await view._emit(mirror(snapshot()))
        await clock.sleeping.wait()
        await view._emit(mirror(snapshot(x86="wedged")))  # back to what Nomad has
        clock.release.set()
        await asyncio.sleep(0.01)
        assert not fourth.done()
        clock.t += 60
        await view._emit(mirror(snapshot(x3b="gone")))
        assert health(await fourth) == {A: False, B: True}
        await stream.aclose()

    run(scenario)


def test_an_attribute_nomad_cannot_see_changes_nothing() -> None:
    async def scenario(view: DaemonView, clock: Clock) -> None:
        stream = fingerprints(view, WINDOW, first_wait=10, clock=clock.now, sleep=clock.sleep)
        first = asyncio.ensure_future(anext(stream))
        await view._emit(mirror(snapshot()))
        await first
        before = view.version
        changed = snapshot()
        changed["groups"]["nvidia/gpu/H100"]["devices"][A]["attributes"]["xid_count"] = {"value": 1}
        await view._emit(mirror(changed))  # a per-device attribute: Nomad has none
        assert view.version == before
        await stream.aclose()

    run(scenario)


def test_the_daemon_lost_and_found() -> None:
    async def scenario(view: DaemonView, clock: Clock) -> None:
        stream = fingerprints(view, WINDOW, first_wait=10, clock=clock.now, sleep=clock.sleep)
        first = asyncio.ensure_future(anext(stream))
        await view._emit(mirror(snapshot()))
        await first
        clock.t += 60
        lost = asyncio.ensure_future(anext(stream))
        await view._emit(None)
        offer = await lost
        assert health(offer) == {A: False, B: False}
        assert {d.health_description for g in offer.groups for d in g.devices} == {
            translate.UNREACHABLE
        }
        assert view.reachable is False
        clock.t += 60
        found = asyncio.ensure_future(anext(stream))
        await view._emit(mirror(snapshot()))
        assert health(await found) == {A: True, B: True}
        await stream.aclose()

    run(scenario)


def test_no_answer_at_all_sends_an_empty_first_message_after_the_wait() -> None:
    async def scenario(view: DaemonView, clock: Clock) -> None:
        stream = fingerprints(view, WINDOW, first_wait=0.01, clock=clock.now, sleep=clock.sleep)
        assert (await anext(stream)).groups == ()
        await stream.aclose()

    run(scenario)


def test_new_settings_make_the_offer_again_from_the_last_snapshot() -> None:
    async def scenario(view: DaemonView, clock: Clock) -> None:
        await view._emit(mirror(snapshot()))
        assert set(health(view.offer)) == {A, B}
        await view.configure(PluginConfig(ignored=frozenset({B})))
        assert set(health(view.offer)) == {A}
        await view._emit(None)
        await view.configure(PluginConfig())  # while the daemon is away: still unhealthy
        assert health(view.offer) == {A: False, B: False}

    run(scenario)
