"""The kernel log as an XID witness, end to end: the daemon on simulated GPUs (umockdev) reading
the driver's lines from a FIFO given as ``--kmsg`` and from the real /dev/kmsg, with and without
the stand-in NVML reporting the same XID.

/dev/kmsg is the host's: other tests and the host write there too. Lines written from userspace
carry facility 1, so the tests on it trust it (``--kmsg-trust-user``), and they name a GPU on a
bus no other test uses, with an XID drawn at random, so that only their own lines can match.
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import trio
import trio.testing

from monitor.core.events import XidReported
from monitor.sim.nvml import FakeGpu, FakeNvml
from monitor.sim.umockdev import Simulator
from monitor.sources import kmsg
from monitor.sources.counts import Received
from monitor.wire.mirror import Mirror
from tests.conftest import Daemon, Subscription
from tests.waiting import wait_until

pytestmark = pytest.mark.umockdev

A, B = "0000:3b:00.0", "0000:86:00.0"
UUID_A = "GPU-0a0a0a0a-1111-2222-3333-444444444444"
UUID_B = "GPU-0b0b0b0b-5555-6666-7777-888888888888"
RARE = "0000:e7:00.0"  # on /dev/kmsg: a bus no other test names


def value(mirror: Mirror, address: str, name: str) -> Any:
    found = mirror.devices().get(address)
    attributes = found[1].get("attributes", {}) if found else {}
    return attributes.get(name, {}).get("value")


def healthy(mirror: Mirror, address: str) -> bool | None:
    found = mirror.devices().get(address)
    return None if found is None else bool(found[1]["healthy"])


def xid_line(slot: str, xid: int, pri: int = 4, seq: int = 1) -> bytes:
    text = f"NVRM: Xid (PCI:{slot}): {xid}, pid=4242, name=trainer, test line"
    return f"{pri},{seq},1000,-;{text}\n".encode()


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "kmsg"
    os.mkfifo(path)
    yield path


def write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


@pytest.fixture
def hosts(sim: Simulator) -> Simulator:
    sim.add("nvidia-h100", A, 0)
    sim.add("nvidia-h100", B, 1)
    return sim


def test_the_drivers_xid_line_in_a_fifo_marks_the_gpu_with_nvml_off(
    hosts: Simulator,
    fifo: Path,
    start_daemon: Callable[..., Daemon],
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    daemon = start_daemon("--udev-source", "udev", "--kmsg", str(fifo), env=hosts.daemon_env())
    sub = subscribe(daemon)
    sub.until(lambda m: healthy(m, A) is True)
    hostile = [
        b"no header at all",
        b"4,2,1,-;NVRM: Xid (PCI:0000:3b:00): 48, \x1b[2J raw escape\n",
        b"4,3,1,-;NVRM: Xid (PCI:0000:3b:00): 48, \\x1b]0;title\\x07",
        b"4,4,1,-;NVRM: " + b"A" * 20000,
        b"4,5,1,-;\xff\xfe\x00binary NVRM: Xid (PCI:0000:3b:00): 48,",
    ]
    write(fifo, b"\n".join(hostile) + b"\n")
    write(fifo, xid_line("0000:86:00", 48, pri=12, seq=6))  # facility 1: not trusted by default
    write(fifo, xid_line("0000:3b:00", 79, seq=7) + b" SUBSYSTEM=pci\n DEVICE=+pci:0000:3b:00.0\n")
    mirror = sub.until(lambda m: value(m, A, "last_xid") == 79)
    assert value(mirror, A, "xid_count") == 1
    assert value(mirror, A, "last_xid_source") == "kmsg"
    assert healthy(mirror, A) is False
    assert value(mirror, B, "last_xid") is None and healthy(mirror, B) is True
    with daemon.client() as client:
        status = client.call("status")
    assert status["kmsg_ignored"] >= 4  # the raw escape's line and the binary may split as one
    assert status["kmsg_records"] >= 6
    log = daemon.log()
    assert "0000:3b:00: XID 79 (kernel log)" in log
    assert f"kernel log {fifo}" in log
    # a fallen-off line for the other GPU, with no XID number
    write(fifo, b"3,8,2000,-;NVRM: GPU 0000:86:00.0: GPU has fallen off the bus.\n")
    mirror = sub.until(lambda m: value(m, B, "last_xid") == 79)
    assert healthy(mirror, B) is False and value(mirror, B, "xid_count") == 1


def test_an_xid_nvml_and_the_kernel_log_both_report_counts_once(
    hosts: Simulator,
    fifo: Path,
    tmp_path: Path,
    nvml_lib: Path,
    start_daemon: Callable[..., Daemon],
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    nvml = FakeNvml(
        tmp_path / "nvml",
        nvml_lib,
        [FakeGpu(bus_id=A, uuid=UUID_A, minor=0), FakeGpu(bus_id=B, uuid=UUID_B, minor=1)],
    )
    env = {**hosts.daemon_env(), **nvml.env()}
    daemon = start_daemon("--udev-source", "udev", "--kmsg", str(fifo), env=env, nvml=True)
    sub = subscribe(daemon)
    sub.until(lambda m: value(m, A, "uuid") == UUID_A and value(m, B, "uuid") == UUID_B)
    nvml.xid(A, 48)
    mirror = sub.until(lambda m: value(m, A, "last_xid") == 48)
    assert value(mirror, A, "last_xid_source") == "nvml"
    write(fifo, xid_line("0000:3b:00", 48, seq=1))  # the driver's line of the same XID
    write(fifo, xid_line("0000:86:00", 13, seq=2))  # read after it: once B shows it, A's was read
    mirror = sub.until(lambda m: value(m, B, "last_xid") == 13)
    assert value(mirror, A, "xid_count") == 1
    assert value(mirror, B, "last_xid_source") == "kmsg"
    log = daemon.log()
    assert f"{A} ({UUID_A}): XID 48" in log and "0000:3b:00: XID 48 (kernel log)" in log


@pytest.fixture
def rare(sim: Simulator) -> Simulator:
    sim.add("nvidia-h100", RARE, 0)
    return sim


def kmsg_write(line: str) -> None:
    """One write, one record. Without its newline the kernel holds a record open for more text
    (a continuation), and readers see it only once another record ends it."""
    with open("/dev/kmsg", "w") as kmsg:
        kmsg.write(line if line.endswith("\n") else line + "\n")


def test_real_dev_kmsg_writes_are_read_from_the_end_and_by_facility(
    rare: Simulator,
    start_daemon: Callable[..., Daemon],
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    old, ignored, taken = random.sample(range(20000, 60000), 3)
    slot = RARE[:-2]
    # before the daemon starts: never replayed
    kmsg_write(f"<12>NVRM: Xid (PCI:{slot}): {old}, written before the start")
    daemon = start_daemon(
        "--udev-source", "udev", "--kmsg", "/dev/kmsg", "--kmsg-trust-user",
        env=rare.daemon_env(),
    )  # fmt: skip
    sub = subscribe(daemon)
    sub.until(lambda m: healthy(m, RARE) is True)
    # facility 3 (daemon): userspace, and not even the facility we were told to trust
    kmsg_write(f"<28>NVRM: Xid (PCI:{slot}): {ignored}, from a system daemon")
    kmsg_write(f"<12>NVRM: Xid (PCI:{slot}): {taken}, written by a test as root")
    mirror = sub.until(lambda m: value(m, RARE, "last_xid") == taken)
    assert value(mirror, RARE, "xid_count") == 1  # neither the old line nor facility 3
    assert value(mirror, RARE, "last_xid_source") == "kmsg"
    assert healthy(mirror, RARE) is False


def test_a_reader_the_kernel_log_overran_says_how_much_it_missed(
    rare: Simulator,
    start_daemon: Callable[..., Daemon],
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    """The daemon stopped while more than the kernel's ring buffer is written: on waking it gets
    EPIPE, logs the records it missed, and reads on."""
    daemon = start_daemon(
        "--udev-source", "udev", "--kmsg", "/dev/kmsg", "--kmsg-trust-user",
        env=rare.daemon_env(),
    )  # fmt: skip
    sub = subscribe(daemon)
    sub.until(lambda m: healthy(m, RARE) is True)
    before = daemon_read(daemon)
    kmsg_write("<14>hotplug-monitor test: the line before the flood\n")
    wait_until(lambda: daemon_read(daemon) > before, timeout=10)  # it has a SEQ to count from
    os.kill(daemon.process.pid, signal.SIGSTOP)
    try:
        filler = "x" * 900
        for n in range(400):  # 360 KB: well past the 128 KiB ring buffer here
            kmsg_write(f"<15>hotplug-monitor test flood {n} {filler}\n")
    finally:
        os.kill(daemon.process.pid, signal.SIGCONT)
    xid = random.randrange(20000, 60000)
    kmsg_write(f"<12>NVRM: Xid (PCI:{RARE[:-2]}): {xid}, after the flood")
    sub.until(lambda m: value(m, RARE, "last_xid") == xid)
    wait_until(lambda: "kernel log overran its reader" in daemon.log(), timeout=5)
    with daemon.client() as client:
        assert client.call("status")["kmsg_missed"] > 0


def daemon_read(daemon: Daemon) -> int:
    with daemon.client() as client:
        records: int = client.call("status")["kmsg_records"]
    return records


class CountedReads(ModuleType):
    """``os`` as the kernel-log reader sees it, with its reads counted."""

    def __init__(self) -> None:
        super().__init__("os")
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def read(self, fd: int, size: int) -> bytes:
        self.reads += 1
        return os.read(fd, size)


async def test_the_reader_reads_only_when_a_record_comes(
    autojump_clock: trio.testing.MockClock,
    fifo: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No wake-ups without records: an hour of trio's clock with nothing written costs not one
    read, where a reader that polled (at any interval under an hour) would have read."""
    counted = CountedReads()
    monkeypatch.setattr(kmsg, "os", counted)
    send, receive = trio.open_memory_channel[tuple[Any, ...] | Received](8)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(kmsg.run_kmsg_source, send, fifo))
        await trio.sleep(3600)
        assert counted.reads == 0
        write(fifo, xid_line("0000:3b:00", 13))
        batch = await receive.receive()
        assert isinstance(batch, Received)
        assert batch.events == (XidReported("0000:3b:00", 13, "kmsg", batch.at),)
        reads = counted.reads
        assert reads > 0
        await trio.sleep(3600)
        assert counted.reads == reads  # the record read, and not one read since
        nursery.cancel_scope.cancel()
