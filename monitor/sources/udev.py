"""udev netlink source: PCI and DRM uevents and enumerations, translated into frozen events.

The monitor is filtered to ``pci`` and ``drm``, started before the first enumeration so nothing
falls between the two, and read on the trio loop with ``wait_readable`` + ``poll(timeout=0)``.
Each pyudev ``Device`` is a lazy view of sysfs, so it is copied into a frozen event at once.
When the kernel drops events because our receive buffer overflowed, the socket reports ENOBUFS:
we clear it, enumerate again and send a ``Resync`` so the state ends equal to sysfs.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from collections.abc import Callable
from typing import Any

import pyudev
import trio

from monitor.core.events import (
    DeviceGone,
    DeviceSeen,
    DrmNode,
    DrmNodeGone,
    DrmNodeSeen,
    DrmWedged,
    Event,
    PciErrorReported,
    PciFacts,
    Resync,
)
from monitor.core.model import PCI_ADDRESS
from monitor.core.text import READ_LIMIT, printable, shown
from monitor.outputs.logs import MESSAGE_IDS
from monitor.sources.counts import Received, SourceCounts
from monitor.sources.hwdb import pci_model_name

log = logging.getLogger(__name__)

# Identities are matched on the raw text (ASCII only, whole value), never on sanitised text:
# "0000:1b:00.0\a" or "card\x1b0" must not become another device's "0000:1b:00.0" or "card0".
DRM_MINOR = re.compile(r"(card|renderD)[0-9]{1,7}")  # minors are 20 bits
# int(x, 16) would also take "1_0de", " +10de" and non-ASCII digits.
_HEX_NUMBER = re.compile(r"(?:0[xX])?([0-9a-fA-F]{1,8})")
_DECIMAL = re.compile(r"-?[0-9]{1,6}")  # NUMA nodes, link widths: small, so JSON-safe
# ERROR_EVENT and WEDGED are short words in the kernel; bounded so that health_desc, which
# quotes them, stays within MAX_TEXT.
MAX_TOKEN = 64
# Events translated per batch before we let the loop run other tasks.
BATCH_LIMIT = 512
UDEV_CONTROL = "/run/udev/control"
NVIDIA_GPU_INFO = "/proc/driver/nvidia/gpus/{address}/information"
_DEVICE_MINOR = re.compile(r"^Device Minor:[ \t]*([0-9]{1,7})[ \t]*$", re.MULTILINE)
UEVENTS_LOST_MESSAGE_ID = MESSAGE_IDS["uevents_lost"]


def pick_source(requested: str) -> str:
    """``auto`` means udevd's events when udevd runs, the kernel's raw events otherwise."""
    if requested != "auto":
        return requested
    return "udev" if os.path.exists(UDEV_CONTROL) else "kernel"


def _decoded(read: Callable[[], Any]) -> Any:
    """What ``read`` returns; text that is not UTF-8 (pyudev decodes strictly) with U+FFFD."""
    try:
        return read()
    except UnicodeDecodeError as exc:
        return exc.object.decode("utf-8", errors="replace")


def _property(device: pyudev.Device, key: str) -> str | None:
    """A udev property as it is (not sanitised), or None."""
    value: str | None = _decoded(lambda: device.properties.get(key))
    return value


def _sys_name(device: pyudev.Device) -> str:
    name: str = _decoded(lambda: device.sys_name)
    return name


def _sys_path(device: pyudev.Device) -> str:
    path: str = _decoded(lambda: device.sys_path)
    return path


def _raw_attribute(device: pyudev.Device, name: str) -> str | None:
    """A sysfs attribute as it is (not sanitised, but at most READ_LIMIT bytes), or None."""
    try:
        value = device.attributes.get(name)
    except (OSError, UnicodeError, KeyError):
        return None
    return value[:READ_LIMIT].decode("utf-8", errors="replace") if value is not None else None


def _attribute(device: pyudev.Device, name: str) -> str | None:
    return printable(_raw_attribute(device, name))


def _hex(value: str | None, bits: int) -> int | None:
    """A hex number as sysfs and udev write it ("0x10de", "10DE"), else None."""
    found = _HEX_NUMBER.fullmatch(value.strip()) if value is not None else None
    if found is None:
        return None
    number = int(found.group(1), 16)
    return number if number < (1 << bits) else None


def _id_pair(value: str | None) -> tuple[int | None, int | None]:
    if value is None or ":" not in value:
        return None, None
    first, _, second = value.partition(":")
    return _hex(first, 16), _hex(second, 16)


def _int(value: str | None) -> int | None:
    found = _DECIMAL.fullmatch(value.strip()) if value is not None else None
    return int(found.group()) if found else None


def nvidia_minor(address: str) -> int | None:
    """The N of /dev/nvidiaN for a GPU the NVIDIA driver has bound, from its proc file."""
    try:
        # bounded, and decoded leniently: the file is the driver's, but a read must not fail
        with open(NVIDIA_GPU_INFO.format(address=address), "rb") as info:
            text = info.read(READ_LIMIT).decode("utf-8", errors="replace")
    except OSError:
        return None
    found = _DEVICE_MINOR.search(text)
    return int(found.group(1)) if found else None


def pci_address(device: pyudev.Device) -> str | None:
    """The device's PCI address: its name, which PCI_SLOT_NAME (if given) must repeat."""
    # Exactly as the kernel writes it: stripping or lower-casing would let "0000:1b:00.0\t"
    # or "0000:1B:00.0" stand for another device's "0000:1b:00.0".
    name = _sys_name(device)
    slot = _property(device, "PCI_SLOT_NAME")
    return name if PCI_ADDRESS.fullmatch(name) and slot in (None, name) else None


