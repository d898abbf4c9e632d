"""The umockdev helper process (``python -m monitor.sim.testbed``, run by ``Simulator`` under
``LD_PRELOAD=libumockdev-preload.so.0``): libumockdev's testbed through ctypes, the simulated GPUs
it adds (their PCI identity, DRM nodes, vendor files and sysfs telemetry), and the commands it
takes, one JSON object per line of stdin.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import signal
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from monitor.sim.mig import mig_minors_text
from monitor.sim.umockdev import LIBRARY, to_bytes, to_text


@attrs.frozen
class GpuKind:
    vendor_id: int
    device_id: int
    pci_class: int
    subsystem: tuple[int, int]
    driver: str
    link_speed: str = "32.0 GT/s PCIe"
    link_width: int = 16


KINDS = {
    "nvidia-h100": GpuKind(0x10DE, 0x2330, 0x030200, (0x10DE, 0x16C1), "nvidia"),
    "amd-mi300x": GpuKind(0x1002, 0x74A1, 0x038000, (0x1002, 0x74A1), "amdgpu"),
    "intel-arc": GpuKind(0x8086, 0x56A0, 0x030000, (0x8086, 0x1020), "i915", "2.5 GT/s PCIe", 1),
}


# What the kernel's drivers show of a GPU's telemetry in sysfs, with known values (the stats
# tests read them back): files of the PCI device, of its hwmon device, and of its DRM card.
# The NVIDIA driver has neither: NVML gives its numbers.
SYSFS_STATS: dict[str, dict[str, dict[str, str]]] = {
    "amdgpu": {
        "device": {
            "gpu_busy_percent": "42",
            "mem_busy_percent": "17",
            "mem_info_vram_used": str(3 << 30),
            "mem_info_vram_total": str(192 << 30),
        },
        "hwmon": {
            "name": "amdgpu",
            "temp1_input": "51000",  # millidegrees C
            "temp1_crit": "100000",
            "power1_average": "253000000",  # microwatts
            "freq1_input": "2100000000",  # Hz: the GPU clock
            "freq2_input": "1300000000",  # Hz: the memory clock
        },
        "card": {},
    },
    "i915": {
        "device": {},
        "hwmon": {
            "name": "i915",
            "energy1_input": "123456789",  # microjoules
            "power1_max": "225000000",  # a limit, not a reading: not a stat
        },
        "card": {"gt_cur_freq_mhz": "1650", "gt_max_freq_mhz": "2400"},
    },
}


def _strv(pairs: Mapping[str, str]) -> Any:
    flat = [to_bytes(s) for kv in pairs.items() for s in kv]
    return (ctypes.c_char_p * (len(flat) + 1))(*flat, None)


class Testbed:
    """libumockdev's testbed, through ctypes. Only usable in a preloaded process."""

    def __init__(self) -> None:
        lib = ctypes.CDLL(LIBRARY)
        vp, cp = ctypes.c_void_p, ctypes.c_char_p
        lib.umockdev_testbed_new.restype = vp
        lib.umockdev_testbed_get_root_dir.restype = cp
        lib.umockdev_testbed_get_root_dir.argtypes = [vp]
        lib.umockdev_testbed_add_devicev.restype = cp
        lib.umockdev_testbed_add_devicev.argtypes = [vp, cp, cp, cp, vp, vp]
        lib.umockdev_testbed_uevent.argtypes = [vp, cp, cp]
        lib.umockdev_testbed_set_property.argtypes = [vp, cp, cp, cp]
        lib.umockdev_testbed_set_attribute.argtypes = [vp, cp, cp, cp]
        lib.umockdev_testbed_remove_device.argtypes = [vp, cp]
        self._lib = lib
        self._bed = lib.umockdev_testbed_new()
        self.root = lib.umockdev_testbed_get_root_dir(self._bed).decode()

    def add(
        self,
        subsystem: str,
        name: str,
        parent: str | None,
        attrs_: Mapping[str, str],
        props: Mapping[str, str],
    ) -> str:
        path = self._lib.umockdev_testbed_add_devicev(
            self._bed,
            to_bytes(subsystem),
            to_bytes(name),
            to_bytes(parent) if parent else None,
            _strv(attrs_),
            _strv(props),
        )
        if not path:
            raise RuntimeError(f"umockdev could not add {subsystem} device {name!r}")
        return to_text(path)

    def uevent(self, syspath: str, action: str, **props: str) -> None:
        for key, value in props.items():
            self.set_property(syspath, key, value)
        self._lib.umockdev_testbed_uevent(self._bed, to_bytes(syspath), to_bytes(action))
        for key in props:  # the properties belong to this one event, not to the device
            self.set_property(syspath, key, "")

    def set_property(self, syspath: str, key: str, value: str) -> None:
        self._lib.umockdev_testbed_set_property(
            self._bed, to_bytes(syspath), to_bytes(key), to_bytes(value)
        )

    def set_attribute(self, syspath: str, name: str, value: str) -> None:
        self._lib.umockdev_testbed_set_attribute(
            self._bed, to_bytes(syspath), to_bytes(name), to_bytes(value)
        )

    def remove(self, syspath: str) -> None:
        self._lib.umockdev_testbed_remove_device(self._bed, to_bytes(syspath))


