"""Malformed device data from udev (issue 7): the real daemon against umockdev devices that carry
garbage, present at start and arriving as uevents while it runs.

Whatever a device says, the daemon stays up, ``fingerprint`` answers strict JSON whose devices
are the ones that should be there (sane ones untouched; malformed ones skipped with a log line or
shown with printable text of at most 256 characters), a subscriber's mirror equals it, and a
good GPU added after the garbage still appears.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitor.sim.umockdev import Simulator
from monitor.wire.framing import encode_request
from tests.conftest import Daemon, Subscription
from tests.reliability import record

pytestmark = pytest.mark.umockdev

AREA = "Device data"
MiB = 1024 * 1024
MAX_TEXT = 256
# Clients in other languages read JSON numbers as doubles (RFC 8259, section 6).
MAX_JSON_INT = 2**53
PCI_ADDRESS = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")
ARGS = ("--udev-source", "udev", "--log-level", "debug")

# Sane GPUs and the DRM minors the simulator gives them, in the order it adds them.
SANE = {"0000:1b:00.0": "nvidia-h100", "0000:5b:00.0": "amd-mi300x", "0000:9a:00.0": "intel-arc"}
CARDS = {"0000:1b:00.0": "card0", "0000:5b:00.0": "card1", "0000:9a:00.0": "card2"}
LATE = "0000:bb:00.0"  # hot-added after the garbage
LATER = "0000:cc:00.0"  # hot-added after the garbage is removed again

BEACON = "0000:ee:00.0"  # its health is flipped to learn that earlier uevents were taken in
# HOTPLUG_MALFORMED_EXAMPLES: examples per generated test (the default keeps the file under a
# minute; more for a long run).
EXAMPLES = int(os.environ.get("HOTPLUG_MALFORMED_EXAMPLES", "150"))
GENERATED = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

H100_IDS = {"vendor": "0x10de", "device": "0x2330", "class": "0x030200"}
H100_PROPS = {"PCI_ID": "10DE:2330", "PCI_CLASS": "30200", "DRIVER": "nvidia"}


def path_of(address: str) -> str:
    return f"/sys/devices/{address}"


@pytest.fixture
def sane(sim: Simulator) -> Simulator:
    for address, kind in SANE.items():
        sim.add(kind, address, 0)
    return sim


# --- what a snapshot must be, whatever came in ------------------------------------------------


def raw_fingerprint(daemon: Daemon) -> dict[str, Any]:
    """The ``fingerprint`` answer, parsed from the bytes on the wire as strictly as JSON allows."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(daemon.socket))
        sock.sendall(encode_request(1, "fingerprint", {}))
        with sock.makefile("rb") as reader:
            line = reader.readline()
    assert line.endswith(b"\n"), f"no complete answer: {line[-200:]!r}"

    def no_constants(name: str) -> Any:
        raise AssertionError(f"{name} is not JSON")

    def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        assert len(keys) == len(set(keys)), f"duplicate keys: {keys}"
        return dict(pairs)

    message = json.loads(
        line.decode("utf-8"),  # strict: invalid UTF-8 raises
        parse_constant=no_constants,
        object_pairs_hook=unique_keys,
    )
    result: dict[str, Any] = message["result"]
    return result


def strings_and_numbers(value: Any) -> Iterator[str | int | float]:
    """Every key, string and number in a JSON value."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from strings_and_numbers(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings_and_numbers(item)
    elif isinstance(value, str | int | float) and not isinstance(value, bool):
        yield value


def check_snapshot(snapshot: dict[str, Any]) -> int:
    """Assert that a snapshot is well formed and its text sanitised; its longest string."""
    longest = 0
    for item in strings_and_numbers(snapshot):
        if isinstance(item, str):
            item.encode("utf-8")  # no lone surrogates either
            assert item.isprintable(), f"unprintable text in the snapshot: {item!r}"
            assert len(item) <= MAX_TEXT, f"{len(item)} characters: {item[:80]!r}..."
            longest = max(longest, len(item))
        else:
            assert abs(item) <= MAX_JSON_INT, f"number out of range: {item}"
    seen: set[str] = set()
    for key, group in snapshot["groups"].items():
        assert key == f"{group['vendor']}/{group['type']}/{group['name']}"
        assert group["vendor"] and group["type"] and group["name"] and group["devices"]
        for device_id, device in group["devices"].items():
            assert PCI_ADDRESS.fullmatch(device_id), device_id
            assert device_id == device["id"] == device["hw_locality"]["pci_bus_id"]
            assert device_id not in seen, f"{device_id} is in two groups"
            seen.add(device_id)
            assert device["healthy"] is (device["health_desc"] == ""), device
            for attribute in (*device["attributes"].values(), *group["attributes"].values()):
                assert set(attribute) <= {"value", "unit"} and "value" in attribute
                assert isinstance(attribute["value"], str | int | float | bool)
    return longest


def devices_of(snapshot: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {i: d for g in snapshot["groups"].values() for i, d in g["devices"].items()}


def check_log(log: str) -> None:
    """No line of the daemon's log carries control characters or unbounded device text."""
    for line in log.splitlines():
        assert line.isprintable(), f"unprintable log line: {line[:200]!r}"
        assert len(line) <= 4 * MAX_TEXT, f"log line of {len(line)} characters: {line[:200]}"
    assert "Traceback" not in log, log[-4000:]