def pci_facts(device: pyudev.Device, *, unbound: bool = False) -> PciFacts | None:
    """Copy a PCI device into ``PciFacts``; None (and a log line) when it is not a sane one."""
    address = pci_address(device)
    vendor_id, device_id = _id_pair(_property(device, "PCI_ID"))
    if vendor_id is None or device_id is None:
        vendor_id = _hex(_raw_attribute(device, "vendor"), 16)
        device_id = _hex(_raw_attribute(device, "device"), 16)
    pci_class = _hex(
        (_property(device, "PCI_CLASS") or "").strip() or _raw_attribute(device, "class"), 24
    )
    if address is None or vendor_id is None or device_id is None or pci_class is None:
        log.warning(
            "skipping PCI device %s: missing or malformed identity",
            shown(_sys_path(device)),
        )
        return None
    sub_vendor, sub_device = _id_pair(_property(device, "PCI_SUBSYS_ID"))
    driver = None
    if not unbound:
        driver = printable(_property(device, "DRIVER")) or printable(
            _decoded(lambda: device.driver)
        )
    return PciFacts(
        address=address,
        vendor_id=vendor_id,
        device_id=device_id,
        pci_class=pci_class,
        subsystem_vendor_id=sub_vendor,
        subsystem_device_id=sub_device,
        driver=driver,
        model=printable(pci_model_name(vendor_id, device_id)),
        numa_node=_int(_raw_attribute(device, "numa_node")),
        link_speed=_attribute(device, "current_link_speed"),
        link_width=_int(_raw_attribute(device, "current_link_width")),
        nvidia_minor=nvidia_minor(address) if driver == "nvidia" else None,
    )


def drm_minor_name(device: pyudev.Device) -> str | None:
    """The name of a DRM minor (``card1``, ``renderD129``); None (logged) for anything else."""
    name = _sys_name(device)
    if DRM_MINOR.fullmatch(name):
        return name
    # connectors (card0-DP-1) are DRM devices too: not worth more than a debug line
    log.debug("ignoring DRM device %s: not a card or render minor", shown(_sys_path(device)))
    return None


def drm_node(device: pyudev.Device) -> DrmNode | None:
    """A DRM minor with a PCI parent, or None (connectors, virtual and platform devices)."""
    name = drm_minor_name(device)
    if name is None:
        return None
    # The nearest PCI device above it: a malformed one is not skipped over for a grandparent.
    pci = device.find_parent("pci")
    parent = pci_address(pci) if pci is not None else None
    if parent is None:
        log.debug("skipping DRM node %s: no sane PCI parent", shown(_sys_path(device)))
        return None
    # The kernel names every DRM minor's node dri/NAME (drm_devnode); udev cannot rename it.
    # A DEVNAME saying otherwise is not followed: reservations hand this path to containers.
    devnode = f"/dev/dri/{name}"
    devname = (_property(device, "DEVNAME") or devnode).strip()
    if devname not in (devnode, devnode.removeprefix("/dev/")):
        log.warning("DRM node %s: ignoring DEVNAME %s, using %s", name, shown(devname), devnode)
    return DrmNode(name=name, parent=parent, devnode=devnode)


def _token(value: str | None) -> str | None:
    text = printable(value)
    return text[:MAX_TOKEN] if text else None


def _online(value: str | None) -> bool | None:
    return None if value is None else value.strip() == "1"