class Helper:
    """The commands the helper process carries out, one per line of stdin."""

    def __init__(self) -> None:
        self.bed = Testbed()
        self.gpus: dict[str, tuple[str, GpuKind, list[str]]] = {}  # address -> (path, kind, drm)
        self.hwmon: dict[str, str] = {}  # address -> its hwmon device's path
        self.next_minor = 0
        self.next_hwmon = 0

    def add(self, kind: str, address: str, numa_node: int = 0) -> None:
        gpu = KINDS[kind]
        vendor, device = f"{gpu.vendor_id:04X}", f"{gpu.device_id:04X}"
        sub_vendor, sub_device = (f"{i:04X}" for i in gpu.subsystem)
        path = self.bed.add(
            "pci",
            address,
            None,
            {
                "vendor": f"0x{gpu.vendor_id:04x}",
                "device": f"0x{gpu.device_id:04x}",
                "class": f"0x{gpu.pci_class:06x}",
                "numa_node": str(numa_node),
                "current_link_speed": gpu.link_speed,
                "current_link_width": str(gpu.link_width),
            },
            {
                "PCI_SLOT_NAME": address,
                "PCI_ID": f"{vendor}:{device}",
                "PCI_CLASS": f"{gpu.pci_class:X}",
                "PCI_SUBSYS_ID": f"{sub_vendor}:{sub_device}",
                "DRIVER": gpu.driver,
                "MODALIAS": f"pci:v0000{vendor}d0000{device}sv0000{sub_vendor}sd0000{sub_device}",
            },
        )
        self.gpus[address] = (path, gpu, self._add_drm(path))
        self._add_stats(address, path, gpu.driver)
        # Vendor nodes are not udev devices here; plain files are enough for the daemon's checks.
        if gpu.driver == "nvidia":
            minor = sum(1 for _, kind, _ in self.gpus.values() if kind.driver == "nvidia") - 1
            info = f"proc/driver/nvidia/gpus/{address}/information"
            self._touch(info, f"Model: simulated\nDevice Minor: {minor}\n")
            for node in (f"nvidia{minor}", "nvidiactl", "nvidia-uvm", "nvidia-uvm-tools"):
                self._touch(f"dev/{node}")
        elif gpu.driver == "amdgpu":
            self._touch("dev/kfd")

    def mig_nodes(self, gpu_minor: int) -> None:
        """The driver's MIG capability files for one GPU: the mig-minors file (for 8 GPUs) and
        each /dev/nvidia-caps node of that GPU's GPU and compute instances."""
        text = mig_minors_text()
        self._touch("proc/driver/nvidia-caps/mig-minors", text)
        for line in text.splitlines():
            name, _, minor = line.partition(" ")
            if name.startswith(f"gpu{gpu_minor}/"):
                self._touch(f"dev/nvidia-caps/nvidia-cap{minor}")

    def _add_stats(self, address: str, path: str, driver: str) -> None:
        """The telemetry files the GPU's driver would show (SYSFS_STATS)."""
        files = SYSFS_STATS.get(driver)
        if files is None:
            return
        for name, value in files["device"].items():
            self.bed.set_attribute(path, name, value)
        name = f"hwmon/hwmon{self.next_hwmon}"
        self.next_hwmon += 1
        self.hwmon[address] = self.bed.add("hwmon", name, path, files["hwmon"], {})
        self._set_card_stats(address)

    def _set_card_stats(self, address: str) -> None:
        _, gpu, nodes = self.gpus[address]
        card = next((n for n in nodes if Path(n).name.startswith("card")), None)
        if card is not None:
            for name, value in SYSFS_STATS.get(gpu.driver, {}).get("card", {}).items():
                self.bed.set_attribute(card, name, value)

    def set_stat(self, address: str, where: str, name: str, value: str | None) -> None:
        """Change (or, with None, remove) one telemetry file of a GPU: ``where`` is "device",
        "hwmon" or "card"."""
        path, _, nodes = self.gpus[address]
        target = {
            "device": path,
            "hwmon": self.hwmon.get(address, ""),
            "card": next((n for n in nodes if Path(n).name.startswith("card")), ""),
        }[where]
        if value is None:
            Path(self.bed.root, target.lstrip("/"), name).unlink(missing_ok=True)
        else:
            self.bed.set_attribute(target, name, value)

    def _touch(self, relative: str, content: str = "") -> None:
        path = Path(self.bed.root, relative)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)

    def _add_drm(self, parent: str) -> list[str]:
        minor = self.next_minor
        self.next_minor += 1
        nodes = []
        for name, number in ((f"card{minor}", minor), (f"renderD{128 + minor}", 128 + minor)):
            nodes.append(
                self.bed.add(
                    "drm",
                    f"drm/{name}",
                    parent,
                    {"dev": f"226:{number}"},
                    {
                        "DEVNAME": f"/dev/dri/{name}",
                        "DEVTYPE": "drm_minor",
                        "MAJOR": "226",
                        "MINOR": str(number),
                    },
                )
            )
            # umockdev records the node but leaves no file in its /dev; make one, and the
            # stable name udev would make for it.
            self._touch(f"dev/dri/{name}")
            kind = "card" if name.startswith("card") else "render"
            link = Path(self.bed.root, "dev/dri/by-path", f"pci-{Path(parent).name}-{kind}")
            link.parent.mkdir(exist_ok=True)
            link.unlink(missing_ok=True)
            link.symlink_to(f"../{name}")
        return nodes

    def _remove_drm(self, nodes: list[str]) -> None:
        for node in nodes:
            self.bed.uevent(node, "remove")
            self.bed.remove(node)
            name = Path(node).name
            Path(self.bed.root, "dev/dri", name).unlink(missing_ok=True)
            kind = "card" if name.startswith("card") else "render"
            link = f"dev/dri/by-path/pci-{Path(node).parent.parent.name}-{kind}"
            Path(self.bed.root, link).unlink(missing_ok=True)
        nodes.clear()

    def remove(self, address: str) -> None:
        path, _, nodes = self.gpus.pop(address)
        self._remove_drm(nodes)
        hwmon = self.hwmon.pop(address, None)
        if hwmon is not None:
            self.bed.remove(hwmon)
        self.bed.uevent(path, "remove")
        self.bed.remove(path)
        shutil.rmtree(Path(self.bed.root, "proc/driver/nvidia/gpus", address), ignore_errors=True)

    def pci_error(self, address: str, event: str) -> None:
        online = "1" if event == "SUCCESSFUL_RECOVERY" else "0"
        self.bed.uevent(self.gpus[address][0], "change", ERROR_EVENT=event, DEVICE_ONLINE=online)

    def wedge(self, address: str, method: str) -> None:
        card = self.gpus[address][2][0]
        self.bed.uevent(card, "change", WEDGED=method)

    def unbind(self, address: str) -> None:
        path, _, nodes = self.gpus[address]
        self._remove_drm(nodes)
        self.bed.set_property(path, "DRIVER", "")
        self.bed.uevent(path, "unbind")

    def bind(self, address: str) -> None:
        path, gpu, nodes = self.gpus[address]
        self.bed.set_property(path, "DRIVER", gpu.driver)
        self.bed.uevent(path, "bind")
        nodes.extend(self._add_drm(path))
        self._set_card_stats(address)

    def change(self, address: str) -> None:
        self.bed.uevent(self.gpus[address][0], "change")

    def add_raw(
        self,
        subsystem: str,
        name: str,
        parent: str | None,
        attributes: dict[str, str],
        properties: dict[str, str],
    ) -> str:
        """Add any device with exactly these attributes and properties (umockdev sends "add")."""
        return self.bed.add(subsystem, name, parent, attributes, properties)

    def uevent_raw(self, syspath: str, action: str, properties: dict[str, str]) -> None:
        """Send ``action`` for any device, ``properties`` set for this one event."""
        self.bed.uevent(syspath, action, **properties)

    def set_raw(self, syspath: str, attributes: dict[str, str], properties: dict[str, str]) -> None:
        """Change any device's attributes and properties, sending no uevent."""
        # umockdev's uevents carry at most 16 KiB of properties (the kernel's 2 KiB) and abort
        # beyond that: bigger values can only ever be read, at enumeration.
        for name, value in attributes.items():
            self.bed.set_attribute(syspath, name, value)
        for key, value in properties.items():
            self.bed.set_property(syspath, key, value)

    def remove_raw(self, syspath: str) -> None:
        """A "remove" uevent for any device, then its removal from sysfs."""
        self.bed.uevent(syspath, "remove")
        self.bed.remove(syspath)


def main() -> None:
    # Ctrl-C in a terminal goes to the whole process group: the process that drives us ends us
    # (by closing our stdin), and a KeyboardInterrupt here would only print a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    helper = Helper()
    print(json.dumps({"root": helper.bed.root}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        try:
            result = getattr(helper, command.pop("op"))(**command)
            reply: dict[str, Any] = {"ok": True, "result": result}
        except Exception as exc:  # reported to the driving process, which raises it
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