def settled(daemon: Daemon, sub: Subscription) -> dict[str, Any]:
    """The checked snapshot, once the subscriber's mirror has caught up with it and equals it."""
    assert daemon.process.poll() is None, f"the daemon exited:\n{daemon.log()[-4000:]}"
    result = raw_fingerprint(daemon)
    sub.until(lambda m: m.generation >= result["generation"])
    assert sub.mirror.generation == result["generation"]
    assert sub.mirror.snapshot == result["snapshot"]
    return result["snapshot"]  # type: ignore[no-any-return]


def has(address: str, attribute: str) -> Callable[[Any], bool]:
    """The mirror shows ``address`` with ``attribute``."""

    def shown(mirror: Any) -> bool:
        device = mirror.devices().get(address)
        return device is not None and attribute in device[1]["attributes"]

    return shown


# --- a catalogue of garbage, fed at start and while the daemon runs -------------------------


@dataclass(frozen=True)
class Garbage:
    """One malformed device; ``shown_as`` is the ID it must appear under, None: skipped."""

    what: str
    name: str | bytes
    subsystem: str = "pci"
    parent: str | None = None  # a sys path
    attributes: Mapping[str, str | bytes] = field(default_factory=dict)
    properties: Mapping[str, str | bytes] = field(default_factory=dict)
    # properties too big for any uevent: set without one, so only an enumeration reads them
    huge: Mapping[str, str | bytes] = field(default_factory=dict)
    shown_as: str | None = None
    logged: str | None = None  # what a log line about skipping it names
    # False: never in a uevent, as libudev cuts a uevent's DEVPATH at a line break, which
    # would make it another device's event; only enumerated (and never removed) then.
    uevents: bool = True

    def size(self) -> int:
        values = (*self.attributes.values(), *self.properties.values(), *self.huge.values())
        return max((len(v) for v in values), default=0)


@dataclass
class Run:
    """What one garbage run measured."""

    at_start: int = 0
    hot_added: int = 0
    removed: int = 0
    longest: int = 0
    late_seconds: float = 0.0
    snapshots: list[dict[str, Any]] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)


def feed(sim: Simulator, items: list[Garbage]) -> list[str]:
    """Add the garbage devices; their sys paths."""
    paths = []
    for item in items:
        path = sim.add_raw(item.subsystem, item.name, item.parent, item.attributes, item.properties)
        if item.huge:
            sim.set_raw(path, properties=item.huge)
        paths.append(path)
    return paths


def expect(
    snapshot: dict[str, Any],
    reference: dict[str, dict[str, Any]],
    items: list[Garbage],
    present: set[str],
) -> None:
    """Sane devices as they were, shown garbage under its own ID, nothing else."""
    devices = devices_of(snapshot)
    shown = {i.shown_as for i in items if i.shown_as is not None}
    assert set(devices) == set(reference) | shown | present
    for device_id, before in reference.items():
        assert devices[device_id] == before, f"sane device {device_id} changed"


def check_logged(run: Run, items: list[Garbage]) -> int:
    """Both daemons logged each skipped or corrected item, naming it; how many there were."""
    for log in run.logs:
        lines = [line for line in log.splitlines() if "skipping" in line or "ignoring" in line]
        for item in items:
            if item.logged is not None:
                assert any(item.logged in line for line in lines), f"no log line: {item.what}"
    return sum(item.logged is not None for item in items)


