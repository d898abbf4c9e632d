"""The udev parsers, by plain calls on stand-in devices: what a uevent or an enumerated device
means, and that hostile text (garbage bytes, non-UTF-8, control characters, truncated or huge
values, missing keys) means nothing or something bounded, never an exception
(``monitor.sources.udev``; umockdev tries the same through libudev in tests/host)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from monitor.core.events import (
    DeviceGone,
    DeviceSeen,
    DrmNode,
    DrmNodeGone,
    DrmNodeSeen,
    DrmWedged,
    PciErrorReported,
    PciFacts,
)
from monitor.core.text import MAX_TEXT
from monitor.sources import udev
from monitor.sources.udev import drm_node, pci_address, pci_facts, translate

A = "0000:3b:00.0"
NOT_UTF8 = b"\xff\xfe\xc3("


def _bad_text() -> UnicodeDecodeError:
    """What pyudev raises for text that is not UTF-8 (it decodes strictly)."""
    return UnicodeDecodeError("utf-8", NOT_UTF8, 0, 1, "invalid start byte")


class Raises:
    """A value whose reading raises, as pyudev's do."""

    def __init__(self, error: Callable[[], BaseException] = _bad_text) -> None:
        self.error = error


class Lookup:
    """pyudev's ``properties`` and ``attributes``: ``get`` returns or raises."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.values = values

    def get(self, key: str) -> Any:
        value = self.values.get(key)
        if isinstance(value, Raises):
            raise value.error()
        return value


class Device:
    """Just what the parsers read of a ``pyudev.Device``."""

    def __init__(
        self,
        sys_name: Any = A,
        *,
        subsystem: Any = "pci",
        action: Any = None,
        properties: Mapping[str, Any] | None = None,
        attributes: Mapping[str, Any] | None = None,
        driver: Any = None,
        parent: Device | None = None,
    ) -> None:
        self._values = {
            "sys_name": sys_name,
            "sys_path": f"/sys/devices/pci0000:00/{sys_name}"
            if isinstance(sys_name, str)
            else sys_name,
            "subsystem": subsystem,
            "action": action,
            "driver": driver,
        }
        self.properties = Lookup(properties if properties is not None else {})
        self.attributes = Lookup(attributes if attributes is not None else {})
        self._parent = parent

    def __getattr__(self, name: str) -> Any:
        try:
            value = self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(name) from None
        if isinstance(value, Raises):
            raise value.error()
        return value

    def find_parent(self, subsystem: str) -> Device | None:
        return self._parent if subsystem == "pci" else None


GOOD_ATTRIBUTES = {
    "vendor": b"0x10de\n",
    "device": b"0x2330\n",
    "class": b"0x030200\n",
    "numa_node": b"1\n",
    "current_link_speed": b"32.0 GT/s PCIe\n",
    "current_link_width": b"16\n",
}


def gpu(
    sys_name: Any = A,
    *,
    action: Any = None,
    properties: Mapping[str, Any] | None = None,
    **attributes: Any,
) -> Device:
    """A PCI device as pyudev gives it, every attribute sane but those given."""
    values = {**GOOD_ATTRIBUTES, **attributes}
    return Device(
        sys_name,
        action=action,
        properties=properties,
        attributes={k: v for k, v in values.items() if v is not None},
        driver="vfio-pci",
    )


def test_a_sane_gpu_is_read_whole() -> None:
    facts = pci_facts(gpu())
    assert facts is not None
    assert (facts.address, facts.vendor_id, facts.device_id, facts.pci_class) == (
        A,
        0x10DE,
        0x2330,
        0x030200,
    )
    assert (facts.driver, facts.numa_node, facts.link_width) == ("vfio-pci", 1, 16)
    assert facts.link_speed == "32.0 GT/s PCIe"


def test_udev_s_properties_come_before_sysfs() -> None:
    properties = {"PCI_ID": "10DE:2331", "PCI_CLASS": "30200", "PCI_SUBSYS_ID": "10de:16c1"}
    facts = pci_facts(gpu(properties=properties, vendor=b"garbage"))
    assert facts is not None and (facts.device_id, facts.pci_class) == (0x2331, 0x030200)
    assert (facts.subsystem_vendor_id, facts.subsystem_device_id) == (0x10DE, 0x16C1)


def test_each_uevent_means_its_events() -> None:
    assert translate(gpu(action="remove")) == [DeviceGone(A)]
    [seen] = translate(gpu(action="add"))
    assert isinstance(seen, DeviceSeen) and seen.facts.driver == "vfio-pci"
    [unbound] = translate(gpu(action="unbind"))
    assert isinstance(unbound, DeviceSeen) and unbound.facts.driver is None
    error = {"ERROR_EVENT": "BEGIN_RECOVERY", "DEVICE_ONLINE": "0"}
    assert translate(gpu(action="change", properties=error))[1:] == [
        PciErrorReported(A, "BEGIN_RECOVERY", False)
    ]
    assert translate(Device(subsystem="usb", action="add")) == []
    assert translate(Device(subsystem=None, action="add")) == []


def drm(name: Any = "card1", *, action: Any = "add", **properties: Any) -> Device:
    return Device(name, subsystem="drm", action=action, properties=properties, parent=gpu())


def test_a_drm_minor_is_a_node_below_its_pci_device() -> None:
    node = DrmNode(name="card1", parent=A, devnode="/dev/dri/card1")
    assert translate(drm()) == [DrmNodeSeen(node)]
    assert translate(drm(action="remove")) == [DrmNodeGone("card1")]
    assert translate(drm(action="change", WEDGED="rebind")) == [
        DrmNodeSeen(node),
        DrmWedged("card1", "rebind"),
    ]
    assert drm_node(drm("renderD129")) == DrmNode("renderD129", A, "/dev/dri/renderD129")


HOSTILE_NAMES = [
    "",
    "0000:1b:00.0\a",
    "0000:1B:00.0",
    " 0000:1b:00.0",
    "0000:1b:00.0\x00",
    "0000:1b:00.8",
    "00000:1b:00.0",
    "0000:1b:00",
    "../../../etc/passwd",
    "\uff10000:1b:00.0",  # a fullwidth digit
    "0000:1b:00.0" + "0" * 100_000,
    "\ufffd\ufffd",
    Raises(),
]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=repr)
def test_a_pci_device_with_no_sane_address_means_nothing(name: Any) -> None:
    device = gpu(name)
    assert pci_address(device) is None
    assert pci_facts(device) is None
    assert translate(gpu(name, action="add")) == []
    assert translate(gpu(name, action="remove")) == []


def test_a_slot_name_that_differs_from_the_device_s_name_means_nothing() -> None:
    for slot in ("0000:1b:00.0", A + "\n", A.upper(), "", Raises()):
        assert pci_facts(gpu(properties={"PCI_SLOT_NAME": slot})) is None, slot
    assert pci_facts(gpu(properties={"PCI_SLOT_NAME": A})) is not None


HOSTILE_NUMBERS: list[Any] = [
    None,  # missing
    b"",
    b"\n",
    NOT_UTF8,
    b"0x",
    b"0x10de0x",
    b"1_0de",
    b" +10de",
    b"-10de",
    "\u0661\u0660de".encode(),  # Arabic-Indic digits: int() takes them, the kernel never
    b"0x" + b"f" * 100_000,
    b"9" * 100_000,  # more digits than int() takes
    b"0x10de\x00garbage",
    b"\x1b[31m0x10de",
    Raises(lambda: OSError(5, "Input/output error")),
    Raises(lambda: KeyError("vendor")),
    Raises(_bad_text),
]


@pytest.mark.parametrize("value", HOSTILE_NUMBERS, ids=repr)
@pytest.mark.parametrize("attribute", ["vendor", "device", "class"])
def test_an_identity_that_is_no_number_means_nothing(attribute: str, value: Any) -> None:
    assert pci_facts(gpu(**{attribute: value})) is None
    assert translate(gpu(action="change", **{attribute: value})) == []


def test_an_identity_too_large_for_its_field_means_nothing() -> None:
    assert pci_facts(gpu(vendor=b"0x10000")) is None
    too_large: dict[str, Any] = {"class": b"0x1000000"}
    assert pci_facts(gpu(**too_large)) is None
    assert pci_facts(gpu(properties={"PCI_ID": "1ffff:2330"})) is not None  # sysfs's then


@pytest.mark.parametrize(
    "pci_id",
    [
        "",
        ":",
        "10de",
        "10de:",
        ":2330",
        "10de:2330:0",
        "zz:yy",
        "10de:\u0662\u0663\u0663\u0660",
        Raises(),
    ],
)
def test_a_malformed_pci_id_leaves_the_identity_to_sysfs(pci_id: Any) -> None:
    facts = pci_facts(gpu(properties={"PCI_ID": pci_id}))
    assert facts is not None and (facts.vendor_id, facts.device_id) == (0x10DE, 0x2330)


@pytest.mark.parametrize("value", HOSTILE_NUMBERS, ids=repr)
def test_a_malformed_optional_number_is_left_out(value: Any) -> None:
    facts = pci_facts(gpu(numa_node=value, current_link_width=value))
    assert facts is not None and facts.numa_node is None and facts.link_width is None


def test_numbers_are_bounded() -> None:
    facts = pci_facts(gpu(numa_node=b"-1", current_link_width=b"9999999"))
    assert facts is not None and facts.numa_node == -1 and facts.link_width is None


@pytest.mark.parametrize(
    "value",
    [
        b"32.0 GT/s\x1b[31m PCIe\x00\x07",
        NOT_UTF8 + b" GT/s",
        b"x" * (2 << 20),
        b"\n\n\n",
        "\u202e32.0 GT/s".encode(),
        Raises(lambda: OSError(19, "No such device")),
    ],
    ids=lambda v: repr(v)[:40],
)
def test_text_is_printable_and_bounded(value: Any) -> None:
    facts = pci_facts(gpu(current_link_speed=value))
    assert facts is not None
    text = facts.link_speed
    assert text is None or (text.isprintable() and 0 < len(text) <= MAX_TEXT)


@pytest.mark.parametrize(
    "driver", ["nvidia\x1b[2J", "x" * 100_000, "\n", Raises(), None], ids=lambda v: repr(v)[:20]
)
def test_a_hostile_driver_name_is_printable_bounded_or_none(driver: Any) -> None:
    device = gpu()
    device._values["driver"] = driver
    facts = pci_facts(device)
    assert facts is not None
    assert facts.driver is None or (facts.driver.isprintable() and len(facts.driver) <= 256)
    facts = pci_facts(gpu(properties={"DRIVER": driver}))
    assert facts is not None


@pytest.mark.parametrize(
    "properties",
    [
        {"ERROR_EVENT": "BEGIN_RECOVERY\x1b[31m" + "x" * 100_000},
        {"ERROR_EVENT": NOT_UTF8.decode("utf-8", "replace")},
        {"ERROR_EVENT": Raises()},
        {"ERROR_EVENT": "\n\t"},
        {"DEVICE_ONLINE": "yes"},
        {"DEVICE_ONLINE": "9" * 100_000},
        {"DEVICE_ONLINE": Raises()},
    ],
    ids=lambda p: repr(p)[:40],
)
def test_hostile_error_properties_are_bounded_tokens(properties: dict[str, Any]) -> None:
    events = translate(gpu(action="change", properties=properties))
    assert isinstance(events[0], DeviceSeen)
    for event in events[1:]:
        assert isinstance(event, PciErrorReported)
        token = event.error_event
        assert token is None or (token.isprintable() and len(token) <= udev.MAX_TOKEN)


@pytest.mark.parametrize(
    "name",
    [
        "card0-DP-1",
        "card",
        "card12345678",
        "renderD",
        "card1\n",
        "card\x1b1",
        "card\u0661",
        "controlD64",
        "",
        Raises(),
    ],
    ids=repr,
)
def test_a_drm_device_that_is_no_minor_means_nothing(name: Any) -> None:
    assert translate(drm(name)) == []
    assert translate(drm(name, action="remove")) == []


def test_a_drm_minor_without_a_sane_pci_parent_means_nothing() -> None:
    orphan = Device("card1", subsystem="drm", action="add", parent=None)
    assert translate(orphan) == []
    bad_parent = Device("card1", subsystem="drm", action="add", parent=gpu("0000:1B:00.0"))
    assert translate(bad_parent) == []


@pytest.mark.parametrize(
    "devname",
    ["/dev/../etc/shadow", "/dev/dri/card2", "dri/card1\x00", "x" * 100_000, Raises()],
    ids=lambda v: repr(v)[:30],
)
def test_the_node_is_dev_dri_name_whatever_devname_says(devname: Any) -> None:
    [seen] = translate(drm(DEVNAME=devname))
    assert seen == DrmNodeSeen(DrmNode("card1", A, "/dev/dri/card1"))


@pytest.mark.parametrize(
    "wedged", ["\x1b[31m" + "v" * 100_000, "\n", Raises(), NOT_UTF8.decode("utf-8", "replace")]
)
def test_a_hostile_wedged_method_is_a_bounded_token_or_nothing(wedged: Any) -> None:
    events = translate(drm(action="change", WEDGED=wedged))
    assert isinstance(events[0], DrmNodeSeen)
    for event in events[1:]:
        assert isinstance(event, DrmWedged)
        assert event.method.isprintable() and len(event.method) <= udev.MAX_TOKEN


@pytest.mark.parametrize("subsystem", ["pci", "drm"])
@pytest.mark.parametrize("action", [Raises(), "", "\x00", "add\n", "x" * 100_000, 5])
def test_a_hostile_action_is_a_change_at_most(subsystem: str, action: Any) -> None:
    device = gpu(action=action) if subsystem == "pci" else drm(action=action)
    events = translate(device)
    assert all(isinstance(e, DeviceSeen | DrmNodeSeen) for e in events)


@pytest.mark.parametrize("subsystem", [Raises(), "", "pci\n", 5, None])
def test_a_hostile_subsystem_means_nothing(subsystem: Any) -> None:
    device = gpu(action="add")
    device._values["subsystem"] = subsystem
    assert translate(device) == []


@pytest.mark.parametrize(
    "content",
    [
        b"Model: H100\nDevice Minor: \xff\xfe\n",
        NOT_UTF8 * 1000,
        b"Device Minor: " + b"9" * 100_000 + b"\n",
        "Device Minor: \u0663\n".encode(),
        b"Device Minor: -1\n",
        b"Device Minor:\n",
        b"\x00" * 10_000,
    ],
    ids=lambda v: repr(v)[:30],
)
def test_a_hostile_nvidia_proc_file_gives_no_minor_or_a_sane_one(
    content: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / A).write_bytes(content)
    monkeypatch.setattr(udev, "NVIDIA_GPU_INFO", str(tmp_path / "{address}"))
    minor = udev.nvidia_minor(A)
    assert minor is None or 0 <= minor < 1 << 20
    device = gpu()
    device._values["driver"] = "nvidia"
    facts = pci_facts(device)
    assert isinstance(facts, PciFacts) and facts.nvidia_minor == minor


def test_the_nvidia_minor_is_read_from_the_driver_s_proc_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / A).write_bytes(b"Model: NVIDIA H100\nDevice Minor: 5\nBus Type: PCIe\n")
    monkeypatch.setattr(udev, "NVIDIA_GPU_INFO", str(tmp_path / "{address}"))
    assert udev.nvidia_minor(A) == 5
    assert udev.nvidia_minor("0000:5e:00.0") is None  # no such file
