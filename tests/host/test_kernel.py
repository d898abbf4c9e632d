"""Real kernel uevents. Writing an action to a PCI device's ``uevent`` file makes the kernel emit
that uevent without touching the device; the daemon listens with ``--udev-source kernel``."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from monitor.wire.errors import DaemonUnavailable
from tests.conftest import Daemon, Subscription, need
from tests.sysfs import emit, pick_device, settle, snapshot_view, sysfs_truth
from tests.waiting import wait_until

pytestmark = pytest.mark.kernel
PCI = Path("/sys/bus/pci/devices")
# Each uevent is a few hundred bytes: 20,000 of them are megabytes, many times the 128 KiB
# the kernel makes of the 64 KiB buffer asked for (it doubles SO_RCVBUF).
STORM_EVENTS = 20_000


@pytest.fixture
def target() -> tuple[str, str]:
    found = pick_device()
    need(None if found else "needs root and a PCI device with a writable uevent file")
    assert found is not None
    return found


@pytest.fixture
def daemon_for(start_daemon: Callable[..., Daemon]) -> Iterator[Callable[..., Daemon]]:
    def start(pci_class: str, *extra: str) -> Daemon:
        return start_daemon("--udev-source", "kernel", "--match-class", pci_class, *extra)

    yield start


def test_kernel_uevents_reach_a_subscriber(
    target: tuple[str, str],
    daemon_for: Callable[..., Daemon],
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    address, pci_class = target
    daemon = daemon_for(pci_class)
    sub = subscribe(daemon)
    before = sub.mirror.devices()[address]
    assert snapshot_view(sub.mirror.snapshot) == sysfs_truth(pci_class)

    emit(address, ["remove"])  # a synthetic remove: the device stays, the daemon believes it
    sub.until(lambda m: address not in m.devices())
    emit(address, ["add"])
    mirror = sub.until(lambda m: address in m.devices())
    assert mirror.devices()[address] == before
    assert snapshot_view(mirror.snapshot) == sysfs_truth(pci_class)


def test_an_event_storm_overflows_netlink_and_the_daemon_converges_to_sysfs(
    target: tuple[str, str],
    daemon_for: Callable[..., Daemon],
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    address, pci_class = target
    # The smallest buffer the daemon accepts; it overflows for certain, however idle or busy
    # the machine, because the daemon is stopped while the storm is written: nothing reads.
    daemon = daemon_for(pci_class, "--netlink-buffer", "65536")
    truth = sysfs_truth(pci_class)
    sub = subscribe(daemon)
    sub.client.settimeout(None)
    stop = threading.Event()
    seen: dict[str, Any] = {"patches": 0, "snapshots": 0}

    def follow() -> None:
        while not stop.is_set():
            try:
                params = sub.next()  # raises if a patch does not fit the mirror's generation
            except (OSError, StopIteration, ValueError, DaemonUnavailable) as exc:
                if not stop.is_set():
                    seen["error"] = repr(exc)
                return
            seen["snapshots" if "snapshot" in params else "patches"] += 1

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    started = time.monotonic()
    # Half flapping (a patch per batch), half removes, then one add: the device ends present,
    # so the snapshot is right only if the daemon saw that last add or re-read sysfs after
    # losing it.
    half = STORM_EVENTS // 2
    daemon.process.send_signal(signal.SIGSTOP)
    try:
        emit(address, ["remove", "add"] * (half // 2) + ["remove"] * (half - 1) + ["add"])
    finally:
        daemon.process.send_signal(signal.SIGCONT)
    sent = time.monotonic()

    converged = settle(daemon, since=sent)
    assert daemon.process.poll() is None, daemon.log()
    assert snapshot_view(daemon.fingerprint()["snapshot"]) == truth
    overflows = daemon.log().count("uevents were lost")
    assert overflows >= 1, "the storm did not overflow the buffer; nothing was tested"

    final = daemon.fingerprint()
    with contextlib.suppress(AssertionError):  # asserted below, once the reader has stopped
        wait_until(lambda: sub.mirror.generation == final["generation"], interval=0.01)
    stop.set()
    sub.client.close()
    reader.join(timeout=5)
    assert "error" not in seen, seen["error"]
    assert sub.mirror.generation == final["generation"]
    assert sub.mirror.snapshot == final["snapshot"]
    print(
        f"\nstorm: {STORM_EVENTS} uevents written in {sent - started:.2f} s; "
        f"{overflows} overflow(s) and resync(s); snapshot equal to sysfs {converged * 1000:.0f} ms "
        f"after the last write; subscriber saw {seen['patches']} patches and "
        f"{seen['snapshots']} full snapshots, ending at generation {final['generation']}"
    )