def run_garbage(
    sim: Simulator,
    start_daemon: Callable[..., Daemon],
    subscribe: Callable[[Daemon], Subscription],
    at_start: list[Garbage],
    hot: list[Garbage],
) -> Run:
    """Feed garbage at start and to a running daemon; check both daemons' views; remove it."""
    run = Run(at_start=len(at_start), hot_added=len(hot))
    assert all(item.uevents for item in hot)
    # The sane devices' JSON, from a daemon that saw no garbage.
    first = start_daemon(*ARGS, env=sim.daemon_env())
    reference = devices_of(first.fingerprint()["snapshot"])
    assert set(reference) == set(SANE)
    first.stop()
    log_offset = len(first.log())

    paths = feed(sim, at_start)
    daemon = start_daemon(*ARGS, env=sim.daemon_env())
    sub = subscribe(daemon)
    at_first = settled(daemon, sub)
    run.longest = max(run.longest, check_snapshot(at_first))
    expect(at_first, reference, at_start, set())
    paths += feed(sim, hot)
    started = time.monotonic()
    sim.add("nvidia-h100", LATE, 0)  # after the garbage: the daemon must still see it
    sub.until(has(LATE, "drm_render"))
    run.late_seconds = time.monotonic() - started
    hot_view = settled(daemon, sub)
    run.longest = max(run.longest, check_snapshot(hot_view))
    expect(hot_view, reference, at_start + hot, {LATE})
    run.snapshots.append(hot_view)
    daemon.stop()
    run.logs.append(daemon.log()[log_offset:])
    log_offset = len(daemon.log())

    # A fresh daemon enumerates all of it and must see what the running one pieced together.
    again = start_daemon(*ARGS, env=sim.daemon_env())
    sub = subscribe(again)
    enumerated = settled(again, sub)
    run.longest = max(run.longest, check_snapshot(enumerated))
    expect(enumerated, reference, at_start + hot, {LATE})
    run.snapshots.append(enumerated)
    assert enumerated == hot_view

    # Remove every garbage device (children first, as the kernel does): uevents for devices
    # the daemon skipped, never saw, or shows.
    for item, path in reversed(list(zip(at_start + hot, paths, strict=True))):
        if not item.uevents:
            continue
        if item.huge:  # too big for the remove uevent: shrink first (no uevent)
            sim.set_raw(path, properties={key: "" for key in item.huge})
        sim.remove_raw(path)
        run.removed += 1
    sim.add("amd-mi300x", LATER, 0)
    sub.until(has(LATER, "drm_render"))
    after = settled(again, sub)
    check_snapshot(after)
    expect(after, reference, [], {LATE, LATER})
    again.stop()
    run.logs.append(again.log()[log_offset:])
    for log in run.logs:
        check_log(log)
    return run


# --- the catalogue: each builder makes a distinct copy per tag (0: at start, 1: hot-added) ----


def no_identity(tag: int) -> list[Garbage]:
    """PCI devices without a usable address, IDs or class: each skipped with a log line."""
    bell = ("\x07", "\x1b")[tag]
    escaped = ("\\x07", "\\x1b")[tag]
    blank = ("\n", "\t")[tag]  # what str.strip() would remove
    blank_escaped = ("\\n", "\\t")[tag]

    def at(bus: int) -> str:
        return f"0000:{bus:02x}:{tag:02x}.0"

    return [
        Garbage(
            "no PCI_SLOT_NAME, and a name that is no PCI address",
            f"pci-garbage-{tag}",
            attributes=H100_IDS,
            properties=H100_PROPS,
            logged=f"pci-garbage-{tag}",
        ),
        Garbage(
            "a name that is a sane GPU's address plus a control character",
            f"0000:1b:00.0{bell}",
            attributes=H100_IDS,
            properties=H100_PROPS,
            logged=f"0000:1b:00.0{escaped}",
        ),
        Garbage(
            "a name that is a sane GPU's address plus a line break",
            f"0000:1b:00.0{blank}",
            attributes=H100_IDS,
            properties=H100_PROPS,
            logged=f"0000:1b:00.0{blank_escaped}",
            uevents=tag == 1,
        ),
        Garbage(
            "PCI_SLOT_NAME naming a sane GPU, on another device",
            at(0x2C),
            attributes=H100_IDS,
            properties={**H100_PROPS, "PCI_SLOT_NAME": "0000:5b:00.0"},
            logged=at(0x2C),
        ),
        Garbage(
            "a name that is not UTF-8",
            f"0000:2d:{tag:02x}.".encode() + b"\xff",
            attributes=H100_IDS,
            properties=H100_PROPS,
            logged=f"0000:2d:{tag:02x}.\ufffd",
        ),
        Garbage(
            "an upper-case address as name",
            f"0000:1B:{tag:02X}.0",
            attributes=H100_IDS,
            properties=H100_PROPS,
            logged=f"0000:1B:{tag:02X}.0",
        ),
        Garbage(
            "PCI_SLOT_NAME padded with blanks",
            at(0x2E),
            attributes=H100_IDS,
            properties={**H100_PROPS, "PCI_SLOT_NAME": f" {at(0x2E)}\t"},
            logged=at(0x2E),
        ),
        Garbage(
            "non-hex PCI_ID, vendor and device",
            at(0x31),
            attributes={"vendor": "0xnvidia", "device": "0x23g0", "class": "0x030200"},
            properties={"PCI_ID": "ZZZZ:2330", "PCI_CLASS": "30200"},
            logged=at(0x31),
        ),
        Garbage(
            "out-of-range PCI_ID, vendor and device",
            at(0x32),
            attributes={"vendor": "0x10de0", "device": "0x123300", "class": "0x030200"},
            properties={"PCI_ID": "10DE0:123300", "PCI_CLASS": "30200"},
            logged=at(0x32),
        ),
        Garbage(
            "no PCI_ID, and an empty device attribute",
            at(0x33),
            attributes={"vendor": "0x10de", "device": "", "class": "0x030200"},
            logged=at(0x33),
        ),
        Garbage(
            "IDs that are hex only once their control characters are dropped",
            at(0x34),
            attributes={"vendor": "0x10\x07de", "device": "0x23\x1b30", "class": "0x03\x7f0200"},
            properties={"PCI_ID": "10\x07DE:23\x1b30", "PCI_CLASS": "3\x010200"},
            logged=at(0x34),
        ),
        Garbage(
            "IDs only Python's int() reads: underscores, Arabic-Indic digits",
            at(0x35),
            attributes={"vendor": "0x1_0de", "device": "0x\u0662\u0663\u0663\u0660"},
            properties={"PCI_ID": "1_0DE:\u0662\u0663\u0663\u0660", "PCI_CLASS": "3_0200"},
            logged=at(0x35),
        ),
        *(
            Garbage(
                f"class code {shown}",
                at(0x36 + i),
                attributes={**H100_IDS, "class": attribute},
                properties={**H100_PROPS, "PCI_CLASS": property_},
                logged=at(0x36 + i),
            )
            for i, (shown, attribute, property_) in enumerate(
                [
                    ("0xffffffff", "0xffffffff", "FFFFFFFF"),
                    ("zz", "zz", "zz"),
                    ("empty", "", ""),
                    ("negative", "-0x030000", "-30000"),
                ]
            )
        ),
    ]