def translate(device: pyudev.Device) -> list[Event]:
    """The events one uevent means; malformed or foreign devices mean none."""
    action, subsystem = _decoded(lambda: device.action), _decoded(lambda: device.subsystem)
    if subsystem == "pci":
        if action == "remove":
            address = pci_address(device)
            return [DeviceGone(address)] if address else []
        facts = pci_facts(device, unbound=action == "unbind")
        if facts is None:
            return []
        events: list[Event] = [DeviceSeen(facts)]
        error_event = _token(_property(device, "ERROR_EVENT"))
        online = _online(printable(_property(device, "DEVICE_ONLINE")))
        if action == "change" and (error_event is not None or online is not None):
            events.append(PciErrorReported(facts.address, error_event, online))
        return events
    if subsystem == "drm":
        name = drm_minor_name(device)
        if name is None:
            return []
        if action == "remove":
            return [DrmNodeGone(name)]
        node = drm_node(device)
        if node is None:
            return []
        wedged = _token(_property(device, "WEDGED"))
        if action == "change" and wedged is not None:
            return [DrmNodeSeen(node), DrmWedged(name, wedged)]
        return [DrmNodeSeen(node)]
    return []


def enumerate_host() -> Resync:
    """Every PCI function and DRM node, read from sysfs. Blocking: run it in a thread."""
    context = pyudev.Context()  # libudev objects are not shared between threads
    facts = [pci_facts(d) for d in context.list_devices(subsystem="pci")]
    nodes = [drm_node(d) for d in context.list_devices(subsystem="drm")]
    return Resync(
        devices=tuple(f for f in facts if f is not None),
        drm_nodes=tuple(n for n in nodes if n is not None),
    )


def _open_monitor(source: str, receive_buffer: int) -> pyudev.Monitor:
    monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source=source)
    monitor.filter_by("pci")
    monitor.filter_by("drm")
    try:
        monitor.set_receive_buffer_size(receive_buffer)  # SO_RCVBUFFORCE: root only
    except OSError:
        with socket.socket(fileno=os.dup(monitor.fileno())) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        log.info("netlink receive buffer capped by net.core.rmem_max (not running as root)")
    monitor.start()
    return monitor


def _take_socket_error(monitor: pyudev.Monitor) -> int:
    """Read and clear the pending socket error (ENOBUFS after an overflow)."""
    with socket.socket(fileno=os.dup(monitor.fileno())) as sock:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)


def _receive(monitor: pyudev.Monitor) -> tuple[list[pyudev.Device], bool, OSError | None]:
    """Up to BATCH_LIMIT queued uevents; whether the queue is now empty; the error, if any."""
    devices: list[pyudev.Device] = []
    try:
        while len(devices) < BATCH_LIMIT:
            device = monitor.poll(timeout=0)
            if device is None:
                return devices, True, None
            devices.append(device)
    except OSError as exc:
        return devices, False, exc
    return devices, False, None


async def run_udev_source(
    send: trio.MemorySendChannel[tuple[Event, ...] | Received],
    *,
    source: str = "auto",
    receive_buffer: int = 8 * 1024 * 1024,
    counts: SourceCounts | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Send a ``Resync``, report started, then send every relevant uevent as it arrives.

    After an overflow, what is still queued is discarded until the queue is empty, and only then
    is sysfs read again: the kernel reports the next loss (ENOBUFS) only once our queue has been
    empty, so a resync taken earlier could be followed by stale events and a silent loss.
    """
    # Under umockdev (the demo, the tests) the uevents are simulated: no udevd is needed.
    simulated = "UMOCKDEV_DIR" in os.environ
    if source == "udev" and not simulated and not os.path.exists(UDEV_CONTROL):
        log.warning(
            "--udev-source udev, but udevd does not seem to run (%s is missing): no uevents may "
            "ever arrive; --udev-source auto would listen to the kernel's",
            UDEV_CONTROL,
        )
    source = pick_source(source)
    monitor = _open_monitor(source, receive_buffer)
    log.info("listening to %s uevents for pci and drm", source)
    counts = counts or SourceCounts()
    await send.send((await trio.to_thread.run_sync(enumerate_host),))
    counts.resyncs["start"] += 1
    task_status.started()
    overflows = 0
    resync_due = False
    while True:
        devices, empty, error = _receive(monitor)
        read_at = trio.current_time()
        counts.uevents += len(devices)
        batch = [] if resync_due else [e for d in devices for e in translate(d)]
        if error is not None:
            # pyudev raises for POLLERR before reading, so the error stays until we take it.
            code = _take_socket_error(monitor) or error.errno
            overflows += 1
            log.warning(
                "uevents were lost (%s, overflow #%d); re-reading sysfs once the queue is drained",
                os.strerror(code) if code else error,
                overflows,
                extra={"journal": {"MESSAGE_ID": UEVENTS_LOST_MESSAGE_ID}},
            )
            resync_due = True
        if batch:
            await send.send(Received(tuple(batch), read_at))
        if resync_due and empty:
            resync_due = False
            await send.send((await trio.to_thread.run_sync(enumerate_host),))
            counts.resyncs["overflow"] += 1
        elif empty:
            await trio.lowlevel.wait_readable(monitor)
        else:
            await trio.lowlevel.checkpoint()
