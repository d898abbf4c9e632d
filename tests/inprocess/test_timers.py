"""Every timer of the daemon under trio's MockClock (pytest-trio's ``autojump_clock``): time
moves only when every task waits, so each bound below is exact and no machine is too slow.
How fast the real daemon is lives in the benchmark (tests/bench), not here."""

from __future__ import annotations

import itertools
import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from monitor.core.events import DeviceSeen, Event, NvmlNameWaitOver, PciErrorReported, PciFacts
from monitor.core.reducer import reduce
from monitor.core.state import State
from monitor.daemon import app, memory, systemd
from monitor.engine.hub import Hub
from monitor.outputs import cdi
from monitor.serving import socketfile, timeouts
from monitor.serving.connection import RequestBudget
from monitor.serving.limits import ConnectionLimits
from monitor.serving.server import Server
from monitor.serving.socketfile import SocketFile
from monitor.sources.nvml import end_name_waits
from monitor.wire.backoff import Backoff
from monitor.wire.framing import dumps

GPU = PciFacts(
    address="0000:30:00.0", vendor_id=0x10DE, device_id=0x2330, pci_class=0x030200, driver="nvidia"
)


async def test_watchdog_pings_every_interval_and_not_while_the_loop_is_stalled(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    pings: list[float] = []
    monkeypatch.setattr(systemd, "notify", lambda **_: pings.append(trio.current_time()))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(app.ping_watchdog, 0.25)
        await trio.sleep(1.1)
        autojump_clock.jump(1.0)  # a stall: a second passes and no task runs
        await trio.sleep(0.6)
        nursery.cancel_scope.cancel()
    # One late ping when the loop runs again, none made up for the stall, then the interval.
    assert pings == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 2.1, 2.35, 2.6])


def test_the_watchdog_interval_is_half_of_watchdog_usec_for_this_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert systemd.watchdog_interval() is None


async def test_status_is_sent_at_most_every_status_interval(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[tuple[float, str]] = []
    monkeypatch.setattr(
        systemd, "notify", lambda STATUS: sent.append((trio.current_time(), STATUS))
    )
    hub = Hub()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(app.report_status, hub)
        subscribers = []
        for _ in range(50):  # 50 changes in 0.5 s: ten a second at most get through
            subscribers.append(hub.subscribe())
            await trio.sleep(0.01)
        await trio.sleep(1)
        nursery.cancel_scope.cancel()
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(sent)]
    assert min(gaps) == pytest.approx(app.STATUS_MIN_INTERVAL) and len(sent) <= 7
    assert sent[-1][1] == "0 devices, 0 unhealthy, 50 subscribers, 0 reservations"  # the last