def bad_text(tag: int) -> list[Garbage]:
    """PCI devices with a good identity and garbage text: shown, the text sanitised."""

    def at(bus: int) -> str:
        return f"0000:{bus:02x}:{tag:02x}.0"

    huge = 2 * MiB
    # A running daemon reads properties only from uevents (at most 16 KiB here): the 2 MiB
    # ones are for the enumeration, the 15 000-character ones for the hot-added copy.
    big: dict[str, str | bytes] = {"DRIVER": "D" * huge, "PCI_SUBSYS_ID": "F" * (huge // 2)}
    # libudev reads no property of a device whose uevent file is 4 MiB or more
    unreadable: dict[str, str | bytes] = {"DRIVER": "D" * huge, "MODALIAS": "M" * huge}
    return [
        Garbage(
            "driver name with terminal escapes and control characters",
            at(0x41),
            attributes=H100_IDS,
            properties={**H100_PROPS, "DRIVER": "nvi\x1b[31mdia\r\x7f\x08"},
            shown_as=at(0x41),
        ),
        Garbage(
            "driver name that is not UTF-8",
            at(0x42),
            attributes=H100_IDS,
            properties={**H100_PROPS, "DRIVER": b"nv\xff\xfeidia"},
            shown_as=at(0x42),
        ),
        Garbage(
            "2 MiB driver and subsystem properties",
            at(0x43),
            attributes=H100_IDS,
            properties=H100_PROPS if tag == 0 else {**H100_PROPS, "DRIVER": "D" * 15000},
            huge=big if tag == 0 else {},
            shown_as=at(0x43),
        ),
        Garbage(
            "4 MiB of properties, more than libudev reads",
            at(0x47),
            attributes=H100_IDS,
            properties={**H100_PROPS, "DRIVER": "D" * 7000, "MODALIAS": "M" * 7000},
            huge=unreadable if tag == 0 else {},
            shown_as=at(0x47),
        ),
        Garbage(
            "2 MiB link speed and NUMA node, a 300-digit link width",
            at(0x44),
            attributes={
                **H100_IDS,
                "current_link_speed": "S" * huge + "\x1b",
                "numa_node": "9" * huge,
                "current_link_width": "1" * 300,
            },
            properties=H100_PROPS,
            shown_as=at(0x44),
        ),
        Garbage(
            "absurd numbers: a 23-digit NUMA node, Arabic-Indic link width, non-UTF-8 speed",
            at(0x45),
            attributes={
                **H100_IDS,
                "numa_node": "99999999999999999999999",
                "current_link_width": "\u0661\u0666",
                "current_link_speed": b"\xff\xfe 32.0 GT/s PCIe",
            },
            properties=H100_PROPS,
            shown_as=at(0x45),
        ),
        Garbage(
            "an unknown accelerator with a garbage subsystem ID and modalias",
            at(0x46),
            attributes={"vendor": "0x1234", "device": "0x5678", "class": "0x120000"},
            properties={
                "PCI_ID": "1234:5678",
                "PCI_CLASS": "120000",
                "PCI_SUBSYS_ID": "zz:yy",
                "MODALIAS": "\x1b]0;pwned\x07",
                "DRIVER": "accel\t\x0b",
            },
            shown_as=at(0x46),
        ),
    ]


def bad_drm(tag: int) -> list[Garbage]:
    """DRM nodes without a PCI parent, with garbage names, or with garbage DEVNAMEs."""
    n = 40 + 10 * tag  # card numbers no simulated GPU uses
    bell = ("\x07", "\x1b")[tag]
    escaped = ("\\x07", "\\x1b")[tag]
    blank = ("\n", "\t")[tag]
    blank_escaped = ("\\n", "\\t")[tag]
    host = f"0000:51:{tag:02x}.0"
    platform = f"/sys/devices/vkms-{tag}"

    def minor(name: str, **props: str | bytes) -> dict[str, str | bytes]:
        return {"DEVNAME": f"/dev/dri/{name}", "DEVTYPE": "drm_minor", **props}

    return [
        Garbage("a platform device, parent of DRM nodes", f"vkms-{tag}", "platform"),
        Garbage(
            "card node with no parent at all",
            f"drm/card{n}",
            "drm",
            properties=minor(f"card{n}"),
            logged=f"card{n}",
        ),
        Garbage(
            "card node below a platform device",
            f"drm/card{n + 1}",
            "drm",
            platform,
            properties=minor(f"card{n + 1}"),
            logged=f"card{n + 1}",
        ),
        Garbage(
            "render node below a platform device",
            f"drm/renderD{170 + tag}",
            "drm",
            platform,
            properties=minor(f"renderD{170 + tag}"),
            logged=f"renderD{170 + tag}",
        ),
        Garbage(
            "card node named like a sane GPU's card0 plus a control character",
            f"drm/card{bell}0",
            "drm",
            path_of("0000:1b:00.0"),
            properties=minor(f"card{bell}0"),
            logged=f"card{escaped}0",
        ),
        Garbage(
            "card node named like a sane GPU's card0 plus a line break",
            f"drm/card0{blank}",
            "drm",
            path_of("0000:5b:00.0"),
            properties=minor(f"card0{blank}"),
            logged=f"card0{blank_escaped}",
            uevents=tag == 1,
        ),
        Garbage(
            "card node with a 250-digit number",
            f"drm/card{'9' * 250}{tag}",
            "drm",
            path_of("0000:5b:00.0"),
            properties={"DEVTYPE": "drm_minor"},
            logged="card99999999",
        ),
        Garbage(
            "card node whose name is not UTF-8",
            f"drm/card{n + 2}".encode() + b"\xff",
            "drm",
            path_of("0000:9a:00.0"),
            properties={"DEVTYPE": "drm_minor"},
            logged=f"card{n + 2}\ufffd",
        ),
        Garbage(
            "DRM device named like no minor",
            f"drm/cardX{tag}",
            "drm",
            path_of("0000:9a:00.0"),
            properties=minor(f"cardX{tag}"),
            logged=f"cardX{tag}",
        ),
        Garbage(
            "PCI GPU hosting garbage DRM nodes",
            host,
            attributes=H100_IDS,
            properties=H100_PROPS,
            shown_as=host,
        ),
        Garbage(
            "card node whose DEVNAME climbs out of /dev",
            f"drm/card{n + 3}",
            "drm",
            path_of(host),
            properties=minor(f"card{n + 3}", DEVNAME="../../etc/shadow"),
            logged=f"card{n + 3}: ignoring DEVNAME",
        ),
        Garbage(
            "card node with a 900-character DEVNAME",
            f"drm/card{n + 4}",
            "drm",
            path_of(host),
            properties=minor(f"card{n + 4}", DEVNAME="dri/" + "x" * 900),
            logged=f"card{n + 4}: ignoring DEVNAME",
        ),
        Garbage(
            "render node whose DEVNAME has control characters",
            f"drm/renderD{180 + tag}",
            "drm",
            path_of(host),
            properties=minor(f"renderD{180 + tag}", DEVNAME=f"dri/render{bell}D\r{180 + tag}"),
            logged=f"renderD{180 + tag}: ignoring DEVNAME",
        ),
        Garbage(
            "PCI function with no identity below a sane GPU, parent of a card node",
            f"pci-nested-{tag}",
            parent=path_of("0000:9a:00.0"),
            attributes={"class": "0x030000"},
            logged=f"pci-nested-{tag}",
        ),
        Garbage(
            "card node below that PCI function",
            f"drm/card{n + 5}",
            "drm",
            f"{path_of('0000:9a:00.0')}/pci-nested-{tag}",
            properties=minor(f"card{n + 5}"),
            logged=f"card{n + 5}",
        ),
        Garbage(
            "PCI function with an upper-case address below a sane GPU",
            f"0000:1C:{tag:02X}.0",
            parent=path_of("0000:1b:00.0"),
            attributes=H100_IDS,
            properties=H100_PROPS,
            logged=f"0000:1C:{tag:02X}.0",
        ),
        Garbage(
            "render node below that PCI function",
            f"drm/renderD{190 + tag}",
            "drm",
            f"{path_of('0000:1b:00.0')}/0000:1C:{tag:02X}.0",
            properties=minor(f"renderD{190 + tag}"),
            logged=f"renderD{190 + tag}",
        ),
    ]


def test_pci_devices_without_usable_identity_are_skipped_with_a_log_line(
    sane: Simulator,
    start_daemon: Callable[..., Daemon],
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    start, hot = no_identity(0), no_identity(1)
    run = run_garbage(sane, start_daemon, subscribe, start, hot)
    logged = check_logged(run, start + hot)
    record(
        AREA,
        "PCI devices with no usable identity: no PCI_SLOT_NAME and a name that is no address; "
        "names that are a sane GPU's address plus a control character or line break, in upper "
        "case, or not UTF-8; PCI_SLOT_NAME naming another device or padded; non-hex, "
        "out-of-range, control-character and underscore IDs; class codes 0xffffffff, zz, "
        "empty, negative",
        f"{run.at_start} devices at start, {run.hot_added} hot-added, {run.removed} removes "
        "of devices never seen; 2 daemons each",
        f"daemon up; all {logged} skipped, each with a log line; {len(SANE)} sane devices "
        "unchanged, the removes left them alone; GPU hot-added after the garbage shown in "
        f"{run.late_seconds * 1000:.0f} ms",
    )


def test_garbage_text_in_pci_devices_is_shown_sanitised_and_bounded(
    sane: Simulator,
    start_daemon: Callable[..., Daemon],
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    start, hot = bad_text(0), bad_text(1)
    run = run_garbage(sane, start_daemon, subscribe, start, hot)
    for snapshot in run.snapshots:
        for tag in (0, 1):

            def shown(bus: int, tag: int = tag, snapshot: dict[str, Any] = snapshot) -> Any:
                device = devices_of(snapshot)[f"0000:{bus:02x}:{tag:02x}.0"]
                return {name: value["value"] for name, value in device["attributes"].items()}

            driver = shown(0x41)["driver"]
            assert driver.startswith("nvi") and "dia" in driver
            assert shown(0x42)["driver"] == "nv\ufffd\ufffdidia"
            assert shown(0x43)["driver"] == "D" * MAX_TEXT
            assert shown(0x44)["pci_link_speed"] == "S" * MAX_TEXT
            for bus in (0x44, 0x45):
                assert {"numa_node", "pci_link_width"}.isdisjoint(shown(bus))
            assert "32.0 GT/s PCIe" in shown(0x45)["pci_link_speed"]
            accelerator = shown(0x46)
            assert accelerator["driver"] == "accel" and "subsystem_vendor_id" not in accelerator
            group = snapshot["groups"]["1234/accelerator/1234:5678"]
            assert f"0000:46:{tag:02x}.0" in group["devices"]
        unreadable = devices_of(snapshot)["0000:47:00.0"]
        assert unreadable["health_desc"] == "no kernel driver bound"
        assert "driver" not in unreadable["attributes"]
        assert shown(0x47, 1)["driver"] == "D" * MAX_TEXT
    largest = max(item.size() for item in start + hot)
    record(
        AREA,
        "PCI driver names, properties and attributes with control characters, terminal "
        "escapes, invalid UTF-8, 2 MiB values, 23- and 300-digit numbers",
        f"{run.at_start} devices at start, {run.hot_added} hot-added; largest value "
        f"{largest / MiB:.0f} MiB; 2 daemons each",
        f"daemon up; all {run.at_start + run.hot_added} shown with printable text, longest "
        f"string {run.longest} characters (limit {MAX_TEXT}); {len(SANE)} sane devices "
        f"unchanged; GPU hot-added after the garbage shown in {run.late_seconds * 1000:.0f} ms",
    )


def test_drm_nodes_without_pci_parent_or_with_garbage_names_are_skipped(
    sane: Simulator,
    start_daemon: Callable[..., Daemon],
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    start, hot = bad_drm(0), bad_drm(1)
    run = run_garbage(sane, start_daemon, subscribe, start, hot)
    for snapshot in run.snapshots:
        devices = devices_of(snapshot)
        for tag, n in ((0, 40), (1, 50)):
            host = devices[f"0000:51:{tag:02x}.0"]["attributes"]
            cards = host["drm_card"]["value"].split(",")
            assert cards == [f"/dev/dri/card{n + 3}", f"/dev/dri/card{n + 4}"]
            assert host["drm_render"]["value"] == f"/dev/dri/renderD{180 + tag}"
    logged = check_logged(run, start + hot)
    record(
        AREA,
        "DRM nodes without a sane PCI parent (none, platform device, unidentifiable PCI "
        "function below a sane GPU); names that are a sane card's plus a control character or "
        "line break, not UTF-8, 250 digits, no minor; DEVNAMEs climbing out of /dev, 900 "
        "characters, with control characters",
        f"{run.at_start} devices (DRM nodes and their parents) at start, {run.hot_added} "
        f"hot-added, {run.removed} removed; 2 daemons each",
        f"daemon up; {logged} skipped or corrected, each with a log line; bad DEVNAMEs "
        f"replaced by /dev/dri/NAME; {len(SANE)} sane GPUs' DRM nodes unchanged",
    )


# --- generated garbage while the daemon runs (hypothesis) -----------------------------------


def no_bytes(forbidden: bytes) -> Callable[[bytes], bytes]:
    return lambda value: bytes(b for b in value if b not in forbidden)


# A property value in a uevent: any bytes but NUL (C strings) and newline (umockdev keeps one
# property per line, so a newline would forge another property in the testbed itself); at most
# 7000 bytes so that two fit in one umockdev uevent (16 KiB).
_CHARS = st.characters(codec="utf-8", exclude_characters="\n\x00")
TOKENS = ["BEGIN_RECOVERY", "SUCCESSFUL_RECOVERY", "FAILED_RECOVERY", "0", "1", "none", "rebind"]
values = st.one_of(
    st.sampled_from(TOKENS),
    st.tuples(st.sampled_from(TOKENS), st.text(st.sampled_from("\x01\x07\x1b\r\t\x7f"))).map(
        "".join
    ),
    st.text(_CHARS, max_size=300),
    st.binary(max_size=80).map(no_bytes(b"\n\x00")),
    st.integers(300, 7000).map(lambda n: "W" * n),
)


class Beacon:
    """A GPU whose health the test flips: once the flip shows, every earlier uevent was read."""

    def __init__(self, sim: Simulator, sub: Subscription) -> None:
        self.sim = sim
        self.sub = sub
        self.broken = False
        self.flips = 0

    def flip(self) -> None:
        self.broken = not self.broken
        self.flips += 1
        self.sim.pci_error(BEACON, "BEGIN_RECOVERY" if self.broken else "SUCCESSFUL_RECOVERY")
        healthy = not self.broken
        self.sub.until(lambda m: m.devices()[BEACON][1]["healthy"] is healthy)


def card_path(address: str) -> str:
    return f"{path_of(address)}/drm/{CARDS[address]}"


def test_change_uevents_with_garbage_health_properties(
    sane: Simulator,
    start_daemon: Callable[..., Daemon],
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    sane.add("nvidia-h100", BEACON, 0)
    daemon = start_daemon(*ARGS, env=sane.daemon_env())
    sub = subscribe(daemon)
    reference = settled(daemon, sub)
    beacon = Beacon(sane, sub)
    sent = {"uevents": 0, "examples": 0, "longest": 0, "unhealthy": 0}

    @GENERATED
    @given(
        target=st.sampled_from(sorted(SANE)),
        error_event=values,
        online=values,
        wedged=values,
    )
    def garbage_then_recovery(
        target: str, error_event: str | bytes, online: str | bytes, wedged: str | bytes
    ) -> None:
        sent["examples"] += 1
        pci = {"ERROR_EVENT": error_event, "DEVICE_ONLINE": online}
        sane.uevent_raw(path_of(target), "change", pci)
        sane.uevent_raw(card_path(target), "change", {"WEDGED": wedged})
        try:
            beacon.flip()
            snapshot = settled(daemon, sub)
            sent["longest"] = max(sent["longest"], check_snapshot(snapshot))
            devices, before = devices_of(snapshot), devices_of(reference)
            assert set(devices) == set(before)
            for device_id, device in devices.items():  # only health may have changed
                assert device["attributes"] == before[device_id]["attributes"]
            sent["unhealthy"] += not devices[target]["healthy"]
        finally:
            # the kernel's own words for "working again" undo whatever the garbage did
            recovered = {"ERROR_EVENT": "SUCCESSFUL_RECOVERY", "DEVICE_ONLINE": "1"}
            sane.uevent_raw(path_of(target), "change", recovered)
            sane.uevent_raw(card_path(target), "change", {"WEDGED": "none"})
            beacon.flip()
        assert settled(daemon, sub) == reference
        sent["uevents"] += 4

    garbage_then_recovery()
    assert daemon.process.poll() is None
    check_log(daemon.log())
    record(
        AREA,
        "change uevents with generated ERROR_EVENT, DEVICE_ONLINE and WEDGED values (control "
        "characters, invalid UTF-8, up to 7000 bytes), each followed by the kernel's recovery",
        f"{sent['examples']} examples, {sent['uevents']} change uevents to {len(SANE)} GPUs",
        f"daemon up; {sent['unhealthy']} examples left the GPU unhealthy, longest string "
        f"{sent['longest']} characters (limit {MAX_TEXT}); after each recovery the snapshot "
        "equalled the one before the garbage",
    )


FRESH = "fresh"  # stands for a new, well-formed address of the example's own


# Device names: fresh addresses, a sane GPU's address plus control characters, any text or
# bytes; at most 60 characters (NAME_MAX is 255 bytes). Never "/" (it would nest directories),
# NUL, or a line break: libudev cuts a uevent's DEVPATH there, and the event would then really
# be the sane GPU's (the enumeration, which has no such limit, is tested in no_identity).
names = st.one_of(
    st.just(FRESH),
    st.tuples(
        st.sampled_from(sorted(SANE)),
        st.text(st.sampled_from("\x01\x07\x1b\t\x0b\x0c\x7f\x85"), min_size=1),
    ).map("".join),
    st.text(_CHARS.filter(lambda c: c not in "/\r"), min_size=1, max_size=60),
    st.binary(min_size=1, max_size=60).map(no_bytes(b"/\x00\n\r")),
).filter(lambda n: n not in ("", ".", "..", b"", b".", b"..", *SANE, BEACON, "drm"))
ABSENT = "absent"  # a field the device does not have
GARBAGE_FIELDS = {
    "name": names,
    "PCI_SLOT_NAME": st.one_of(st.just(ABSENT), st.sampled_from(sorted(SANE)), names, values),
}
# What a sane hot-added device has; "sysfs:" marks attributes, the rest are properties.
SANE_FIELDS: dict[str, str | bytes] = {
    "name": FRESH,
    "PCI_SLOT_NAME": FRESH,
    "PCI_ID": "10DE:2330",
    "PCI_CLASS": "30200",
    "DRIVER": "nvidia",
    "sysfs:vendor": "0x10de",
    "sysfs:class": "0x030200",
    "sysfs:current_link_speed": "32.0 GT/s PCIe",
    "sysfs:numa_node": "1",
}


def test_generated_pci_devices_come_and_go_without_touching_the_sane_ones(
    sane: Simulator,
    start_daemon: Callable[..., Daemon],
    subscribe: Callable[[Daemon], Subscription],
) -> None:
    sane.add("nvidia-h100", BEACON, 0)
    daemon = start_daemon(*ARGS, env=sane.daemon_env())
    sub = subscribe(daemon)
    reference = settled(daemon, sub)
    beacon = Beacon(sane, sub)
    seen = {"examples": 0, "shown": 0, "longest": 0}

    @GENERATED
    @given(st.data())
    def come_and_go(data: st.DataObject) -> None:
        seen["examples"] += 1
        fresh = f"0000:{0x70 + seen['examples'] // 256 % 16:02x}:{seen['examples'] % 256:02x}.0"
        # a sane device with up to three of its fields replaced by garbage
        broken = data.draw(st.sets(st.sampled_from(sorted(SANE_FIELDS)), max_size=3), "broken")
        fields = dict(SANE_FIELDS)
        for key in sorted(broken):
            fields[key] = data.draw(GARBAGE_FIELDS.get(key, values), key)
        fields = {k: fresh if v == FRESH else v for k, v in fields.items() if v != ABSENT}
        name = fields.pop("name")
        attributes = {key.removeprefix("sysfs:"): v for key, v in fields.items() if ":" in key}
        properties = {key: v for key, v in fields.items() if ":" not in key}
        path = sane.add_raw("pci", name, None, {**H100_IDS, **attributes}, properties)
        try:
            beacon.flip()
            snapshot = settled(daemon, sub)
            seen["longest"] = max(seen["longest"], check_snapshot(snapshot))
            devices, before = devices_of(snapshot), devices_of(reference)
            # nothing but the new device under its own, well-formed name can have appeared
            assert set(devices) - set(before) <= {fresh}
            if broken <= {"DRIVER", "sysfs:current_link_speed", "sysfs:numa_node"}:
                assert fresh in devices, "a device with a good identity was not shown"
            seen["shown"] += fresh in devices
            for device_id in SANE:
                assert devices[device_id] == before[device_id]
        finally:
            sane.remove_raw(path)
            beacon.flip()
        assert settled(daemon, sub) == reference

    come_and_go()
    assert daemon.process.poll() is None
    check_log(daemon.log())
    record(
        AREA,
        "hot-added PCI devices with generated names (sane GPUs' addresses plus control "
        "characters, any text or bytes), PCI_SLOT_NAME, PCI_ID, class, vendor, driver and link "
        "speed, each removed again",
        f"{seen['examples']} devices added and removed",
        f"daemon up; {seen['shown']} shown under their own address, the rest left out; longest "
        f"string {seen['longest']} characters (limit {MAX_TEXT}); {len(SANE)} sane GPUs "
        "unchanged; after each remove the snapshot equalled the one before",
    )