async def test_a_name_wait_ends_after_the_deadline_and_a_newer_wait_has_its_own(
    autojump_clock: trio.testing.MockClock,
) -> None:
    gpu = "0000:3b:00.0"
    states_in, states_out = trio.open_memory_channel[State](0)
    events_in, events_out = trio.open_memory_channel[tuple[Event, ...]](10)

    async def changes() -> AsyncIterator[State]:
        async for state in states_out:
            yield state

    got: list[tuple[float, Event]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(end_name_waits, changes, events_in, 5.0)
        await states_in.send(attrs.evolve(State(), naming={gpu: 1}))
        await trio.sleep(2)
        await states_in.send(attrs.evolve(State(), naming={gpu: 1}))  # the same wait: no new timer
        with trio.move_on_after(10):
            async for batch in events_out:
                got += [(trio.current_time(), event) for event in batch]
        await states_in.send(attrs.evolve(State(), naming={gpu: 2}))  # rebound: a new wait
        (batch,) = [await events_out.receive()]
        got += [(trio.current_time(), event) for event in batch]
        nursery.cancel_scope.cancel()
    assert [event for _, event in got] == [NvmlNameWaitOver(gpu, 1), NvmlNameWaitOver(gpu, 2)]
    assert [t for t, _ in got] == pytest.approx([5.0, 17.0])


async def test_a_deleted_socket_is_bound_again_at_the_next_check(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    keeper = SocketFile(tmp_path / "monitor.sock", gid=None)
    first = keeper.bind()
    listened: list[float] = []

    async def listen(sock: socket.socket) -> None:
        listened.append(trio.current_time())
        sock.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(keeper.keep, listen)
        await trio.sleep(1)
        keeper.path.unlink()
        await trio.sleep(3 * socketfile.CHECK_INTERVAL)
        nursery.cancel_scope.cancel()
    first.close()
    assert listened == [socketfile.CHECK_INTERVAL]  # once: the new one is there after that
    assert keeper.path.is_socket() and keeper.is_ours()


async def test_the_cdi_spec_is_written_once_per_burst_and_reserves_wait_for_it(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[tuple[float, State]] = []  # when each spec was made, on the loop, and of what
    real_build = cdi.build_spec

    def build(state: State) -> dict[str, object]:
        built.append((trio.current_time(), state))
        return real_build(state)

    monkeypatch.setattr(cdi, "build_spec", build)
    hub = Hub()
    hub.publish(State(), None)
    spec = cdi.CdiSpec(tmp_path)
    state = State()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(spec.keep, hub.changes(), lambda: hub.state)
        await spec.wait_until_current(hub.state)  # the first spec, of no devices
        arrived = trio.current_time()
        for i in range(5):  # five GPUs come, 10 ms apart
            state, patch = reduce(state, DeviceSeen(attrs.evolve(GPU, address=f"0000:3{i}:00.0")))
            hub.publish(state, patch)
            assert not spec.is_current(state)
            await trio.sleep(0.01)
        await spec.wait_until_current(state)  # what a reservation's answer does
        on_disk = (tmp_path / cdi.FILE_NAME).read_bytes()
        nursery.cancel_scope.cancel()
    assert [t for t, _ in built] == pytest.approx(
        [cdi.COALESCE_SECONDS, arrived + cdi.COALESCE_SECONDS]
    )
    assert built[-1][1] is state  # one spec for the burst, of its last state, and on disk
    assert on_disk == dumps(real_build(state)) + b"\n"
    assert not (tmp_path / cdi.FILE_NAME).exists()  # removed when it stops


async def test_a_change_the_cdi_spec_does_not_show_leaves_its_file_alone(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    """A device the spec does not name (here a NIC; on a host, every real uevent of any PCI
    device) changes the state, not the spec: the file is not written again."""
    hub = Hub()
    state, _ = reduce(State(), DeviceSeen(GPU))
    hub.publish(state, None)
    spec = cdi.CdiSpec(tmp_path)
    path = tmp_path / cdi.FILE_NAME
    async with trio.open_nursery() as nursery:
        nursery.start_soon(spec.keep, hub.changes(), lambda: hub.state)
        await spec.wait_until_current(hub.state)
        written = path.stat()
        nic = PciFacts(address="0000:01:00.0", vendor_id=0x8086, device_id=0x1592,
                       pci_class=0x020000)  # fmt: skip
        state, patch = reduce(state, DeviceSeen(nic))
        hub.publish(state, patch)
        await trio.sleep(10 * cdi.COALESCE_SECONDS)  # (its generation is the same: no wait)
        assert spec.is_current(state)
        nursery.cancel_scope.cancel()
        kept = path.stat()
    assert (kept.st_ino, kept.st_mtime_ns) == (written.st_ino, written.st_mtime_ns)


def test_the_request_budget_allows_a_seconds_burst_then_paces() -> None:
    budget = RequestBudget(rate=10)
    assert [budget.wait_before_next(0.0) for _ in range(10)] == [0.0] * 10
    assert budget.wait_before_next(0.0) == pytest.approx(0.1)
    assert budget.wait_before_next(0.0) == pytest.approx(0.2)
    assert budget.wait_before_next(10.0) == 0.0  # idle for long: a full burst again, no more
    assert [budget.wait_before_next(10.0) for _ in range(9)] == [0.0] * 9
    assert budget.wait_before_next(10.0) == pytest.approx(0.1)


def test_client_backoff_doubles_up_to_its_most_and_starts_again_after_success() -> None:
    backoff = Backoff(first=0.1, most=1.0)
    assert [backoff.delay() for _ in range(6)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])
    backoff.reset()
    assert backoff.delay() == 0.1


# --- how long a client may be idle --------------------------------------------------------


@pytest.fixture
async def timed_server(tmp_path: Path, nursery: trio.Nursery) -> Path:
    hub = Hub()
    hub.publish(State(), None)
    inbox, _ = trio.open_memory_channel[Any](1)
    server = Server(hub, inbox, limits=ConnectionLimits(timeout=60.0))
    path = tmp_path / "monitor.sock"
    await nursery.start(server.serve, socketfile.bind_unix_socket(path, 0o600, None)[0])
    return path


async def closed_with(stream: trio.SocketStream) -> tuple[float, str]:
    """When the server closed the connection, and the error it said why with."""
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    return trio.current_time(), json.loads(data)["error"]["message"]


async def test_a_client_that_sends_nothing_is_closed_after_the_timeout(
    autojump_clock: trio.testing.MockClock, timed_server: Path
) -> None:
    stream = await trio.open_unix_socket(str(timed_server))
    opened = trio.current_time()
    closed, why = await closed_with(stream)
    assert 60.0 <= closed - opened <= 60.0 + timeouts.CHECK_SECONDS
    assert why == "This connection sent nothing for 60 s; closing."


async def test_an_unfinished_line_is_timed_from_its_start_not_its_last_byte(
    autojump_clock: trio.testing.MockClock, timed_server: Path
) -> None:
    stream = await trio.open_unix_socket(str(timed_server))
    began = trio.current_time()
    await stream.send_all(b'{"jsonrpc": "2.0", ')
    await trio.sleep(50)
    await stream.send_all(b'"id": 1, ')  # more of the same line: the clock keeps running
    closed, why = await closed_with(stream)
    assert 60.0 <= closed - began <= 60.0 + timeouts.CHECK_SECONDS
    assert why == "This connection finished no request line for 60 s; closing."


async def test_a_subscriber_may_stay_quiet_for_as_long_as_it_likes(
    autojump_clock: trio.testing.MockClock, timed_server: Path
) -> None:
    stream = await trio.open_unix_socket(str(timed_server))
    await stream.send_all(b'{"jsonrpc": "2.0", "id": 1, "method": "subscribe"}\n')
    answer = await stream.receive_some(65536)
    assert b'"snapshot"' in answer
    with trio.move_on_after(24 * 3600) as quiet:
        assert await stream.receive_some(65536) != b"", "closed a quiet subscriber"
    assert quiet.cancelled_caught


async def test_a_subscriber_that_stops_reading_is_closed_after_the_timeout(
    autojump_clock: trio.testing.MockClock, tmp_path: Path, nursery: trio.Nursery
) -> None:
    hub = Hub(subscriber_buffer=4)
    state, patch = reduce(State(), DeviceSeen(GPU))
    hub.publish(state, patch)
    inbox, _ = trio.open_memory_channel[Any](1)
    server = Server(hub, inbox, limits=ConnectionLimits(timeout=60.0))
    path = tmp_path / "monitor.sock"
    await nursery.start(server.serve, socketfile.bind_unix_socket(path, 0o600, None)[0])
    stream = await trio.open_unix_socket(str(path))
    await stream.send_all(b'{"jsonrpc": "2.0", "id": 1, "method": "subscribe"}\n')
    assert b'"snapshot"' in await stream.receive_some(65536)
    (subscriber,) = hub.subscribers
    flips = 0
    while not subscriber.behind:  # until its writer is stuck on a full socket
        event = "SUCCESSFUL_RECOVERY" if flips % 2 else "BEGIN_RECOVERY"
        state, patch = reduce(state, PciErrorReported(GPU.address, event, flips % 2 == 1))
        hub.publish(state, patch)
        flips += 1
        for _ in range(3):  # the writer sends it while the socket takes it; the clock stands
            await trio.sleep(0)
    stuck = trio.current_time()
    while hub.subscribers:
        await trio.sleep(0.1)
    assert 60.0 <= trio.current_time() - stuck <= 60.0 + timeouts.CHECK_SECONDS
    assert flips > 100


async def test_memory_is_given_back_once_a_burst_is_over_and_only_if_it_grew(
    autojump_clock: trio.testing.MockClock, nursery: trio.Nursery
) -> None:
    resident = [30 << 20]
    trimmed: list[float] = []

    def trim() -> None:
        trimmed.append(trio.current_time())
        resident[0] = 31 << 20  # what it gave back

    give_back = memory.GiveBack(lambda: resident[0], trim)
    nursery.start_soon(give_back.run)
    await trio.sleep(1)
    for _ in range(20):  # a burst: activity every 0.5 s, never quiet for a second
        resident[0] += 1 << 20
        give_back.activity()
        await trio.sleep(0.5)
    last = trio.current_time() - 0.5
    await trio.sleep(10)
    assert len(trimmed) == 1
    assert last + memory.QUIET_SECONDS <= trimmed[0] <= last + 2 * memory.QUIET_SECONDS
    give_back.activity()  # activity that cost nothing: nothing to give back
    await trio.sleep(10)
    assert len(trimmed) == 1
